"""Set up a derived run on any backend: derive -> calibrate -> attach -> measure -> trainer."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

import geometry
from geometry.derivations import LayerGeometry, derive_from_layers
from geometry.readings import matched_steps
from runner.derived.cache import SetupCache, tensor_digest
from runner.derived.certificate import calibration_batch
from runner.derived.ops import make_ops
from runner.derived.spec import (
    DTYPE_EPS,
    NOISE_PROBE_SEED,
    adapter_specs,
    noise_scale_from_grads,
    target_blocks,
    with_measured_records,
)
from runner.derived.step import reading
from runner.derived.torch_ops import TorchOps, probe_passes
from runner.derived.trainer import DerivedTrainer
from runner.errors import ConfigError
from runner.progress import say


@dataclass
class DerivedSetup:
    """Everything the set-up derived, ready to train."""

    trainer: DerivedTrainer
    derived: geometry.DerivedHyperparameters
    noise: geometry.NoiseScale
    derive_seconds: float  # rows 1-7 and 9-14 from the weights
    setup_seconds: float  # all 15 rows: the weights, the residual scales and the noise scale
    phase_seconds: dict[str, float] = field(default_factory=dict)  # setup_seconds, by step
    cache: str = "off"  # the seed-independent steps: read from the cache ("hit"), computed
    #                     ("miss"), some of each ("partial"), or no cache ("off")


def enum_value(x) -> str:
    return getattr(x, "value", x)


def derive(ops, n_train: int, batches_per_epoch: int, dtype: str,
           erank_variant: str) -> geometry.DerivedHyperparameters:
    """Rows 1-7 and 9-14 from the weight matrices of every decoder-block Linear."""
    with ops.derivation_map() as map_fn:
        return geometry.derive_hyperparameters(
            ops.candidate_weights(), n_train=n_train, batches_per_epoch=batches_per_epoch,
            dtype_eps=DTYPE_EPS[dtype], erank_variant=erank_variant, map_fn=map_fn)


def derive_for_model(model, n_train: int, batches_per_epoch: int, dtype: str,
                     erank_variant: str) -> geometry.DerivedHyperparameters:
    """:func:`derive` on a torch model."""
    return derive(TorchOps(model), n_train, batches_per_epoch, dtype, erank_variant)


def measure_noise_scale(ops, examples, pad_id: int, n_train: int, n_probe: int,
                        micro_batch: int, seed: int = NOISE_PROBE_SEED) -> geometry.NoiseScale:
    """Row 8 from per-example gradients of the first ``n_probe`` training examples, their
    adapters' dropout masks drawn from ``seed`` (the probe's own). At S = 0 the gradients with
    respect to U and V vanish, so each example's gradient is its gradient with respect to S."""
    n_probe = min(n_probe, len(examples))
    if n_probe < 2:
        raise ValueError(f"the noise-scale probe needs >= 2 training examples (got {n_probe})")
    grads = ops.example_s_grads(list(examples[:n_probe]), pad_id, micro_batch, seed)
    return noise_scale_from_grads(grads, n_train)


def run_steps(budget, train, batch_size: int) -> int:
    """N of derived_matched_mass: the optimiser steps in the run's token budget, at the mean
    non-padding tokens of a training example times the batch size (geometry.readings.
    matched_steps), at most ``budget.max_steps``."""
    tokens_per_step = batch_size * sum(len(e.input_ids) for e in train) / len(train)
    n = matched_steps(budget.max_tokens, tokens_per_step)
    return min(n, budget.max_steps) if budget.max_steps else n


def setup_derived(cfg, loaded, splits, pad_id: int, console) -> DerivedSetup:
    """Derive every hyperparameter and attach the adapters on ``cfg.hardware.backend``; no
    training step is taken."""
    backend = enum_value(cfg.hardware.backend)
    if backend != "torch" and enum_value(cfg.hardware.dtype) != "float32":
        raise ConfigError(f"hardware.dtype={enum_value(cfg.hardware.dtype)}: the {backend} derived "
                          "trainer runs in float32 only")
    cache = SetupCache.for_run(cfg.runs_dir, loaded.model, backend=backend,
                               device=str(cfg.hardware.device),
                               dtype=enum_value(cfg.hardware.dtype))
    return setup(cfg, make_ops(backend, loaded.model), splits, pad_id, console, cache)


