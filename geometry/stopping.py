"""Stopping certificate (derivation 9): four criteria over recorded series, each a pure function
returning a :class:`Criterion` (name, value, threshold, passed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from geometry.provenance import jsonable

STOPPING_SOURCE = "seed README row 9 (four geometric criteria); SEED-SPEC row 9"

#: Convention: z multiplier of the standard error in the two-window tests ("within its standard
#: error" = 1.0). A convention, not a derived number.
DEFAULT_Z = 1.0
#: Convention: tolerated relative change of generation entropy and absolute increase of the
#: 4-gram repetition rate against the base model.
DEFAULT_DRIFT_TOLERANCE = 0.1


class Criterion(NamedTuple):
    """One certificate criterion: passed iff value <= threshold (both recorded)."""

    name: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class StoppingCertificate:
    """All criteria and whether the certificate holds (every criterion passed)."""

    criteria: tuple[Criterion, ...]
    satisfied: bool

    def to_dict(self) -> dict:
        return {
            "criteria": [
                {"name": c.name, "value": jsonable(c.value), "threshold": jsonable(c.threshold), "passed": c.passed}
                for c in self.criteria
            ],
            "satisfied": self.satisfied,
        }


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    v = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, v


def two_window_test(series: Sequence[float], window: int, z: float = DEFAULT_Z) -> tuple[float, float]:
    """|mean(last window) - mean(previous window)| and z times its standard error.

    **Source**: Welch's two-sample standard error, SE = sqrt(v1/n1 + v2/n2).

    Returns (|m2 - m1|, z * SE); (inf, 0) when fewer than 2 * window points are recorded.

    **Invariants**: shift invariant (``test_two_window_shift_invariant``); a constant series
    passes (``test_two_window_constant_passes``).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (got {window})")
    xs = [float(x) for x in series]
    if len(xs) < 2 * window:
        return math.inf, 0.0
    if not all(math.isfinite(x) for x in xs[-2 * window :]):
        return math.inf, 0.0
    m1, v1 = _mean_var(xs[-2 * window : -window])
    m2, v2 = _mean_var(xs[-window:])
    return abs(m2 - m1), z * math.sqrt(v1 / window + v2 / window)


def gradient_stationarity(grad_norms: Sequence[float], window: int, z: float = DEFAULT_Z) -> Criterion:
    """Criterion 1: the gradient norm has stopped changing (two-window mean test).

    **Source**: seed row 9; SEED-SPEC ("two-window mean difference within its standard error").

    value = |mean(w2) - mean(w1)|, threshold = z * sqrt(var1/n + var2/n); passes iff value <= threshold.

    **Invariants**: ``test_two_window_constant_passes``.
    """
    value, threshold = two_window_test(grad_norms, window, z)
    return Criterion("gradient_stationarity", value, threshold, value <= threshold)


def validation_ci_half_width(per_example_losses: Sequence[float], z: float = 1.96) -> float:
    """Half-width of the normal-approximation CI of the mean validation loss.

    **Source**: central limit theorem; z = 1.96 is the conventional 95% level.

    half = z * std(losses) / sqrt(n).

    **Invariants**: shrinks like 1/sqrt(n) (``test_ci_half_width_shrinks``).
    """
    xs = [float(x) for x in per_example_losses]
    if len(xs) < 2:
        raise ValueError("need >= 2 per-example losses")
    _, v = _mean_var(xs)
    return z * math.sqrt(v / len(xs))


def predicted_improvement(a: float, b: float, ci_half_width: float) -> Criterion:
    """Criterion 2: the best improvement a quadratic model predicts is below the loss CI.

    **Source**: second-order Taylor model of the validation loss along the update direction d:
    L(t) ~ L + a t + b t^2 / 2, minimised at t = -a/b with decrease a^2 / (2b) (Nocedal &
    Wright 2006, section 2.2); seed row 9.

    a = grad L_val . d, b = d^T H_val d (a Hessian-vector product over adapter parameters).
    value = a^2 / (2b) if b > 0 else inf (non-convex direction: no certificate);
    passes iff value < ci_half_width.

    **Invariants**: invariant under rescaling d (a -> c a, b -> c^2 b) (``test_predicted_improvement_direction_scale_invariant``).
    """
    if not ci_half_width >= 0:
        raise ValueError("ci_half_width must be >= 0")
    value = a * a / (2.0 * b) if (b > 0 and math.isfinite(a) and math.isfinite(b)) else math.inf
    return Criterion("predicted_improvement", value, ci_half_width, value < ci_half_width)


def generation_drift(
    entropy: float, base_entropy: float, repetition: float, base_repetition: float,
    tolerance: float = DEFAULT_DRIFT_TOLERANCE,
) -> Criterion:
    """Criterion 3: generations have not drifted from the base model's.

    **Source**: seed row 9 (token entropy and 4-gram repetition of generations vs base).

    value = max(|H / H_base - 1|, rep - rep_base), H the mean token entropy of sampled
    generations and rep their 4-gram repetition rate in [0, 1]; passes iff value <= tolerance
    (a convention, default 0.1).

    **Invariants**: identical statistics pass (``test_generation_drift_identity_passes``).
    """
    if not base_entropy > 0:
        raise ValueError("base_entropy must be > 0")
    value = max(abs(entropy / base_entropy - 1.0), repetition - base_repetition)
    return Criterion("generation_drift", value, tolerance, value <= tolerance)


def validation_stability(val_losses: Sequence[float], window: int, z: float = DEFAULT_Z) -> Criterion:
    """Criterion 4: validation loss is stable (two-window mean test).

    **Source**: seed row 9; SEED-SPEC.

    value = |mean(w2) - mean(w1)| of the validation losses, threshold = z * SE.

    **Invariants**: ``test_two_window_shift_invariant``.
    """
    value, threshold = two_window_test(val_losses, window, z)
    return Criterion("validation_stability", value, threshold, value <= threshold)


def stopping_certificate(*criteria: Criterion, validation_fell: bool = False) -> StoppingCertificate:
    """Combine criteria: the certificate holds iff every criterion passed and validation loss
    did not fall in the current epoch ("never stop in an epoch where validation loss fell").

    **Source**: seed row 9; SEED-SPEC.

    **Invariants**: satisfied implies every criterion passed (``test_certificate_all_passed``).
    """
    if not criteria:
        raise ValueError("stopping_certificate needs at least one criterion")
    crit = tuple(criteria)
    if validation_fell:
        crit = crit + (Criterion("validation_not_falling", 1.0, 0.0, False),)
    return StoppingCertificate(criteria=crit, satisfied=all(c.passed for c in crit))
