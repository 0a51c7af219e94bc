"""Gradient noise scale (derivation 8): the critical batch size B_crit ~ tr(Sigma) / ||G||^2."""

from __future__ import annotations

import math
from dataclasses import dataclass

NOISE_SCALE_SOURCE = (
    "McCandlish, Kaplan, Amodei & OpenAI Dota Team (2018), 'An empirical model of large-batch "
    "training', arXiv:1812.06162, eq. (2.8) and Appendix A.1"
)


@dataclass(frozen=True)
class NoiseScale:
    """Both estimates of the gradient noise scale and the batch size derived from them.

    g2: unbiased estimate of ||G||^2; trace_sigma: of tr(Sigma) (per-example covariance);
    b_simple = trace_sigma / g2 (inf when g2 <= 0); b_crit: b_simple rounded and clamped to
    [1, min(n_train, b_max)]; b_biased: the seed's per-sample estimate when supplied (else nan).
    """

    g2: float
    trace_sigma: float
    b_simple: float
    b_crit: int
    b_small: int
    b_big: int
    n_train: int
    b_biased: float = math.nan


def gradient_noise_scale(
    g_small_sq: float, g_big_sq: float, b_small: int, b_big: int, *, n_train: int,
    b_biased: float = math.nan, b_max: int | None = None,
) -> NoiseScale:
    """Unbiased two-batch-size estimate of the simple noise scale and the clamped batch size.

    **Source**: McCandlish et al. (2018), Appendix A.1: E||G_B||^2 = ||G||^2 + tr(Sigma)/B, so two
    batch sizes give unbiased estimates of both terms.

    ||G||^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small),
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big),
    B_simple = tr(Sigma) / ||G||^2,  B_crit = clamp(round(B_simple), 1, n_train).
    If the ||G||^2 estimate is <= 0 (signal below the noise) B_simple = inf and B_crit = n_train;
    if tr(Sigma) <= 0 (no measurable noise) B_crit = 1. ``b_max`` (default n_train) caps B_crit
    at the largest batch size the measurement resolves: with gradients measured at batch sizes
    up to b_big, a noise scale well above b_big is indistinguishable from +inf.

    **Invariants**: exact on noise-free expectations E|G_B|^2 = g2 + tr/B
    (``test_noise_scale_recovers_planted``); 1 <= B_crit <= n_train (``test_noise_scale_clamped``);
    invariant under a common rescaling of the gradients (``test_noise_scale_scale_invariant``).
    """
    if not (1 <= b_small < b_big):
        raise ValueError(f"need 1 <= b_small < b_big (got {b_small}, {b_big})")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1 (got {n_train})")
    cap = n_train if b_max is None else min(n_train, b_max)
    if cap < 1:
        raise ValueError(f"b_max must be >= 1 (got {b_max})")
    if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)) or g_small_sq < 0 or g_big_sq < 0:
        raise ValueError("squared gradient norms must be finite and >= 0")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    if trace <= 0:
        b_simple, b_crit = (0.0 if g2 > 0 else math.nan), 1
    elif g2 <= 0:
        b_simple, b_crit = math.inf, cap
    else:
        b_simple = trace / g2
        b_crit = int(min(max(round(b_simple), 1), cap))
    return NoiseScale(
        g2=g2, trace_sigma=trace, b_simple=b_simple, b_crit=b_crit, b_small=b_small, b_big=b_big,
        n_train=n_train, b_biased=b_biased,
    )


def per_sample_noise_scale(mean_sample_sq: float, mean_grad_sq: float, n: int) -> float:
    """The seed's estimate from n per-sample gradients (recorded beside the unbiased one).

    **Source**: seed (SEED-SPEC row 8); biased because E||g_bar||^2 = ||G||^2 + tr(Sigma)/n.

    tr(Sigma) ~ n/(n-1) (mean_i ||g_i||^2 - ||g_bar||^2),  B = tr(Sigma) / ||g_bar||^2
    (so B <= n/(n-1) * (mean||g_i||^2/||g_bar||^2 - 1) and cannot much exceed n for noise-dominated
    gradients, since then ||g_bar||^2 ~ tr(Sigma)/n).

    **Invariants**: invariant under a common rescaling (``test_per_sample_noise_scale_scale_invariant``).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (got {n})")
    if not mean_grad_sq > 0:
        raise ValueError("mean_grad_sq must be > 0")
    trace = n / (n - 1) * (mean_sample_sq - mean_grad_sq)
    return trace / mean_grad_sq