def setup(cfg, ops, splits, pad_id: int, console=None,
          cache: SetupCache | None = None) -> DerivedSetup:
    """:func:`setup_derived` on ``ops``; with ``cache``, the seed-independent steps (the
    weights' geometry, the residual scales, the starting frames, the noise probe) are read from
    it where an earlier run stored them, and stored where not."""
    tcfg, n_train = cfg.trainer, len(splits.train)
    rule = reading(tcfg.name)
    ops.prepare(splits)

    # 1. Derive rows 1-7 and 9-14 from the weights (timed: it must cost < one training step).
    say(console, f"deriving: hyperparameters from the weights ({ops.name})")
    started = time.perf_counter()
    derived = derive_cached(ops, cache, n_train, math.ceil(n_train / tcfg.micro_batch),
                            enum_value(cfg.hardware.dtype), tcfg.erank_variant)
    derive_seconds = time.perf_counter() - started
    phases, mark = {"weights": derive_seconds}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name], mark = time.perf_counter() - mark, time.perf_counter()

    # 2. Residual scales (row 15) on a calibration batch of the base model.
    say(console, f"deriving: residual scales on a calibration batch (derived in "
                 f"{derive_seconds:.1f}s)")
    blocks = target_blocks(derived)
    calib = calibration_batch(splits.train, pad_id, tcfg.micro_batch)
    scales = residual_scales_cached(ops, cache, blocks, calib)
    lap("residual_scales")

    # 3. Attach U diag(S) V^T adapters (S = 0: the model is unchanged at step 0; the S~ = c S
    #    readings carry no residual scale).
    specs = adapter_specs(derived, scales, scaled=rule.scaled)
    attach_cached(ops, cache, specs, enum_value(tcfg.init), cfg.seed, rule)
    lap("attach")

    # 4. Batch size from the measured gradient noise scale (row 8), then the MASS ceiling for
    #    the batches per epoch that batch size gives (row 1). Every reading measures it at
    #    S = 0, then moves to its own start (the tail start leaves the model, so the gradient
    #    with respect to S, unchanged).
    noise = noise_scale_cached(ops, cache, specs, enum_value(tcfg.init), splits.train, pad_id,
                               n_train, tcfg.noise_examples, tcfg.micro_batch, console=console)
    derived = with_measured_records(derived, n_train, noise, scales, blocks)
    records = derived.records
    lap("noise_probe")
    ops.apply_start(rule, cfg.seed)
    lap("start")

    # 5. The trainer: MASS steps between the derived floor and ceiling (per matrix, N the
    #    run's steps, for derived_matched_mass).
    trainer = DerivedTrainer(ops, rule, derived, noise.b_crit, tcfg.micro_batch,
                             ceiling=float(records.mass_ceiling.value),
                             floor=float(records.epsilon_floor.value),
                             matched_steps=run_steps(cfg.budget, splits.train, noise.b_crit)
                             if rule.per_matrix_mass else None)
    # (JAX compiles the step's functions here: set-up time, not training time)
    ops.warm_up(trainer, calibration_batch(splits.train, pad_id,
                                           min(trainer.batch_size, tcfg.micro_batch)))
    setup_seconds = time.perf_counter() - started
    lap("trainer")
    if console is not None:
        ranks = [s.rank for s in ops.adapters.specs.values()]
        console.print(f"derived ({ops.name}): {len(ranks)} target matrices, ranks {min(ranks)}-"
                      f"{max(ranks)}, batch {trainer.batch_size} (B_simple {noise.b_simple:.1f}),"
                      f" MASS ceiling {records.mass_ceiling.value:.3g}, derived in "
                      f"{derive_seconds:.2f}s")
    return DerivedSetup(trainer, derived, noise, derive_seconds, setup_seconds, phases,
                        cache.summary if cache is not None else "off")


# -- the seed-independent steps, through the cache ----------------------------------------------


def derive_cached(ops, cache: SetupCache | None, n_train: int, batches_per_epoch: int,
                  dtype: str, erank_variant: str) -> geometry.DerivedHyperparameters:
    """:func:`derive`, its per-matrix geometry read from ``cache`` when stored (the records
    that follow from it are cheap and rebuilt)."""
    if cache is None:
        return derive(ops, n_train, batches_per_epoch, dtype, erank_variant)
    inputs = {"matrices": list(ops.candidate_weights()), "n_train": n_train,
              "dtype_eps": DTYPE_EPS[dtype], "erank_variant": erank_variant}
    layers = cache.lookup("weights", inputs, lambda entry: [
        LayerGeometry(**{**g, "shape": tuple(g["shape"]), "init_range": tuple(g["init_range"])})
        for g in entry.records])
    if layers is not None:
        return derive_from_layers(layers, n_train=n_train, batches_per_epoch=batches_per_epoch,
                                  dtype_eps=DTYPE_EPS[dtype], erank_variant=erank_variant)
    derived = derive(ops, n_train, batches_per_epoch, dtype, erank_variant)
    cache.store("weights", inputs, [asdict(g) for g in derived.layers])
    return derived


