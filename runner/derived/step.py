"""The readings of the seed a derived run can train (docs/derivations.md, "Readings").

A reading is a small frozen object that the shared set-up, trainer and per-backend updates ask
what differs: whether the adapter carries the block's residual scale c, the box S is projected
onto, where the adapter starts, and whether MASS gives every matrix its own step. The frames'
Cayley step, the certificate, checkpoints and export are shared by every reading. Each backend
evaluates ``s_step`` on its own arrays (written against the array API: torch in place of the
adapters, MLX eagerly, JAX inside its compiled update).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from geometry._xp import namespace
from geometry.readings import project_sign_free


class Start(str, Enum):
    zero = "zero"  # U, V at W's tail directions, S = 0: the model is unchanged (row 14)
    tail = "tail"  # W = W_res + U_t diag(a) V_t^T, the adapter starts at (U_t, a, V_t)
    nb_lora = "nb_lora"  # the seed code's free parameters A~, B~ ~ N(0, 0.01^2), S_raw = bound/2


@dataclass(frozen=True)
class Reading:
    """What one named trainer reads differently from ``derived`` (every field fixed per name).

    ``scaled``: the adapter is c U diag(S) V^T (``derived``) or U diag(S~) V^T with S~ = c S;
    ``sign_free``: S~ is projected onto |S~| <= bound instead of [0, bound];
    ``start``: :class:`Start`; ``per_matrix_mass``: MASS per matrix with N the run's steps."""

    name: str
    scaled: bool = True
    sign_free: bool = False
    start: Start = Start.zero
    per_matrix_mass: bool = False

    @property
    def nb_lora(self) -> bool:
        return self.start is Start.nb_lora

    def bounds(self, spec) -> tuple[float, float]:
        """(upper bound of S, decay rate) of one adapter: sigma_k / c for ``derived`` (c = 1
        for the S~ readings), the tail start's beta where the set-up stored one."""
        upper = spec.s_bound if spec.s_bound is not None else spec.sigma_k / spec.scale
        return upper, spec.decay

    def lower(self, upper):
        """The lower end of S's box (its at-bound telemetry counts both ends)."""
        return -upper if self.sign_free else 0.0 * upper

    def s_step(self, s, grad_s, eta, upper, decay):
        """S <- P(S - eta grad_S) (1 - eta decay), P the reading's projection (rows 4, 10)."""
        stepped = s - eta * grad_s
        if self.sign_free:
            return project_sign_free(stepped, upper, eta, decay).s
        xp = namespace(s)
        return xp.clip(stepped, min=0.0, max=upper) * (1.0 - eta * decay)


READINGS = {r.name: r for r in (
    # S <- clamp(S - eta grad_S, 0, sigma_k / c) (1 - eta sigma_k / sigma_max): the 15 rows.
    Reading("derived"),
    Reading("derived_uniform", scaled=False, sign_free=True),
    Reading("derived_tail_start", scaled=False, sign_free=True, start=Start.tail),
    Reading("derived_matched_mass", scaled=False, sign_free=True, start=Start.tail,
            per_matrix_mass=True),
    # NB-LoRA with plain SGD at the pooled MASS step, S_raw clamped to [0, sigma_k] (c = 1).
    Reading("derived_seed_code", scaled=False, start=Start.nb_lora),
)}


def is_derived(name: str) -> bool:
    """Whether trainer ``name`` is a reading of the derived trainer."""
    return name in READINGS


def reading(name: str = "derived") -> Reading:
    """The named reading."""
    try:
        return READINGS[name]
    except KeyError:
        raise ValueError(f"unknown derived reading {name!r}; choose from {sorted(READINGS)}") \
            from None
