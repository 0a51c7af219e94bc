"""The math of the derived trainer's named readings (docs/derivations.md, "Readings").

Each reading changes one part of the ``derived`` trainer and has no tunable knob:

- ``derived_uniform``: the adapter is dW = U diag(S~) V^T with S~ = c S, so a step moves dW by the
  same amount in every block, and S~ is projected onto the sign-free box |S~| <= sigma_k
  (:func:`project_sign_free`).
- ``derived_tail_start``: part of W's tail moves into the adapter at step 0, so the frames have a
  gradient from the first step and the model is unchanged (:func:`tail_start`,
  :func:`residual_weight`, :func:`tail_start_peft_factors`).
- ``derived_seed_code``: the NB-LoRA parametrisation the seed's code trained
  (:func:`nb_lora_factors`, :func:`nb_lora_init`, :func:`nb_lora_delta`).
- ``derived_matched_mass``: MASS per matrix, with N the optimiser steps of the run
  (:func:`matched_steps`, :func:`per_matrix_mass_ceiling`, :func:`per_matrix_mass_step`).

and step telemetry common to all (:func:`adapter_step_telemetry`, :func:`effective_delta_steps`).

Notation: W is m x n (out x in) with singular values s_1 >= ... >= s_q; k its structural rank,
sigma_k = s_k, sigma_max = s_1; r the adapter rank. Every function stays in its inputs'
namespace, dtype and device (several run every training step); arguments that are Python floats
are validated, 0-d arrays are not (that would cost a host transfer per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from geometry._xp import (
    Array,
    as_array,
    device,
    namespace,
    require_matrix,
    require_vector,
    to_float,
)

# ---------------------------------------------------------------------------------------------
# derived_uniform: sign-free S~ = c S, |S~| <= sigma_k
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectedValues:
    """An adapter's singular values after projection and decay.

    ``s``: the new values (r,); ``at_bound``: 0-d array, the fraction of entries the projection
    set to a bound (before the decay moved them inside), the telemetry of a pinned direction.
    """

    s: Array
    at_bound: Array


def project_sign_free(s: Array, bound, eta, decay) -> ProjectedValues:
    """Project an adapter's singular values onto the sign-free box |S~| <= bound, then decay.

    **Source**: Weyl (1912): |s_i(W + E) - s_i(W)| <= ||E||_2, so the guarantee of the seed's
    row 10 ("spectral bound sigma_k(W) / ||BA||") needs ||E||_2 <= sigma_k, i.e. |S~_i| <= sigma_k
    for E = U diag(S~) V^T with orthonormal U, V; it does not need S~ >= 0. Row 4 (decoupled
    shrinkage at the rate lambda = sigma_k / sigma_max).

    S~ <- clip(S~, -bound, bound) (1 - eta lambda),  lambda = ``decay``,
    at_bound = mean(|S~ before the clip| >= bound).

    With the adapter written as U diag(S~) V^T (S~ = c S, c the block's residual scale), a step
    eta on S~ moves dW by eta U diag(g_S~) V^T with g_S~ = diag(U^T G V) (G = dL/dW): the same map
    in every block, where the step on S of ``derived`` moves dW by eta c^2 U diag(U^T G V) V^T.

    Requires 0 <= eta lambda <= 1 (MASS gives eta <= 1 and lambda = sigma_k/sigma_max <= 1).

    **Invariants**: |S~| <= bound after the step (``test_sign_free_within_bound``); negative
    values are kept, not pinned at 0 (``test_sign_free_keeps_sign``); a value inside the box is
    only decayed (``test_sign_free_interior_only_decays``); at_bound counts the clipped entries
    (``test_sign_free_at_bound_fraction``).
    """
    require_vector(s, "s")
    _check_rate(bound=bound, eta=eta, decay=decay)
    xp = namespace(s)
    at_bound = xp.mean(xp.astype(xp.abs(s) >= bound, s.dtype))
    return ProjectedValues(s=xp.clip(s, -bound, bound) * (1.0 - eta * decay), at_bound=at_bound)


def _check_rate(*, bound, eta, decay) -> None:
    if isinstance(bound, float | int) and not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be finite and > 0 (got {bound})")
    if isinstance(eta, float | int) and isinstance(decay, float | int) and not 0 <= eta * decay <= 1:
        raise ValueError(f"need 0 <= eta * decay <= 1 (got eta={eta}, decay={decay})")


# ---------------------------------------------------------------------------------------------
# derived_tail_start: W = W_res + U_t diag(a) V_t^T, the adapter starts at (U_t, a, V_t)
# ---------------------------------------------------------------------------------------------

TAIL_START_FRACTION = 1.0 / 3.0  # a <= sigma_k/3 puts the start at half the box 2 sigma_k/3


@dataclass(frozen=True)
class TailStart:
    """The start of ``derived_tail_start`` for one matrix.

    ``start``: a (r,), the adapter's initial singular values, moved out of W into the adapter;
    ``bound``: beta = sigma_k - max(a), the box |S~| <= beta that certifies the Weyl bound.
    """

    start: Array
    bound: float


def tail_start(s_tail: Array, sigma_k: float) -> TailStart:
    """The part of W's tail that moves into the adapter at step 0, and the box that keeps the
    real change of W within Weyl's bound for any motion of the frames.

    **Source**: MiLoRA (Wang et al. 2024, arXiv 2406.09044) trains W's minor singular components
    starting from their own values, PiSSA (Meng et al. 2024, arXiv 2404.02948) the principal
    ones, both with W_res = W - (those components) frozen, so the model is unchanged at step 0;
    the seed's code starts its adapter at S = 0.5 bound; Weyl (1912).

    With U_t, V_t, s_t W's singular triplets k+1 .. k+r (so s_t <= sigma_k):
        a = min(s_t, sigma_k / 3),  beta = sigma_k - max(a)  (>= 2 sigma_k / 3),
        W = W_res + U_t diag(a) V_t^T,  the adapter U diag(S~) V^T starts at (U_t, a, V_t).

    Proof of the bound. The model's weight is W_res + U diag(S~) V^T, so the real change is
    E = U diag(S~) V^T - U_t diag(a) V_t^T. For orthonormal U, V, U_t, V_t,
        ||E||_2 <= ||U diag(S~) V^T||_2 + ||U_t diag(a) V_t^T||_2 = max|S~| + max(a) <= beta + max(a) = sigma_k,
    whatever the frames do: no per-step spectral norm is needed. It is tight: U = U_t, V = V_t,
    S~_i = -beta at the index of max(a) gives ||E||_2 = sigma_k. The start a <= sigma_k/3 <= beta/2
    lies inside the box, at half of it where s_t >= sigma_k/3: the seed code's S_0 = 0.5 bound.

    Why not the alternatives. a = s_t (MiLoRA's exact split) leaves beta = sigma_k - s_{k+1}, the
    gap below the structural rank, which is near 0 on smooth spectra, and the start s_t lies
    outside it. a = beta = sigma_k/2 certifies too, but puts the start on the bound, where the
    clip pins every entry whose gradient points outward: the degeneracy of ``derived`` again.

    The frames' gradients at step 0 are dL/dU = G V_t diag(a) and dL/dV = G^T U_t diag(a)
    (G = dL/dW), non-zero wherever a is.

    **Invariants**: 0 <= a <= beta/2 and beta + max(a) = sigma_k (``test_tail_start_in_box``);
    the real change satisfies ||E||_2 <= sigma_k for any frames and any S~ in the box, checked by
    numpy's spectral norm (``test_tail_start_weyl_bound_on_real_change``); the bound is attained
    (``test_tail_start_bound_is_tight``); the model is unchanged at step 0
    (``test_tail_start_model_unchanged``).
    """
    require_vector(s_tail, "s_tail")
    if not (math.isfinite(sigma_k) and sigma_k > 0):
        raise ValueError(f"sigma_k must be finite and > 0 (got {sigma_k})")
    xp = namespace(s_tail)
    if to_float(xp.min(s_tail)) < 0:
        raise ValueError("s_tail must be >= 0 (singular values)")
    start = xp.clip(s_tail, max=TAIL_START_FRACTION * sigma_k)
    return TailStart(start=start, bound=sigma_k - to_float(xp.max(start)))


def residual_weight(w: Array, u_t: Array, start: Array, v_t: Array) -> Array:
    """The frozen part W_res = W - U_t diag(a) V_t^T of ``derived_tail_start``.

    **Source**: MiLoRA (Wang et al. 2024), section 3; PiSSA (Meng et al. 2024), eq. (3).

    **Invariants**: W_res + U_t diag(a) V_t^T = W (``test_tail_start_model_unchanged``).
    """
    require_matrix(w, "w")
    return w - (u_t * start) @ v_t.mT


def tail_start_peft_factors(u: Array, s: Array, v: Array, u_t: Array, start: Array,
                            v_t: Array) -> tuple[Array, Array]:
    """PEFT LoRA factors (lora_B, lora_A) of the real change against the original W.

    **Source**: the decomposition of :func:`tail_start`; PEFT LoRA computes W + lora_B lora_A at
    scaling 1 (lora_alpha = rank).

    E = U diag(S~) V^T - U_t diag(a) V_t^T = B A,  B = [U diag(S~), -U_t diag(a)] (m x 2r),
    A = [V^T; V_t^T] (2r x n): rank <= 2r, so the module's PEFT rank is 2r.

    **Invariants**: B A equals the real change (``test_tail_start_peft_factors_reproduce_change``).
    """
    xp = namespace(u, s, v, u_t, start, v_t)
    b = xp.concat([u * s, -(u_t * start)], axis=1)
    a = xp.concat([v.mT, v_t.mT], axis=0)
    return b, a


# ---------------------------------------------------------------------------------------------
# derived_seed_code: the NB-LoRA parametrisation (Cayley of the stacked free parameters)
# ---------------------------------------------------------------------------------------------

NB_LORA_INIT_STD = 0.01  # the seed code's N(0, 0.01^2) for both free factors
NB_LORA_INIT_FRACTION = 0.5  # the seed code's S_0 = 0.5 bound


@dataclass(frozen=True)
class NbLoraFactors:
    """The adapter dW = 2 B^T diag(S) A of NB-LoRA: ``a`` (r x n_in), ``b`` (r x n_out), ``s`` (r,).

    [A^T; B^T] has orthonormal columns and 0 <= S <= bound.
    """

    a: Array
    b: Array
    s: Array


def nb_lora_factors(a_free: Array, b_free: Array, s_raw: Array, bound) -> NbLoraFactors:
    """The NB-LoRA map from free parameters to orthonormal factors and clipped singular values.

    **Source**: Wang, Dvijotham & Manchester (2025), "Norm-bounded low-rank adaptation",
    arXiv 2501.19050 (the seed's row 3 cites "Wang 2025"); its Cayley map of a stacked matrix.

    Q~ = [A~^T; B~^T] ((n_in + n_out) x r), X = its first r rows, Y = the rest,
        Z = (X - X^T) + Y^T Y,  Q = [(I - Z)(I + Z)^{-1}; -2 Y (I + Z)^{-1}],
    A = (first n_in rows of Q)^T, B = (the other n_out rows)^T, S = clip(S_raw, 0, bound).
    Q^T Q = I: with K = X - X^T (skew) and P = Y^T Y, (I - Z)^T (I - Z) + 4P = I + 2P + Z^T Z =
    (I + Z)^T (I + Z). I + Z is invertible because its symmetric part I + P is positive definite.
    Only an r x r inverse; plain array operations, so autodiff of every backend differentiates
    it (the gradient is zero in S_raw where the clip is active).

    The factor 2 of dW = 2 B^T diag(S) A costs nothing in the norm: M = Q diag(S) Q^T has
    eigenvalues in [0, max S], so M - (max S / 2) I has norm <= max S / 2, and B^T diag(S) A is an
    off-diagonal block of it: ||dW||_2 <= max S <= bound. bound = sigma_k gives Weyl's
    ||dW||_2 <= sigma_k; the bound is attained when a column of Q has equal mass in its A and
    B parts.

    **Invariants**: [A^T; B^T] has orthonormal columns for any input
    (``test_nb_lora_orthonormal_columns``); ||dW||_2 <= max S (``test_nb_lora_norm_bound``), and
    that bound is attained (``test_nb_lora_norm_bound_is_tight``); the torch autograd gradient
    matches finite differences (``test_nb_lora_gradient_matches_finite_differences``).
    """
    require_matrix(a_free, "a_free")
    require_matrix(b_free, "b_free")
    require_vector(s_raw, "s_raw")
    r, n_in = a_free.shape
    if b_free.shape[0] != r or s_raw.shape[0] != r:
        raise ValueError(f"a_free, b_free and s_raw must share r (got {a_free.shape[0]}, "
                         f"{b_free.shape[0]}, {s_raw.shape[0]})")
    if r > n_in + b_free.shape[1]:
        raise ValueError(f"need r <= n_in + n_out (got r={r}, {n_in} + {b_free.shape[1]})")
    xp = namespace(a_free, b_free, s_raw)
    y, z = nb_lora_generator(a_free, b_free)
    eye = xp.eye(r, dtype=z.dtype, device=device(z))
    inv = xp.linalg.inv(eye + z)
    q = xp.concat([(eye - z) @ inv, -2.0 * (y @ inv)], axis=0)
    return NbLoraFactors(a=q[:n_in, :].mT, b=q[n_in:, :].mT, s=xp.clip(s_raw, 0.0, bound))


def nb_lora_generator(a_free: Array, b_free: Array) -> tuple[Array, Array]:
    """(Y, Z) of the NB-LoRA map: Q~ = [A~^T; B~^T], X = its first r rows, Y = the rest
    ((n_in + n_out - r) x r), Z = (X - X^T) + Y^T Y (r x r); see :func:`nb_lora_factors`."""
    r = a_free.shape[0]
    xp = namespace(a_free, b_free)
    stacked = xp.concat([a_free.mT, b_free.mT], axis=0)  # (n_in + n_out, r)
    x, y = stacked[:r, :], stacked[r:, :]
    return y, (x - x.mT) + y.mT @ y


def nb_lora_delta(f: NbLoraFactors) -> Array:
    """dW = 2 B^T diag(S) A (n_out x n_in) of :func:`nb_lora_factors` (also its PEFT export:
    lora_B = 2 B^T diag(S), lora_A = A, scaling 1)."""
    return (2.0 * f.b.mT * f.s) @ f.a


def nb_lora_init(z_a: Array, z_b: Array, bound: float) -> tuple[Array, Array, Array]:
    """The seed code's start: A~, B~ ~ N(0, 0.01^2), S_raw = 0.5 bound.

    **Source**: the seed's code (ModelCypher README, as its public repository ran it).

    Takes standard-normal draws ``z_a`` (r x n_in) and ``z_b`` (r x n_out) from the caller's
    seeded generator; returns (A~, B~, S_raw) = (0.01 z_a, 0.01 z_b, 0.5 bound 1_r). dW is not
    zero at step 0: A~ small puts Q near [I_r; 0], so A starts near the first r input
    coordinates and, to first order in the 0.01 scale, dW = -4 (0.01 z_b)^T diag(S) [I_r, 0]
    (for n_in >= r).

    **Invariants**: S_raw = bound / 2 inside (0, bound) and ||dW||_2 <= bound / 2 at step 0
    (``test_nb_lora_init_halfway``).
    """
    require_matrix(z_a, "z_a")
    require_matrix(z_b, "z_b")
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be finite and > 0 (got {bound})")
    xp = namespace(z_a, z_b)
    s_raw = xp.full((z_a.shape[0],), NB_LORA_INIT_FRACTION * bound, dtype=z_a.dtype, device=device(z_a))
    return NB_LORA_INIT_STD * z_a, NB_LORA_INIT_STD * z_b, s_raw


# ---------------------------------------------------------------------------------------------
# derived_matched_mass: MASS per matrix, N = the optimiser steps of the run
# ---------------------------------------------------------------------------------------------

BINDING_TERMS: tuple[Literal["ceiling", "sps", "weyl"], ...] = ("ceiling", "sps", "weyl")


def matched_steps(token_budget: int, tokens_per_step: float) -> int:
    """N of the matched MASS ceiling: the optimiser steps the run's token budget allows.

    **Source**: the seed's N (batches per epoch) is the step count it trained for; a run that
    stops at a token budget trains for N = ceil(budget / tokens per step) steps.

    **Invariants**: N >= 1 and N tokens_per_step >= budget (``test_matched_steps_cover_budget``).
    """
    if token_budget < 1 or not (math.isfinite(tokens_per_step) and tokens_per_step > 0):
        raise ValueError(f"need token_budget >= 1 and tokens_per_step > 0 "
                         f"(got {token_budget}, {tokens_per_step})")
    return max(1, math.ceil(token_budget / tokens_per_step))


def per_matrix_mass_ceiling(sigma_k: Array, sigma_max: Array, n_steps: int) -> Array:
    """The MASS ceiling of each matrix from its own spectrum.

    **Source**: the seed's row 1 (eta_ceil = sigma_k / (sigma_max sqrt(N))), applied per matrix
    instead of pooling sigma_k,min of one matrix with sigma_max of another.

    eta_ceil,W = sigma_k,W / (sigma_max,W sqrt(N)),  N = :func:`matched_steps`.

    **Invariants**: each ceiling is scale invariant in its own matrix and lies in (0, 1]
    (``test_per_matrix_ceiling_scale_invariant_and_bounded``); with all matrices equal it is the
    global :func:`geometry.mass.mass_ceiling` (``test_per_matrix_reduces_to_global_rule``).
    """
    sigma_k, sigma_max = as_array(sigma_k), as_array(sigma_max)
    require_vector(sigma_k, "sigma_k")
    if tuple(sigma_max.shape) != tuple(sigma_k.shape):
        raise ValueError(f"sigma_max must have sigma_k's shape {tuple(sigma_k.shape)}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1 (got {n_steps})")
    xp = namespace(sigma_k, sigma_max)
    if not bool(xp.all((sigma_k > 0) & (sigma_k <= sigma_max) & xp.isfinite(sigma_max))):
        raise ValueError("need 0 < sigma_k <= sigma_max (finite) for every matrix")
    return sigma_k / (sigma_max * math.sqrt(n_steps))


@dataclass(frozen=True)
class PerMatrixMassStep:
    """One per-matrix MASS step.

    ``step``, ``ceiling``, ``weyl`` (M,) and ``sps`` (0-d) are arrays on the training device;
    ``binding`` (M,) indexes :data:`BINDING_TERMS`; ``counts`` says how many matrices each term
    bound.
    """

    step: Array
    binding: Array
    counts: dict[str, int]
    ceiling: Array
    sps: Array
    weyl: Array


def per_matrix_mass_step(loss, grad_norms: Array, sigma_k: Array, ceiling: Array, floors: Array,
                         sps_floor: float) -> PerMatrixMassStep:
    """MASS with a step per matrix: its own ceiling and Weyl term, the loss's one Polyak term.

    **Source**: the seed's row 1; Loizou et al. (2021), stochastic Polyak step, eq. (5) with
    f* = 0; Weyl (1912).

        eta_sps = max(f, 0) / max(||g||^2, sps_floor),  ||g||^2 = sum_W ||g_W||^2,
        eta_weyl,W = sigma_k,W / max(||g_W||, sqrt(floor_W)),
        eta_W = min(eta_ceil,W, eta_sps, eta_weyl,W);
    every eta_W = eta_ceil,W when the loss or ||g|| is non-finite or ||g|| = 0.

    The Polyak term stays global: it is a statement about the loss, and capping every eta_W by
    it keeps the step's predicted decrease sum_W eta_W ||g_W||^2 <= f (a per-matrix
    f / ||g_W||^2 would predict up to M times f). The Weyl term is per matrix because Weyl's
    bound is: a plain gradient step moves that matrix's adapter by at most eta_W ||g_W|| in
    spectral norm. ``floors`` are the per-layer floors of row 2, ``sps_floor`` the global one.

    **Invariants**: eta_W <= eta_ceil,W (``test_per_matrix_step_never_exceeds_ceiling``);
    eta_W ||g_W|| <= sigma_k,W (``test_per_matrix_step_weyl_bound``); the predicted decrease is
    at most f (``test_per_matrix_step_polyak_decrease``); one matrix gives exactly
    :func:`geometry.mass.mass_step_size` (``test_per_matrix_reduces_to_global_rule``);
    non-finite or zero gradients fall back to the ceilings (``test_per_matrix_step_fallback``).
    """
    grad_norms = as_array(grad_norms)
    require_vector(grad_norms, "grad_norms")
    if not sps_floor >= 0:
        raise ValueError(f"sps_floor must be >= 0 (got {sps_floor})")
    xp = namespace(grad_norms)
    dt, dev = grad_norms.dtype, device(grad_norms)

    def on_device(v):  # per-matrix constants may arrive as host arrays or floats
        if hasattr(v, "shape") and namespace(v) is xp:
            return v if v.dtype == dt else xp.astype(v, dt)
        return xp.asarray(as_array(v) if not hasattr(v, "shape") else v, dtype=dt, device=dev)

    g_w, f = grad_norms, on_device(loss)
    sigma_k, ceiling, floors = (on_device(v) for v in (sigma_k, ceiling, floors))
    g_sq = xp.sum(g_w * g_w)
    ok = xp.isfinite(g_sq) & (g_sq > 0) & xp.isfinite(f)
    g_w_safe = xp.where(ok, g_w, xp.ones_like(g_w))
    f_pos = xp.clip(xp.where(ok, f, xp.zeros_like(f)), min=0.0)
    sps = f_pos / xp.clip(xp.where(ok, g_sq, xp.ones_like(g_sq)), min=sps_floor)
    weyl = sigma_k / xp.maximum(g_w_safe, xp.sqrt(floors))
    cands = xp.stack([ceiling, xp.broadcast_to(sps, ceiling.shape), weyl])  # (3, M)
    best = xp.argmin(cands, axis=0)
    binding = xp.where(ok, best, xp.zeros_like(best))
    step = xp.where(ok, xp.min(cands, axis=0), ceiling)
    counts = {term: int(xp.sum(xp.astype(binding == i, best.dtype))) for i, term in enumerate(BINDING_TERMS)}
    return PerMatrixMassStep(step=step, binding=binding, counts=counts, ceiling=ceiling, sps=sps, weyl=weyl)


# ---------------------------------------------------------------------------------------------
# Step telemetry: do the frames move, is S pinned, are the steps comparable across blocks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterStepTelemetry:
    """One adapter's step, as 0-d arrays: ``frame_motion_u`` = ||U_after - U_before||_F,
    ``frame_motion_v`` likewise, ``at_bound`` the fraction of S at one of its bounds,
    ``effective_step`` the step on dW (:func:`effective_delta_steps`)."""

    frame_motion_u: Array
    frame_motion_v: Array
    at_bound: Array
    effective_step: Array


def adapter_step_telemetry(u_before: Array, u_after: Array, v_before: Array, v_after: Array,
                           s: Array, lower, upper, step, scale=1.0) -> AdapterStepTelemetry:
    """What issue-level telemetry asks of every reading's step, for one adapter.

    **Source**: the degeneracies of ``derived`` these detect (docs/derivations.md, "Readings"):
    frames that never move, S pinned at a bound, steps on dW that differ by orders of magnitude
    across blocks.

    frame_motion_u = ||U_after - U_before||_F, frame_motion_v = ||V_after - V_before||_F,
    at_bound = mean(S <= lower or S >= upper) with ``s`` the projected values before any decay
    (a projected entry equals its bound exactly), effective_step = step scale^2.

    **Invariants**: a step that leaves the frames alone reports zero motion and a moved frame
    reports the Frobenius distance (``test_telemetry_frame_motion``); the at-bound fraction
    counts exactly the entries on a bound (``test_telemetry_at_bound_fraction``).
    """
    for name, before, after in (("u", u_before, u_after), ("v", v_before, v_after)):
        require_matrix(before, f"{name}_before")
        if tuple(after.shape) != tuple(before.shape):
            raise ValueError(f"{name}_after must have {name}_before's shape {tuple(before.shape)}")
    require_vector(s, "s")
    xp = namespace(u_before, u_after, v_before, v_after, s)
    at_bound = xp.mean(xp.astype((s <= lower) | (s >= upper), s.dtype))
    return AdapterStepTelemetry(
        frame_motion_u=xp.linalg.matrix_norm(u_after - u_before),
        frame_motion_v=xp.linalg.matrix_norm(v_after - v_before),
        at_bound=at_bound,
        effective_step=effective_delta_steps(step, scale),
    )


def effective_delta_steps(step, scale) -> Array:
    """The step on dW that a step ``step`` on S makes, per matrix (arrays or floats: a float
    times a device array stays on that device).

    **Source**: the chain rule. For dW = c U diag(S) V^T the gradient in S is
    g_S = c diag(U^T G V) (G = dL/dW), so a step eta on S moves dW by
    eta c^2 U diag(U^T G V) V^T: the effective step is eta c^2. ``derived`` has c = the block's
    residual scale; the S~ = c S readings have c = 1, so their effective step is eta.

    **Invariants**: equal steps and equal scales give equal effective steps, and the S~
    readings' effective step is their step (``test_effective_step_uniform``).
    """
    step, scale = (as_array(v) if isinstance(v, list | tuple) else v for v in (step, scale))
    return step * scale * scale