def residual_scales_cached(ops, cache: SetupCache | None, blocks: list[str],
                           calib) -> dict[str, float]:
    """Row 15 by block, read from ``cache`` when stored (the calibration batch is the first
    training examples: the same for every seed); a model whose own forward is random in the
    mode it is measured in is measured every time (the set-up runs it in eval mode, where
    dropout draws nothing)."""
    def measure() -> dict[str, float]:
        return {b: float(r.value) for b, r in ops.residual_scales(blocks, calib).items()}

    if cache is None or cache.random_forward:
        return measure()
    inputs = {"blocks": blocks,
              "calibration": tensor_digest(calib.input_ids, calib.attention_mask)}
    scales = cache.lookup("residual_scales", inputs,
                          lambda entry: {b: float(entry.records[b]) for b in blocks})
    if scales is not None:
        return scales
    scales = measure()
    cache.store("residual_scales", inputs, scales)
    return scales


def attach_cached(ops, cache: SetupCache | None, specs: dict, init: str, seed: int,
                  rule) -> None:
    """``ops.attach``, the starting frames (U, V per matrix) read from ``cache`` when stored
    (with the strides they were computed with: runner.derived.cache.read_entry); a random start
    depends on the seed and is drawn every time."""
    if cache is None or init == "random":
        ops.attach(specs, init, seed, rule)
        return
    inputs = {"init": init, "frames": {n: [s.rank, s.first_index] for n, s in specs.items()}}
    frames = cache.lookup("frames", inputs, lambda entry: {
        n: (entry.tensors[f"{n}.U"], entry.tensors[f"{n}.V"]) for n in specs})
    if frames is not None:
        ops.attach(specs, init, seed, rule, frames=frames)
        return
    ops.attach(specs, init, seed, rule)
    cache.store("frames", inputs, sorted(specs),
                {f"{n}.{side}": x for n, (u, _, v) in ops.host_usv().items()
                 for side, x in (("U", u), ("V", v))})


def noise_scale_cached(ops, cache: SetupCache | None, specs: dict, init: str, examples,
                       pad_id: int, n_train: int, n_probe: int, micro_batch: int, *,
                       console=None) -> geometry.NoiseScale:
    """:func:`measure_noise_scale`, read from ``cache`` when stored. Its masks come from the
    probe's own seed, so it depends on the weights, the probe's batches and the adapters, never
    on the run's seed; a read-back probe advances the run's generator by the draws it stored
    (``ops.replay_probe``), as the probe does. A random start (the frames follow the seed) or a
    model whose own forward draws random numbers (``ops.probe_stream_own`` false: the probe
    draws from the run's generator) is probed every time."""
    def measure() -> geometry.NoiseScale:
        say(console, f"probing the noise scale: per-example gradients of "
                     f"{min(n_probe, len(examples))} training examples")
        return measure_noise_scale(ops, examples, pad_id, n_train, n_probe, micro_batch)

    if cache is None or init == "random" or not ops.probe_stream_own:
        return measure()
    passes = probe_passes(examples[:n_probe], micro_batch, pad_id)
    inputs = {"batches": tensor_digest(*(t for b in passes
                                         for t in (b.input_ids, b.attention_mask, b.labels))),
              # (and the examples' order, by which the MLX and JAX probes group them)
              "order": tensor_digest(*(torch.tensor(e.input_ids) for e in examples[:n_probe])),
              "n_train": n_train, "probe_seed": NOISE_PROBE_SEED, "init": init,
              "adapters": {n: asdict(s) for n, s in specs.items()}}
    stored = cache.lookup("noise_scale", inputs, lambda entry: (
        geometry.NoiseScale(**entry.records["noise"]),
        [(int(n), float(p), int(r)) for n, p, r in entry.records["draws"]]))
    if stored is not None:
        noise, draws = stored
        say(console, "noise scale: read from the set-up cache (computed by an earlier seed)")
        ops.replay_probe(draws)
        return noise
    noise = measure()  # (the draws it replayed are the ones to store)
    cache.store("noise_scale", inputs, {"noise": asdict(noise),
                                        "draws": [list(d) for d in ops.probe_draws]})
    return noise
