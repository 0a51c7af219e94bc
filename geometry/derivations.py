"""The 15 derivations of the seed's table, per-matrix geometry, and the bundle the runner uses.

Each derivation is a small function returning a :class:`~geometry.provenance.Derived` record.
:func:`derive_hyperparameters` applies them to every weight matrix of a model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from geometry._xp import Array, require_matrix
from geometry.mass import mass_ceiling
from geometry.noise_scale import NOISE_SCALE_SOURCE, NoiseScale
from geometry.provenance import Derived, jsonable
from geometry.records import DerivedRecords
from geometry.spectra import (
    effective_rank,
    effective_rank_squared,
    gram_singular_values,
    noise_floor,
    singular_values,
    spectral_knee,
    stable_rank,
    structural_rank,
    top_singular_value_power,
)
from geometry.stopping import DEFAULT_DRIFT_TOLERANCE, DEFAULT_Z, STOPPING_SOURCE

FLOAT32_EPS = 2.0**-23

# ---------------------------------------------------------------------------------------------
# 2-15: one small function per derivation (1, the MASS ceiling, lives in geometry.mass)
# ---------------------------------------------------------------------------------------------


def epsilon_floor(sigma_k: float, sigma_max: float, dtype_eps: float) -> Derived:
    """Derivation 2: the spectral noise floor that replaces Adam's epsilon.

    **Source**: seed README row 2 ("IEEE 754 + SVD"); sqrt(eps) is the usual relative precision
    of a squared quantity (Higham 2002, section 1.5).

    floor = max(sigma_k^2, sqrt(eps) * sigma_max^2).
    Used only as a denominator guard (MASS eta_sps and eta_weyl); there is no Adam.

    **Invariants**: floor >= sigma_k^2 and floor >= sqrt(eps) sigma_max^2
    (``test_epsilon_floor_dominates_both``); scales as c^2 under W -> cW
    (``test_epsilon_floor_scale_equivariant``).
    """
    _positive(sigma_k=sigma_k, sigma_max=sigma_max, dtype_eps=dtype_eps)
    value = max(sigma_k**2, math.sqrt(dtype_eps) * sigma_max**2)
    return Derived(
        "adam_epsilon", value, "max(sigma_k^2, sqrt(eps) * sigma_max^2)",
        {"sigma_k": sigma_k, "sigma_max": sigma_max, "dtype_eps": dtype_eps},
        "seed README row 2; IEEE 754 machine epsilon",
    )


def momentum_rule() -> Derived:
    """Derivation 3: no momentum buffer; Riemannian SGD with the Cayley retraction on St(n, r).

    **Source**: Wen & Yin (2013); Li, Li & Todorovic (2020); see ``geometry.stiefel``.

    **Invariants**: see :func:`geometry.stiefel.cayley_retract`.
    """
    return Derived(
        "momentum", "cayley_stiefel_retraction",
        "U <- Cayley(U, -grad_U, eta); V <- Cayley(V, -grad_V, eta); no momentum buffer",
        {}, "Wen & Yin (2013), Math. Program. 142; Li, Li & Todorovic (2020), ICLR",
    )


def weight_decay_ratio(sigma_k: float, sigma_max: float) -> Derived:
    """Derivation 4: decoupled shrinkage rate of the adapter's singular values.

    **Source**: seed README row 4 (condition ratio sigma_k / sigma_max).

    lambda = sigma_k / sigma_max;  S <- S (1 - eta_t lambda) each step.

    **Invariants**: 0 < lambda <= 1 (``test_weight_decay_bounds``); scale invariant
    (``test_weight_decay_scale_invariant``).
    """
    _positive(sigma_k=sigma_k, sigma_max=sigma_max)
    if sigma_k > sigma_max:
        raise ValueError("need sigma_k <= sigma_max")
    return Derived(
        "weight_decay", sigma_k / sigma_max, "sigma_k / sigma_max; S <- S * (1 - eta_t * lambda)",
        {"sigma_k": sigma_k, "sigma_max": sigma_max}, "seed README row 4",
    )


def _removed(name: str, formula: str, source: str) -> Derived:
    return Derived(name, "removed", formula, {}, source)


def clipping_rule() -> Derived:
    """Derivation 5: no gradient clipping; the update is bounded by construction.

    **Source**: Weyl (1912): |s_i(W + E) - s_i(W)| <= ||E||_2; with S clamped to [0, sigma_k],
    ||Delta W||_2 = max S <= sigma_k (checked every step by the trainer).
    """
    return _removed("gradient_clipping", "none; invariant ||Delta W||_2 = max(S) <= sigma_k each step",
                    "Weyl (1912), Math. Ann. 71")


def warmup_rule() -> Derived:
    """Derivation 6: no warmup; the MASS step is bounded from step 0 (claim: no early loss spike).

    **Source**: seed README row 6 (Ma & Yarats 2021 argue warmup guards Adam's early variance,
    which this trainer does not have).
    """
    return _removed("warmup", "none; eta_0 <= eta_ceil and the Weyl bound hold from step 0",
                    "Ma & Yarats (2021), AAAI; seed README row 6")


def schedule_rule() -> Derived:
    """Derivation 7: no learning-rate schedule; MASS recomputes the step every step.

    **Source**: seed README row 7 (Defazio et al. 2024, schedule-free learning).
    """
    return _removed("lr_schedule", "none; eta_t = MASS(f_t, ||g_t||) per step",
                    "Defazio et al. (2024), 'The road less scheduled'; seed README row 7")


def critical_batch_size(noise: NoiseScale) -> Derived:
    """Derivation 8: batch size = the clamped unbiased gradient noise scale.

    **Source**: McCandlish et al. (2018), eq. (2.8), Appendix A.1; see
    :func:`geometry.noise_scale.gradient_noise_scale`.

    B = clamp(round(tr(Sigma) / ||G||^2), 1, N_train).

    **Invariants**: ``test_noise_scale_clamped``.
    """
    return Derived(
        "batch_size", noise.b_crit, "clamp(round(tr(Sigma)/||G||^2), 1, N_train), two-batch estimator",
        {"g2": noise.g2, "trace_sigma": noise.trace_sigma, "b_simple": noise.b_simple,
         "b_small": noise.b_small, "b_big": noise.b_big, "n_train": noise.n_train,
         "b_biased_per_sample": noise.b_biased},
        NOISE_SCALE_SOURCE,
    )


def stopping_rule(window: int, z: float = DEFAULT_Z, drift_tolerance: float = DEFAULT_DRIFT_TOLERANCE) -> Derived:
    """Derivation 9: the four-criterion stopping certificate (see ``geometry.stopping``).

    **Source**: seed README row 9; SEED-SPEC row 9. ``window``, ``z`` and ``drift_tolerance``
    are conventions, recorded as such.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 (got {window})")
    return Derived(
        "early_stopping",
        ("gradient_stationarity", "predicted_improvement", "generation_drift", "validation_stability"),
        "stop iff all four pass and validation loss did not fall this epoch; else token budget / divergence",
        {"window": window, "z": z, "drift_tolerance": drift_tolerance}, STOPPING_SOURCE,
    )


