"""Intrinsic dimension of a point cloud (hidden states of one layer) from nearest-neighbour
distances: TwoNN with a bootstrap interval, and the Levina-Bickel MLE as a cross-check.

Both estimators read only ratios of distances to a point's nearest neighbours, so they are
invariant under rotation, translation and global scaling of the cloud.

Duplicates. A repeated point has a first-neighbour distance of zero, and log(r2 / r1) is then
infinite: both estimators first keep one copy of every group of coinciding points (the copy with
the lowest index) and report how many were dropped. Two points coincide when their squared
distance is at most ``DUPLICATE_RTOL * (|x_i|^2 + |x_j|^2)`` after centring the cloud: 1e-12 on
squared distances is a distance 1e-6 times the points' norm, below what float32 hidden states
(resolution 2^-23 ~ 1.2e-7 per coordinate, summed over the coordinates) can tell apart, and far
above the float64 rounding of the Gram-matrix distances below.

Distances come from the Gram matrix, d_ij^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j, in float64 after
centring (centring removes the translation from the rounding error). Its relative rounding error
is about eps64 (|x_i|^2 + |x_j|^2) / d_ij^2, at most 2.2e-16 / 1e-12 ~ 2e-4 at the duplicate
threshold and far less for the neighbour distances of real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from geometry._xp import Array, device, namespace, require_matrix, to_float, to_work

DUPLICATE_RTOL = 1e-12  # squared distance, relative to |x_i|^2 + |x_j|^2 (see the module docstring)
LEVINA_BICKEL_K = 20  # Levina & Bickel (2004) report stable estimates for k of 10 to 20


@dataclass(frozen=True)
class NeighbourDistances:
    """Sorted distances from every distinct point to its ``k`` nearest other points.

    ``r`` is (m, k), ascending along each row; ``n_duplicates`` points of the input were
    dropped as copies of an earlier point (m = n - n_duplicates).
    """

    r: Array
    n_duplicates: int


@dataclass(frozen=True)
class TwoNNEstimate:
    """TwoNN dimension with its percentile bootstrap interval."""

    d: float
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    n_points: int  # distinct points used
    n_duplicates: int


def neighbour_distances(points: Array, k: int) -> NeighbourDistances:
    """Distances from each distinct point of ``points`` (n x D) to its k nearest others.

    **Source**: the Gram-matrix form of Euclidean distances; duplicates as in the module
    docstring.

    **Invariants**: rows ascending and positive (``test_neighbour_distances_sorted_positive``);
    a repeated point is kept once (``test_duplicates_dropped``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    d2 = _distinct_squared_distances(points)
    n, m = points.shape[0], d2.shape[0]
    if m < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} distinct points (got {m} of {n})")
    xp = namespace(d2)
    self_pairs = xp.eye(m, dtype=d2.dtype, device=device(d2)) > 0
    d2 = xp.where(self_pairs, xp.full_like(d2, math.inf), d2)
    r = xp.sqrt(xp.sort(d2, axis=1)[:, :k])
    return NeighbourDistances(r=r, n_duplicates=n - m)


def count_distinct(points: Array) -> int:
    """How many points remain once coinciding points are kept once (module docstring)."""
    return _distinct_squared_distances(points).shape[0]


def _distinct_squared_distances(points: Array) -> Array:
    """(m x m) squared distances among the distinct points (the first copy of each)."""
    require_matrix(points, "points")
    xp = namespace(points)
    x = to_work(points)
    x = x - xp.mean(x, axis=0)[None, :]
    sq = xp.sum(x * x, axis=1)
    d2 = xp.clip(sq[:, None] + sq[None, :] - 2.0 * (x @ x.mT), min=0.0)
    idx = xp.arange(x.shape[0], device=device(x))
    same = d2 <= DUPLICATE_RTOL * (sq[:, None] + sq[None, :])
    keep = ~xp.any(same & (idx[None, :] < idx[:, None]), axis=1)  # no earlier copy
    kept = xp.nonzero(keep)[0]
    return xp.take(xp.take(d2, kept, axis=0), kept, axis=1)


def twonn_log_ratios(dist: NeighbourDistances) -> Array:
    """log(mu_i) = log(r2_i / r1_i) for every distinct point (the TwoNN statistic)."""
    if dist.r.shape[1] < 2:
        raise ValueError("TwoNN needs the first two neighbour distances (k >= 2)")
    xp = namespace(dist.r)
    return xp.log(dist.r[:, 1] / dist.r[:, 0])


