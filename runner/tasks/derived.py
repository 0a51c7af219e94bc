"""Set up and run the derived trainer: derive -> calibrate -> attach -> train -> export."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from rich.console import Console

import geometry
from runner.checkpoint import Checkpoint
from runner.data import collate
from runner.trainers.derived import (
    AdapterSpec,
    CertificateMonitor,
    DerivedTrainer,
    FactoredAdapters,
    block_of,
    candidate_linears,
    export_peft,
    measure_noise_scale,
    residual_scales,
)
from runner.training import train_loop
from runner.trial import TrainOutcome, config_hash

DTYPE_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def derive_for_model(model, n_train: int, batches_per_epoch: int, dtype: str,
                     erank_variant: str) -> geometry.DerivedHyperparameters:
    """Rows 1-7 and 9-14 from the weight matrices of every decoder-block Linear."""
    weights = {name: lin.weight.detach() for name, lin in candidate_linears(model).items()}
    return geometry.derive_hyperparameters(
        weights, n_train=n_train, batches_per_epoch=batches_per_epoch,
        dtype_eps=DTYPE_EPS[dtype], erank_variant=erank_variant,
    )


def with_measured_records(derived, n_train: int, noise, scales: dict[str, float],
                          blocks: list[str]) -> geometry.DerivedHyperparameters:
    """Rows 8 and 15 from the measurements, and row 1 for the batches per epoch that the
    measured batch size gives (shared by the torch and the MLX/JAX set-ups)."""
    records = dict(derived.records)
    records[1] = geometry.mass_ceiling(derived.sigma_k_min, derived.sigma_max,
                                       math.ceil(n_train / noise.b_crit))
    records[8] = geometry.critical_batch_size(noise)
    records[15] = replace(records[15], value=tuple(scales[b] for b in blocks),
                          inputs={"blocks": ",".join(blocks)})
    return replace(derived, records=records)


def _adapter_specs(derived, scales: dict[str, float]) -> dict[str, AdapterSpec]:
    return {
        g.name: AdapterSpec(name=g.name, rank=g.rank, dropout=g.dropout, sigma_k=g.sigma_k,
                            decay=g.weight_decay, first_index=g.init_range[0],
                            scale=scales[block_of(g.name)])
        for g in derived.layers if g.target
    }


def _calibration_batch(examples, pad_id: int, size: int):
    return collate(list(examples[:size]), pad_id=pad_id)


def _prompts(examples, count: int, max_prompt: int = 24) -> list[torch.Tensor]:
    """The answer-free beginning of a few validation examples, for the drift criterion."""
    prompts = []
    for ex in examples[:count]:
        cut = next((i for i, lab in enumerate(ex.labels) if lab != -100), len(ex.labels))
        cut = max(1, min(cut, max_prompt))
        prompts.append(torch.tensor(ex.input_ids[:cut]))
    return prompts


@dataclass
class DerivedSetup:
    """Everything the set-up derived, ready to train (steps 1-5 of `run_derived`)."""

    trainer: DerivedTrainer
    derived: geometry.DerivedHyperparameters
    noise: geometry.NoiseScale
    derive_seconds: float  # rows 1-7 and 9-14 from the weights
    setup_seconds: float  # all 15 rows: the weights, the residual scales and the noise scale


def setup_derived(cfg, loaded, splits, pad_id: int, console: Console) -> DerivedSetup:
    """Derive every hyperparameter and attach the adapters; no training step is taken."""
    tcfg, model, n_train = cfg.trainer, loaded.model, len(splits.train)

    # 1. Derive rows 1-7 and 9-14 from the weights (timed: it must cost < one training step).
    started = time.perf_counter()
    derived = derive_for_model(model, n_train, math.ceil(n_train / tcfg.micro_batch),
                               cfg.hardware.dtype.value, tcfg.erank_variant)
    derive_seconds = time.perf_counter() - started

    # 2. Residual scales (row 15) on a calibration batch of the base model.
    calib = _calibration_batch(splits.train, pad_id, tcfg.micro_batch)
    blocks = sorted({block_of(g.name) for g in derived.layers if g.target})
    scale_records = residual_scales(model, blocks, calib)
    scales = {b: float(r.value) for b, r in scale_records.items()}

    # 3. Attach U diag(S) V^T adapters (S = 0: the model is unchanged at step 0). The base
    #    weights are frozen: backward then computes no gradient for them (only for U, S, V).
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    specs = _adapter_specs(derived, scales)
    adapters = FactoredAdapters(candidate_linears(model), specs, tcfg.init.value, cfg.seed)

    # 4. Batch size from the measured gradient noise scale (row 8), then the MASS ceiling for
    #    the batches per epoch that batch size gives (row 1).
    model.train()
    noise = measure_noise_scale(model, adapters, splits.train,
                                lambda exs: collate(list(exs), pad_id=pad_id), n_train,
                                tcfg.noise_examples, tcfg.micro_batch)
    batch_size = noise.b_crit
    derived = with_measured_records(derived, n_train, noise, scales, blocks)
    records = derived.records
    setup_seconds = time.perf_counter() - started
    console.print(f"derived: {len(specs)} target matrices, ranks {min(s.rank for s in specs.values())}"
                  f"-{max(s.rank for s in specs.values())}, batch {batch_size} "
                  f"(B_simple {noise.b_simple:.1f}), MASS ceiling {records[1].value:.3g}, "
                  f"derived in {derive_seconds:.2f}s")

    # 5. The trainer: MASS steps between the derived floor and ceiling.
    trainer = DerivedTrainer(model, adapters, derived, batch_size, tcfg.micro_batch,
                             ceiling=float(records[1].value),
                             floor=float(records[2].value))
    return DerivedSetup(trainer, derived, noise, derive_seconds, setup_seconds)


def certificate_monitor(cfg, trainer, splits, pad_id: int) -> CertificateMonitor:
    """The stopping certificate's monitor for a derived run (torch or MLX/JAX trainer): its
    validation batch (the first 8 validation examples), its 4 generation prompts and its
    gradient window (half the evaluation interval, at least 2 steps)."""
    return CertificateMonitor(trainer, _calibration_batch(splits.val, pad_id, 8),
                              _prompts(splits.val, 4), pad_id,
                              grad_window=max(2, cfg.budget.eval_every // 2))


def run_derived(cfg, loaded, splits, pad_id: int, console: Console):

    tcfg, model = cfg.trainer, loaded.model

    # 1-4. Derive, calibrate and attach (setup_derived).
    setup = setup_derived(cfg, loaded, splits, pad_id, console)
    trainer, derived, noise = setup.trainer, setup.derived, setup.noise
    batch_size, records, derive_seconds = trainer.batch_size, derived.records, setup.derive_seconds

    # 5. Train with MASS steps; stop on the certificate or the token budget.
    monitor = certificate_monitor(cfg, trainer, splits, pad_id) if tcfg.certificate else None
    checkpoint = Checkpoint.for_run(cfg.runs_dir, config_hash(cfg),
                                    stateful={"certificate": monitor} if monitor else None)
    result = train_loop(model, trainer, splits, cfg.budget, seed=cfg.seed, pad_id=pad_id,
                        console=console, on_eval=monitor.on_eval if monitor else None,
                        checkpoint=checkpoint)

    # 6. Export as plain PEFT LoRA (B = c U diag(S), A = V^T, alpha = r).
    trainer.eval_mode()
    ranks = trainer.adapter_effective_ranks()
    peft_model = export_peft(model, trainer, derived)
    history = monitor.history if monitor else []
    return TrainOutcome(
        model=peft_model, result=result,
        hyperparameters={"init": tcfg.init.value, "batch_size": batch_size,
                         "micro_batch": tcfg.micro_batch, "mass_ceiling": records[1].value,
                         "epsilon_floor": records[2].value},
        extra_metrics={"derive_seconds": derive_seconds, "setup_seconds": setup.setup_seconds,
                       "batch_size": batch_size, "noise_b_simple": noise.b_simple,
                       "max_orth_error": max((s.get("orth_error", 0.0)
                                              for s in result.step_logs), default=0.0),
                       "adapter_effective_rank_mean": sum(ranks.values()) / max(len(ranks), 1)},
        derived=derived.to_dict(),
        certificate=history[-1] if history else None,
        step_table=result.step_logs,
    )
