"""MASS step size (derivation 1): eta_t = min(eta_ceil, eta_sps, eta_weyl).

``mass_step_size`` runs every training step on the training device: it accepts the loss and the
gradient norm as 0-d arrays (or Python floats) and does its arithmetic in their namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from geometry._xp import as_array, device, namespace, to_float
from geometry.provenance import Derived

MASS_SOURCE = (
    "Weyl (1912) perturbation bound; Loizou et al. (2021) stochastic Polyak step (SPS), AISTATS; "
    "seed README row 1"
)


def mass_ceiling(sigma_k_min: float, sigma_max: float, batches_per_epoch: int) -> Derived:
    """The MASS ceiling: the largest step the derived trainer ever takes.

    **Source**: the seed's rule (README row 1); Weyl (1912) motivates sigma_k / sigma_max.

    eta_ceil = sigma_k,min / (sigma_max * sqrt(N)),  N = batches per epoch (fixed at init).

    **Invariants**: invariant under a common rescaling of all weights
    (``test_mass_ceiling_scale_invariant``); 0 < eta_ceil <= 1 (``test_mass_ceiling_bounds``).
    """
    if not (math.isfinite(sigma_k_min) and math.isfinite(sigma_max)):
        raise ValueError("sigma_k_min and sigma_max must be finite")
    if not 0 < sigma_k_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_k_min <= sigma_max (got {sigma_k_min}, {sigma_max})")
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1 (got {batches_per_epoch})")
    value = sigma_k_min / (sigma_max * math.sqrt(batches_per_epoch))
    return Derived(
        name="learning_rate",
        value=value,
        formula="eta_t = min(eta_ceil, (f_t - f*)/max(||g_t||^2, floor), sigma_k,min/max(||g_t||, sqrt(floor))); "
        "eta_ceil = sigma_k,min / (sigma_max * sqrt(N))",
        inputs={"sigma_k_min": sigma_k_min, "sigma_max": sigma_max, "batches_per_epoch": batches_per_epoch},
        source=MASS_SOURCE,
    )


@dataclass(frozen=True)
class MassStep:
    """One MASS step: the step size, which term bound it, and the three candidate values.

    ``step``, ``sps`` and ``weyl`` are 0-d arrays on the training device when the inputs were
    arrays, else Python floats.
    """

    step: Any
    bound: Literal["ceiling", "sps", "weyl"]
    ceiling: float
    sps: Any
    weyl: Any


_BOUNDS: tuple[Literal["ceiling", "sps", "weyl"], ...] = ("ceiling", "sps", "weyl")


def mass_step_size(loss, grad_norm, sigma_k_min: float, ceiling: float, floor: float) -> MassStep:
    """MASS step size for one step, computed on the device that holds ``loss``/``grad_norm``.

    **Source**: seed README row 1; Loizou, Vaswani, Laradji & Lacoste-Julien (2021),
    "Stochastic Polyak step-size for SGD", eq. (5) with f* = 0 (cross-entropy is >= 0);
    Weyl (1912): a step of spectral size eta ||g|| <= sigma_k moves no singular value of the
    adapted weight by more than sigma_k.

    eta_sps = max(f_t - f*, 0) / max(||g||^2, floor),  eta_weyl = sigma_k,min / max(||g||, sqrt(floor)),
    eta = min(eta_ceil, eta_sps, eta_weyl); if ||g|| is non-finite or zero (or the loss is
    non-finite), eta = eta_ceil. A negative loss is clamped to 0 (f* = 0 is a lower bound).
    ``floor`` is derivation 2 (the epsilon replacement): it only guards the denominators.

    **Invariants**: eta <= eta_ceil always (``test_mass_step_never_exceeds_ceiling``);
    eta * ||g|| <= sigma_k,min whenever ||g|| is finite and positive (``test_mass_step_weyl_bound``);
    zero or non-finite gradient norms fall back to the ceiling (``test_mass_step_fallback``).
    """
    if not (ceiling > 0 and math.isfinite(ceiling)):
        raise ValueError(f"ceiling must be finite and > 0 (got {ceiling})")
    if not (sigma_k_min > 0 and math.isfinite(sigma_k_min)):
        raise ValueError(f"sigma_k_min must be finite and > 0 (got {sigma_k_min})")
    if not floor >= 0:
        raise ValueError(f"floor must be >= 0 (got {floor})")
    host = not (hasattr(loss, "shape") or hasattr(grad_norm, "shape"))
    ref = grad_norm if hasattr(grad_norm, "shape") else as_array(loss)
    xp = namespace(ref)

    def on_device(v):
        if hasattr(v, "shape"):
            return v
        return xp.asarray(float(v), dtype=ref.dtype, device=device(ref))

    g, f = on_device(grad_norm), on_device(loss)
    ok = xp.isfinite(g) & (g > 0) & xp.isfinite(f)
    g_safe = xp.where(ok, g, xp.ones_like(g))
    f_pos = xp.clip(xp.where(ok, f, xp.zeros_like(f)), min=0.0)
    sps = f_pos / xp.clip(g_safe * g_safe, min=floor)
    weyl = sigma_k_min / xp.clip(g_safe, min=math.sqrt(floor))
    ceil = xp.full_like(g, ceiling)
    cands = xp.stack([ceil, sps, weyl])
    idx = xp.where(ok, xp.argmin(cands), xp.zeros_like(xp.argmin(cands)))
    step = xp.where(ok, xp.min(cands), ceil)
    bound = _BOUNDS[int(idx)]  # one host sync: the binding term is logged every step
    if host:
        return MassStep(step=to_float(step), bound=bound, ceiling=ceiling, sps=to_float(sps), weyl=to_float(weyl))
    return MassStep(step=step, bound=bound, ceiling=ceiling, sps=sps, weyl=weyl)