def twonn_dimension(points: Array) -> float:
    """TwoNN intrinsic dimension, maximum-likelihood form.

    **Source**: Facco, d'Errico, Rodriguez & Laio (2017), "Estimating the intrinsic dimension of
    datasets by a minimal neighborhood information", Sci. Rep. 7, 12140: for locally uniform
    density mu = r2 / r1 is Pareto with f(mu) = d mu^(-d-1), mu >= 1, independently of the
    density. The likelihood of N ratios gives d = N / sum log mu_i; we use the unbiased
    (N - 1) / sum log mu_i (sum log mu ~ Gamma(N, d), so E[1 / sum] = d / (N - 1)). The paper's
    linear fit with 10% of the largest mu discarded is `geometry.twonn_intrinsic_dimension`;
    the MLE needs no discard convention and has a sampling distribution the bootstrap reads.

        d = (N - 1) / sum_i log(r2_i / r1_i)

    **Invariants**: about d for points on a d-dimensional subspace or d-sphere in R^D
    (``test_twonn_linear_subspace``, ``test_twonn_sphere``); invariant under rotation,
    translation and scaling (``test_twonn_similarity_invariant``); duplicates do not change it
    (``test_duplicates_dropped``).
    """
    return _twonn_from_log_ratios(twonn_log_ratios(neighbour_distances(points, 2)))


def _twonn_from_log_ratios(log_mu: Array) -> float:
    xp = namespace(log_mu)
    total = to_float(xp.sum(log_mu))
    if total <= 0.0:
        raise ValueError("every second-to-first neighbour ratio is 1 (a lattice or ties): "
                         "TwoNN is undefined")
    return (log_mu.shape[0] - 1) / total


def twonn_estimate(points: Array, draws: Array, confidence: float = 0.95) -> TwoNNEstimate:
    """TwoNN dimension with a percentile bootstrap interval over the points' ratios.

    **Source**: Facco et al. (2017) as in :func:`twonn_dimension`; percentile bootstrap (Efron
    & Tibshirani 1993, ch. 13). The ratios mu_i, not the points, are resampled: resampling
    points would create duplicates (zero distances) and change every neighbour.

    ``draws`` (B x n, uniform in [0, 1), from the caller's seeded generator) pick the
    resamples: resample b takes the ratios at floor(draws[b, :m] * m), m = distinct points.
    The interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles (linear
    interpolation, numpy's default) of the B resampled estimates.

    **Invariants**: ci_low <= d <= ci_high for a symmetric enough resample distribution, and
    the interval agrees with the exact Gamma interval of the Pareto model
    (``test_twonn_interval_matches_gamma``).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    require_matrix(draws, "draws")
    dist = neighbour_distances(points, 2)
    log_mu = twonn_log_ratios(dist)
    m = log_mu.shape[0]
    if draws.shape[1] < m:
        raise ValueError(f"draws needs at least {m} columns (got {draws.shape[1]})")
    xp = namespace(log_mu)
    u = xp.asarray(draws[:, :m], dtype=log_mu.dtype, device=device(log_mu))
    index = xp.astype(xp.clip(xp.floor(u * m), max=m - 1), xp.int64)
    resampled = xp.reshape(xp.take(log_mu, xp.reshape(index, (-1,)), axis=0), index.shape)
    estimates = xp.sort((m - 1) / xp.sum(resampled, axis=1))
    tail = (1.0 - confidence) / 2.0
    return TwoNNEstimate(
        d=_twonn_from_log_ratios(log_mu), ci_low=_quantile(estimates, tail),
        ci_high=_quantile(estimates, 1.0 - tail), confidence=confidence,
        resamples=draws.shape[0], n_points=m, n_duplicates=dist.n_duplicates)


def _quantile(sorted_values: Array, q: float) -> float:
    """numpy's default ("linear") quantile of an ascending 1-D array."""
    pos = q * (sorted_values.shape[0] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, sorted_values.shape[0] - 1)
    a, b = to_float(sorted_values[lo]), to_float(sorted_values[hi])
    return a + (pos - lo) * (b - a)


def levina_bickel_dimension(points: Array, k: int = LEVINA_BICKEL_K) -> float:
    """Levina-Bickel maximum-likelihood dimension with the MacKay-Ghahramani correction.

    **Source**: Levina & Bickel (2004), "Maximum likelihood estimation of intrinsic dimension",
    NIPS 17, eq. (8): the local estimate at x from its k nearest distances T_1 <= ... <= T_k is
    m_k(x) = [1/(k-1) sum_{j<k} log(T_k / T_j)]^(-1). MacKay & Ghahramani (2005, "Comments on
    'Maximum likelihood estimation of intrinsic dimension'") show that averaging m_k(x) over
    points is biased upward, and that the likelihood of all points averages the inverses:

        d = [ 1/(N (k-1)) sum_i sum_{j<k} log(T_k(x_i) / T_j(x_i)) ]^(-1)

    **Invariants**: about d for points on a d-dimensional subspace or d-sphere in R^D
    (``test_levina_bickel_linear_subspace``, ``test_levina_bickel_sphere``); invariant under
    rotation, translation and scaling (``test_levina_bickel_similarity_invariant``).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 (got {k})")
    dist = neighbour_distances(points, k)
    xp = namespace(dist.r)
    logs = xp.log(dist.r[:, k - 1:k] / dist.r[:, : k - 1])  # (m, k-1)
    mean = to_float(xp.mean(logs))
    if mean <= 0.0:
        raise ValueError(f"the k = {k} nearest distances of every point are equal: the MLE is "
                         "undefined")
    return 1.0 / mean
