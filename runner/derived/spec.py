"""What the derived set-up decides per adapter, and the records it measures (rows 1, 8, 15)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import geometry

DTYPE_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
# The noise probe's (row 8) dropout masks come from this seed, whatever the run's: the measured
# noise scale, and the batch size it gives, are then the same for every seed of an experiment
# (with the default tail frames; a random start's frames follow the seed), which computes the
# probe once (runner.derived.cache). A torch model whose own forward draws random numbers
# (dropout) is probed on the run's generator instead (TorchOps.probe_stream_own).
NOISE_PROBE_SEED = 0


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    dropout: float
    sigma_k: float  # ||dW||_2 = scale * max(S) <= sigma_k (S is clamped to [0, sigma_k/scale])
    decay: float  # sigma_k / sigma_max: the decoupled shrinkage rate of S
    first_index: int  # 0-based index of the first singular vector used (the structural rank k)
    scale: float  # residual scale c of the block (1 for the S~ = c S readings)
    s_bound: float | None = None  # the tail start's box |S~| <= beta (None: sigma_k / scale)


def block_of(name: str) -> str:
    """The decoder block a module sits in: its name up to the first index into a ModuleList
    (`model.layers.3.self_attn.q_proj` -> `model.layers.3`, `transformer.h.0.mlp.fc` ->
    `transformer.h.0`); an index inside the block (experts) comes later, so it stays inside."""
    parts = name.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[: index + 1])


def target_blocks(derived: geometry.DerivedHyperparameters) -> list[str]:
    return sorted({block_of(g.name) for g in derived.layers if g.target})


def adapter_specs(derived, scales: dict[str, float], scaled: bool = True) -> dict[str, AdapterSpec]:
    """One spec per target matrix, in the derivation's order; ``scaled=False`` (the S~ = c S
    readings) folds the residual scale into the values, so the adapter's factor is 1."""
    return {
        g.name: AdapterSpec(name=g.name, rank=g.rank, dropout=g.dropout, sigma_k=g.sigma_k,
                            decay=g.weight_decay, first_index=g.init_range[0],
                            scale=scales[block_of(g.name)] if scaled else 1.0)
        for g in derived.layers if g.target
    }


def with_measured_records(derived, n_train: int, noise, scales: dict[str, float],
                          blocks: list[str]) -> geometry.DerivedHyperparameters:
    """Rows 8 and 15 from the measurements, and row 1 for the batches per epoch that the
    measured batch size gives."""
    records = derived.records
    residual = replace(records.residual_scaling, value=tuple(scales[b] for b in blocks),
                       inputs={"blocks": ",".join(blocks)})
    records = records.replace(
        mass_ceiling=geometry.mass_ceiling(derived.sigma_k_min, derived.sigma_max,
                                           math.ceil(n_train / noise.b_crit)),
        batch_size=geometry.critical_batch_size(noise),
        residual_scaling=residual)
    return replace(derived, records=records)


def noise_scale_from_grads(grads, n_train: int) -> geometry.NoiseScale:
    """McCandlish et al. (2018) two-batch-size estimator (row 8) from per-example gradients
    ``grads`` (n, p), float64, any array namespace: |G_1|^2 = mean_i |g_i|^2 (B = 1) and
    |G_n|^2 = |mean_i g_i|^2 (B = n). An estimate of B_simple above n is not resolved by this
    sample, so B_crit is capped at n (docs/derivations.md, row 8)."""
    n = grads.shape[0]
    single_sq = float((grads * grads).sum()) / n
    mean_sq = float((grads.mean(0) ** 2).sum())
    biased = (geometry.per_sample_noise_scale(single_sq, mean_sq, n)
              if mean_sq > 0 else math.nan)  # the seed's estimator, recorded beside ours
    return geometry.gradient_noise_scale(single_sq, mean_sq, 1, n, n_train=n_train, b_max=n,
                                         b_biased=biased)


def check_setup(ours: dict[str, float], theirs: dict[str, float]) -> None:
    """Refuse a checkpoint whose stored set-up summary differs from the recomputed one
    (relative 1e-6): its adapters were trained under other derived values."""
    differ = [f"{k} {theirs.get(k)} != {v}" for k, v in ours.items()
              if not math.isclose(float(theirs.get(k, math.nan)), float(v), rel_tol=1e-6)]
    if differ:
        raise ValueError("the derived set-up differs: " + ", ".join(differ))
