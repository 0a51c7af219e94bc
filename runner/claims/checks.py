"""Checks for `by_construction` claims: small computations, no training.

A check is a function `seed -> CheckResult(value, expected)`, registered by name with
`@register_check("name")`; a claim names it in `check:` and states the float tolerance. The
claim is PROVEN when |value - expected| <= tolerance for every seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geometry import cka


@dataclass(frozen=True)
class CheckResult:
    value: float
    expected: float
    detail: str = ""

    @property
    def abs_error(self) -> float:
        return abs(self.value - self.expected)


CheckFn = Callable[[int], CheckResult]
CHECKS: dict[str, CheckFn] = {}


def register_check(name: str) -> Callable[[CheckFn], CheckFn]:
    def decorate(fn: CheckFn) -> CheckFn:
        CHECKS[name] = fn
        return fn
    return decorate


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019, eq. 3) of activations x (n, d1) and y (n, d2).

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred. Invariant to
    orthogonal transforms and isotropic scaling of either argument; CKA(x, x) = 1.
    """
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    cross = np.linalg.norm(yc.T @ xc) ** 2
    return float(cross / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


@register_check("procrustes_cka_in_sample")
def procrustes_cka_in_sample(seed: int) -> CheckResult:
    """CKA(X·F, Y) for the least-squares map F = pinv(X)·Y fitted on the same probes.

    X (n, d) random probes, Y = X·R + noise with R a random rotation. With n <= d, X has full
    row rank, so X·pinv(X) = I_n and X·F = Y exactly: CKA = 1 up to float64 rounding. This is
    the seed's "CKA = 1.0 by construction" (in-sample fit); it says nothing about held-out
    probes.
    """
    rng = np.random.default_rng(seed)
    n, d = 32, 64  # n <= d: the fit interpolates the probes (the seed's setting)
    x = rng.standard_normal((n, d))
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    y = x @ rotation + 0.1 * rng.standard_normal((n, d))
    fit = np.linalg.pinv(x) @ y
    return CheckResult(cka(x @ fit, y), 1.0, f"n={n} probes, d={d}, noise sd 0.1")