def lora_scale_bound(sigma_k: float) -> Derived:
    """Derivation 10: the adapter's singular values are clamped to [0, sigma_k]; PEFT scaling 1.

    **Source**: Weyl (1912): ||Delta W||_2 <= sigma_k moves every singular value of W by at most
    sigma_k; seed README row 10.

    S <- clamp(S, 0, sigma_k),  lora_alpha = r (scaling alpha/r = 1).

    **Invariants**: ``test_lora_scale_bound_positive``.
    """
    _positive(sigma_k=sigma_k)
    return Derived("lora_scale", sigma_k, "S in [0, sigma_k]; ||Delta W||_2 = max S <= sigma_k; alpha = r",
                   {"sigma_k": sigma_k}, "Weyl (1912); seed README row 10")


def lora_rank(tail_dims: int, knee: int, q: int, n_train: int | None = None) -> Derived:
    """Derivation 11: adapter rank from the tail capacity, capped by the knee and the data.

    **Source**: seed README row 11 and its later cap (SEED-SPEC row 11).

    r = max(1, min(tail_dims, floor(knee * tail_dims / q))), then r <= n_train.

    **Invariants**: 1 <= r <= tail_dims (``test_lora_rank_bounds``).
    """
    if not 1 <= tail_dims < q or not 1 <= knee < q:
        raise ValueError(f"need 1 <= tail_dims < q and 1 <= knee < q (got {tail_dims}, {knee}, q={q})")
    r = max(1, min(tail_dims, (knee * tail_dims) // q))
    if n_train is not None:
        if n_train < 1:
            raise ValueError("n_train must be >= 1")
        r = min(r, n_train)
    return Derived("lora_rank", r, "max(1, min(tail_dims, floor(knee * tail_dims / q))), <= n_train",
                   {"tail_dims": tail_dims, "knee": knee, "q": q, "n_train": n_train if n_train else "none"},
                   "seed README row 11 (Shannon effective rank: Roy & Vetterli 2007)")


def is_target_module(tail_dims: int, gap: float = 0.0) -> Derived:
    """Derivation 12: a matrix is adapted iff it has tail capacity (or a positive gap).

    **Source**: seed README row 12.

    target = tail_dims > 0 or gap > 0.
    """
    return Derived("target_modules", bool(tail_dims > 0 or gap > 0), "tail_dims > 0 or gap > 0",
                   {"tail_dims": tail_dims, "gap": gap}, "seed README row 12")


def lora_dropout(erank: float, q: int, rank: int) -> Derived:
    """Derivation 13: dropout as the product of two spectral ratios.

    **Source**: seed README row 13 (Roy & Vetterli 2007 effective rank).

    p = (1 - erank/q) * (rank/q).

    **Invariants**: 0 <= p < 1 (``test_dropout_bounds``).
    """
    if not (1 <= erank <= q and 1 <= rank <= q):
        raise ValueError(f"need 1 <= erank <= q and 1 <= rank <= q (got {erank}, {rank}, q={q})")
    return Derived("lora_dropout", (1.0 - erank / q) * (rank / q), "(1 - erank/q) * (rank/q)",
                   {"erank": erank, "q": q, "rank": rank}, "seed README row 13; Roy & Vetterli (2007)")


def init_indices(k: int, rank: int, q: int) -> Derived:
    """Derivation 14: initialise U, V with W's singular vectors k .. k+r-1 (0-based), S = 0.

    **Source**: SEED-SPEC row 14 (the "null-space capacity" directions just below the structural
    rank); S = 0 keeps the model unchanged at step 0.

    value = (k, k + r): the half-open 0-based index range of singular vectors to slice.

    **Invariants**: the range lies inside [0, q) (``test_init_indices_in_range``).
    """
    if not (1 <= k < q and 1 <= rank <= q - k):
        raise ValueError(f"need 1 <= k < q and 1 <= rank <= q - k (got k={k}, rank={rank}, q={q})")
    return Derived("weight_init", (k, k + rank), "U = U_W[:, k:k+r], V = V_W[:, k:k+r], S = 0",
                   {"k": k, "rank": rank, "q": q}, "SEED-SPEC row 14")


def residual_scale(x: Array, fx: Array, *, n_iter: int = 30, seed: int = 0) -> Derived:
    """Derivation 15: per-block residual scaling from input and output activations.

    **Source**: seed README row 15; power iteration (Golub & Van Loan, section 8.2.1).

    alpha_l = sigma_max(X) / sigma_max(f(X)),  X, f(X): (tokens x hidden) activations of a block.

    **Invariants**: invariant under a common rescaling of both (``test_residual_scale_invariant``).
    """
    require_matrix(x, "x")
    require_matrix(fx, "fx")
    sx = top_singular_value_power(x, n_iter, seed)
    sf = top_singular_value_power(fx, n_iter, seed)
    if not sf > 0:
        raise ValueError("sigma_max(f(x)) must be > 0")
    return Derived("residual_scaling", sx / sf, "sigma_max(x) / sigma_max(f(x)) by power iteration",
                   {"sigma_max_x": sx, "sigma_max_fx": sf, "n_iter": n_iter}, "seed README row 15")


def _positive(**kw: float) -> None:
    for k, v in kw.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{k} must be finite and > 0 (got {v})")


# ---------------------------------------------------------------------------------------------
# per-matrix geometry
# ---------------------------------------------------------------------------------------------

ErankVariant = Literal["roy_vetterli", "squared"]
Spectrum = Literal["gram_input", "gram", "svd"]


@dataclass(frozen=True)
class LayerGeometry:
    """Spectral geometry of one weight matrix and the per-layer derived values.

    rank/dropout/init use the effective rank chosen by ``erank_variant`` (Roy-Vetterli by
    default); both effective ranks are recorded.
    """

    name: str
    shape: tuple[int, int]
    sigma_max: float
    sigma_k: float
    k: int
    erank: float
    erank_squared: float
    stable_rank: float
    tail_dims: int
    knee: int
    rank: int
    dropout: float
    target: bool
    q: int
    gap: float
    weight_decay: float
    epsilon: float
    init_range: tuple[int, int]


def analyze_layer(
    name: str, w: Array, *, n_train: int | None = None, dtype_eps: float = FLOAT32_EPS,
    erank_variant: ErankVariant = "roy_vetterli", spectrum: Spectrum = "gram_input",
) -> LayerGeometry:
    """Per-matrix geometry: spectrum, effective/stable rank, structural rank, knee, and the
    per-layer derivations 2, 4, 10-14.

    **Source**: SEED-SPEC "Per-matrix geometry"; each field's derivation function above.

    The spectrum (``spectrum``): "gram_input" (default; Gram product in the input dtype, float64
    eigvalsh, see :func:`geometry.spectra.gram_singular_values`), "gram" (float64 Gram) or
    "svd" (full float64 SVD, slowest). The knee ignores singular values
    below the float-``dtype_eps`` noise floor eps * s_1 * max(m, n).

    **Invariants**: every field is unchanged under W -> cW except sigma_k, sigma_max (scale by c)
    and epsilon (by c^2) (``test_analyze_layer_scale_invariant``).
    """
    require_matrix(w)
    m, n = int(w.shape[0]), int(w.shape[1])
    q = min(m, n)
    if q < 2:
        raise ValueError(f"{name}: need min(m, n) >= 2 (got shape={(m, n)})")
    if spectrum == "svd":
        s = singular_values(w)
    elif spectrum in ("gram", "gram_input"):
        s = gram_singular_values(w, gram_in_input_dtype=spectrum == "gram_input")
    else:
        raise ValueError(f"spectrum must be 'gram_input', 'gram' or 'svd' (got {spectrum!r})")
    er = effective_rank(s)
    er2 = effective_rank_squared(s)
    used = er if erank_variant == "roy_vetterli" else er2
    st = structural_rank(s)
    if erank_variant == "squared":
        k = min(max(int(math.floor(er2)), 1), q - 1)
        st = type(st)(k=k, q=q, tail_dims=q - k, sigma_k=float(s[k - 1]), sigma_max=st.sigma_max,
                      gap=float(s[k - 2] - s[k - 1]) if k >= 2 else 0.0, erank=er2)
    knee = spectral_knee(s, floor=noise_floor(s, dtype_eps, dims=max(m, n)))
    rank = lora_rank(st.tail_dims, knee, q, n_train).value
    return LayerGeometry(
        name=name, shape=(m, n), sigma_max=st.sigma_max, sigma_k=st.sigma_k, k=st.k, erank=er,
        erank_squared=er2, stable_rank=stable_rank(s), tail_dims=st.tail_dims, knee=knee,
        rank=rank, dropout=lora_dropout(used, q, rank).value,
        target=is_target_module(st.tail_dims, st.gap).value, q=q, gap=st.gap,
        weight_decay=weight_decay_ratio(st.sigma_k, st.sigma_max).value,
        epsilon=epsilon_floor(st.sigma_k, st.sigma_max, dtype_eps).value,
        init_range=init_indices(st.k, rank, q).value,
    )


# ---------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedHyperparameters:
    """Everything the derived trainer needs, with provenance: per-layer geometry, the global
    sigma_k,min / sigma_max over targeted matrices, and the 15 records by name."""

    layers: tuple[LayerGeometry, ...]
    sigma_k_min: float
    sigma_max: float
    records: DerivedRecords

    def layer(self, name: str) -> LayerGeometry:
        """The geometry of the matrix called ``name``."""
        for g in self.layers:
            if g.name == name:
                return g
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict for the ledger."""
        return {
            "sigma_k_min": self.sigma_k_min,
            "sigma_max": self.sigma_max,
            "layers": {g.name: jsonable(asdict(g)) for g in self.layers},
            "derived": self.records.to_dict(),
        }

    def peft_patterns(self) -> dict:
        """PEFT LoraConfig pieces: target_modules, rank_pattern, alpha_pattern (alpha = rank, so
        scaling is 1) and r / lora_alpha (the most common rank; ties go to the smaller rank)."""
        targets = [g for g in self.layers if g.target]
        counts = Counter(g.rank for g in targets)
        r = min(counts, key=lambda x: (-counts[x], x)) if counts else 1
        return {
            "target_modules": [g.name for g in targets],
            "rank_pattern": {g.name: g.rank for g in targets},
            "alpha_pattern": {g.name: g.rank for g in targets},
            "r": r,
            "lora_alpha": r,
        }


def derive_hyperparameters(
    weights: Mapping[str, Array], *, n_train: int, batches_per_epoch: int, dtype_eps: float,
    noise: NoiseScale | None = None, residual_scales: Mapping[str, float] | None = None,
    stopping_window: int = 5, erank_variant: ErankVariant = "roy_vetterli",
    spectrum: Spectrum = "gram_input",
    map_fn: Callable[[Callable, Iterable], Iterator] = map,
) -> DerivedHyperparameters:
    """Derive all 15 hyperparameters from a model's weight matrices (out x in, any array API).

    **Source**: SEED-SPEC, "The 15 derivations" (our reading column).

    1. per matrix: :func:`analyze_layer`;  2. global sigma_k,min = min sigma_k and
    sigma_max = max s_1 over targeted matrices;  3. the 15 records. Batch size (8) and residual
    scaling (15) need gradients/activations: pass ``noise`` / ``residual_scales`` once measured,
    otherwise their records say "deferred". ``spectrum`` picks how singular values are
    computed (see :func:`analyze_layer`). ``map_fn`` maps the per-matrix analysis over the
    matrices (the builtin ``map``, or a thread pool's ``map``: the matrices are independent);
    it must keep the input order.

    **Invariants**: invariant under a common rescaling of all weights, except the sigma values
    and epsilon (``test_derive_hyperparameters_scale_invariant``).
    """
    if not weights:
        raise ValueError("weights must contain at least one matrix")
    if n_train < 1 or batches_per_epoch < 1 or not dtype_eps > 0:
        raise ValueError("need n_train >= 1, batches_per_epoch >= 1 and dtype_eps > 0")
    # 1. per-matrix geometry, in the input order
    def one(item):
        return analyze_layer(item[0], item[1], n_train=n_train, dtype_eps=dtype_eps,
                             erank_variant=erank_variant, spectrum=spectrum)

    layers = tuple(map_fn(one, weights.items()))
    return derive_from_layers(layers, n_train=n_train, batches_per_epoch=batches_per_epoch,
                              dtype_eps=dtype_eps, noise=noise, residual_scales=residual_scales,
                              stopping_window=stopping_window, erank_variant=erank_variant)


def derive_from_layers(
    layers: Iterable[LayerGeometry], *, n_train: int, batches_per_epoch: int, dtype_eps: float,
    noise: NoiseScale | None = None, residual_scales: Mapping[str, float] | None = None,
    stopping_window: int = 5, erank_variant: ErankVariant = "roy_vetterli",
) -> DerivedHyperparameters:
    """Steps 2 and 3 of :func:`derive_hyperparameters` from per-matrix geometry already
    computed by :func:`analyze_layer` with the same ``n_train``, ``dtype_eps`` and
    ``erank_variant`` (e.g. kept from an earlier run on the same weights): the global
    sigma_k,min / sigma_max and the 15 records.

    **Source**: SEED-SPEC, "The 15 derivations" (our reading column).

    **Invariants**: ``derive_from_layers(analyze_layer(...) for each matrix, ...)`` equals
    ``derive_hyperparameters(...)`` (``test_derive_from_layers_is_derive_hyperparameters``).
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must contain at least one matrix")
    if n_train < 1 or batches_per_epoch < 1 or not dtype_eps > 0:
        raise ValueError("need n_train >= 1, batches_per_epoch >= 1 and dtype_eps > 0")
    # 2. global spectral scale over targeted matrices
    targets = [g for g in layers if g.target] or list(layers)
    sk_min = min(g.sigma_k for g in targets)
    s_max = max(g.sigma_max for g in targets)
    # 3. the records
    per_layer = {"layers": len(layers), "order": "as in weights"}
    rec = DerivedRecords(
        mass_ceiling=mass_ceiling(sk_min, s_max, batches_per_epoch),
        epsilon_floor=epsilon_floor(sk_min, s_max, dtype_eps),
        momentum=momentum_rule(),
        weight_decay=Derived("weight_decay", tuple(g.weight_decay for g in layers), "sigma_k / sigma_max per layer",
                   per_layer, "seed README row 4"),
        clipping=clipping_rule(),
        warmup=warmup_rule(),
        schedule=schedule_rule(),
        batch_size=critical_batch_size(noise) if noise is not None else Derived(
            "batch_size", "deferred", "gradient_noise_scale(two batch sizes) at init", {}, NOISE_SCALE_SOURCE),
        stopping=stopping_rule(stopping_window),
        lora_scale=Derived("lora_scale", tuple(g.sigma_k for g in layers), "S in [0, sigma_k] per layer; alpha = r",
                    per_layer, "Weyl (1912); seed README row 10"),
        lora_rank=Derived("lora_rank", tuple(g.rank for g in layers),
                    "max(1, min(tail_dims, floor(knee*tail_dims/q))), <= n_train",
                    {**per_layer, "n_train": n_train}, "seed README row 11"),
        target_modules=Derived("target_modules", tuple(g.name for g in layers if g.target), "tail_dims > 0 or gap > 0",
                    per_layer, "seed README row 12"),
        lora_dropout=Derived("lora_dropout", tuple(g.dropout for g in layers), "(1 - erank/q) * (rank/q)",
                    {**per_layer, "erank_variant": erank_variant}, "seed README row 13; Roy & Vetterli (2007)"),
        weight_init=Derived("weight_init", tuple(g.init_range for g in layers), "U, V = singular vectors [k, k+r), S = 0",
                    per_layer, "SEED-SPEC row 14"),
        residual_scaling=Derived("residual_scaling", tuple(float(residual_scales[n]) for n in sorted(residual_scales))
                    if residual_scales else "deferred",
                    "sigma_max(x) / sigma_max(f(x)) per block, power iteration on a calibration batch",
                    {"blocks": ",".join(sorted(residual_scales)) if residual_scales else ""},
                    "seed README row 15"),
    )
    return DerivedHyperparameters(layers=layers, sigma_k_min=sk_min, sigma_max=s_max, records=rec)
