"""The reading of the seed that a derived step applies to S (rows 4 and 10).

A reading is a small object the per-backend updates call for every adapter; the frames' Cayley
step and the MASS step size are shared by every reading. Each backend evaluates ``s_step`` on
its own arrays (written against the array API: torch in place of the adapters, MLX eagerly,
JAX inside its compiled update).
"""

from __future__ import annotations

from dataclasses import dataclass

from geometry._xp import namespace


@dataclass(frozen=True)
class ProjectedDecayS:
    """trainer=derived: S <- clamp(S - eta grad_S, 0, sigma_k / c) * (1 - eta sigma_k / sigma_max).

    The clamp keeps ||c U diag(S) V^T||_2 = c max(S) <= sigma_k (row 10, Weyl's bound with the
    block's residual scale c folded in); the factor is the decoupled decay of row 4."""

    name: str = "derived"

    @staticmethod
    def bounds(spec) -> tuple[float, float]:
        """(upper bound of S, decay rate) of one adapter."""
        return spec.sigma_k / spec.scale, spec.decay

    @staticmethod
    def s_step(s, grad_s, eta, upper, decay):
        xp = namespace(s)
        return xp.clip(s - eta * grad_s, min=0.0, max=upper) * (1.0 - eta * decay)


READINGS = {"derived": ProjectedDecayS()}


def reading(name: str = "derived"):
    """The S rule of the named reading."""
    try:
        return READINGS[name]
    except KeyError:
        raise ValueError(f"unknown derived reading {name!r}; choose from {sorted(READINGS)}") \
            from None
