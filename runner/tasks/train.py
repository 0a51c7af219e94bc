"""task=train: load -> attach adapters -> train -> evaluate -> save adapter -> ledger row."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console

from runner import progress, tracking
from runner.config.paths import resolve_data_path
from runner.config.schema import TRAINERS, RunConfig, TrainerFamily
from runner.data import DataError, batches, load_splits
from runner.derived import run_derived
from runner.errors import HardwareUnavailable
from runner.generation import generation_metrics, generation_pairs, score_generations
from runner.hardware import resolved, setup_hardware
from runner.ledger import new_run_id, utc_now, write_trial
from runner.models.backends._spec import SUPPORTED_ARCHS
from runner.models.loading import (
    LoadedModel,
    check_backend_architecture,
    enable_recompute,
    load_model,
    model_id_of,
)
from runner.training.adapter import base_model_id, save_adapter, write_model_card
from runner.training.baseline import BaselineTrainer, attach_lora
from runner.training.checkpoint import Checkpoint, remove_checkpoints
from runner.training.loop import TrainResult, peak_rss_mb, train_loop
from runner.trial import (
    ClaimTag,
    Provenance,
    TrainOutcome,
    TrialRow,
    config_hash,
    data_id,
    plain,
)


def check_data_paths(cfg: RunConfig) -> tuple[str, str | None]:
    """Resolve the data files and fail before any model is loaded if one is missing."""
    data_path = resolve_data_path(cfg.data.path)
    retention_path = resolve_data_path(cfg.data.retention_path)
    for key, path in (("data.path", data_path), ("data.retention_path", retention_path)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{key}={path}: no such file")
    return data_path, retention_path


def train_task(cfg: RunConfig, *, claim: ClaimTag | None = None,
               provenance: Provenance | None = None) -> dict:
    """Run one trial; `claim` tags it when a claim's decision rule asked for it (the arm's
    name in the claim, which two arms with one trainer tell apart). `provenance`: the code
    state the calling job read when it started (read here otherwise)."""
    console = progress.console()
    started = utc_now()
    provenance = provenance or Provenance.read(cfg.results_dir)
    wall_start = time.perf_counter()

    # 1. Hardware, then the model and the data (errors here name the file and line).
    hw = setup_hardware(cfg.hardware)
    cfg = resolved(cfg, hw)  # mlx device auto -> the device that runs (in the config hash)
    data_path, retention_path = check_data_paths(cfg)
    with progress.phase(console, f"loading model {model_id_of(cfg.model)}"):
        loaded = load_model(cfg.model, dtype=hw.dtype, device=hw.torch_device)
    if cfg.hardware.recompute:
        enable_recompute(loaded.model)
    with progress.phase(console, f"reading data {cfg.data.path}"):
        splits = load_splits(
            data_path, loaded.tokenizer,
            max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
            retention_path=retention_path, max_examples=cfg.data.max_examples,
            replay_fraction=cfg.data.replay_fraction,
        )
    if not splits.train or not splits.val:
        raise DataError(f"{cfg.data.path}: too few examples for a train/validation split")
    console.print(f"model {loaded.model_id} sha256 {loaded.sha256[:12]}  data {data_id(cfg.data)} "
                  f"sha256 {splits.sha256[:12]} train {len(splits.train)} val {len(splits.val)} "
                  f"retention {len(splits.retention)}")
    cut = splits.truncation_line(cfg.data.path, cfg.data.max_seq_len)
    if cut:
        console.print(f"[yellow]{cut}[/]")

    # 1b. Greedy generations on held-out prompts before training (data.generation_examples).
    pairs = generation_pairs(data_path, cfg.data)
    if pairs:
        with progress.phase(console, f"generating for {len(pairs)} held-out prompts"):
            before, _ = score_generations(loaded.model, loaded.tokenizer, pairs,
                                          cfg.data.max_new_tokens, hw.torch_device)

    # 2. Train with the configured trainer (a grid trains once per learning rate), reporting
    #    every step to the tracker when one is configured.
    chash = config_hash(cfg)
    run_id = new_run_id(cfg.experiment, cfg.trainer.name, cfg.seed, chash)
    pad_id = loaded.tokenizer.pad_token_id
    with tracking.trial_run(cfg, run_id, plain(cfg), [cfg.experiment, cfg.trainer.name]) as run:
        outcome = run_trainer(cfg, loaded, splits, pad_id, console)
        model, result = outcome.model, outcome.result

        # 3. Save the adapter in PEFT's format, naming the base model by its id, and check
        #    PEFT reloads it to the same logits.
        adapter_dir = Path(cfg.runs_dir) / run_id / "adapter"
        with progress.phase(console, f"saving the adapter to {adapter_dir}"):
            save_adapter(model, adapter_dir, base_model_id(cfg.model))
            reload_diff = (verify_adapter(model, loaded, adapter_dir, splits.val[:4], pad_id)
                           if cfg.verify_adapter else None)

        # 4. One trial row in the ledger (with the generations after training, if asked).
        metrics = train_metrics(result, time.perf_counter() - wall_start, reload_diff)
        if pairs:
            with progress.phase(console, f"generating for {len(pairs)} held-out prompts"):
                after, gens = score_generations(model, loaded.tokenizer, pairs,
                                                cfg.data.max_new_tokens, hw.torch_device)
            metrics["generation"] = generation_metrics(before, after, gens)
        row = TrialRow.trained(cfg, hw, provenance, run_id=run_id, chash=chash, started=started,
                               loaded=loaded, splits=splits, outcome=outcome, metrics=metrics,
                               adapter_dir=adapter_dir, claim=claim).as_dict()
        path = write_trial(cfg.results_dir, row)
        write_model_card(adapter_dir, row, path)  # README.md: the trial, its values and claim
        remove_checkpoints(cfg.runs_dir, chash)  # the trial is in the ledger: nothing to resume
        if run is not None:
            run.finish(tracking.trial_summary(row))
    m = row["metrics"]
    console.print(f"[bold]done[/] {result.stop_reason}: val {m['val_loss_initial']:.4f} -> "
                  f"{m['val_loss_final']:.4f}, {m['tokens_per_second']:.0f} tok/s, "
                  f"trial {path}")
    return row


def run_trainer(cfg: RunConfig, loaded: LoadedModel, splits, pad_id: int,
                console: Console) -> TrainOutcome:
    """Train with the registered trainer `cfg.trainer.name` (runner.config.schema.TRAINERS)."""
    spec = TRAINERS[cfg.trainer.name]
    backend = getattr(cfg.hardware.backend, "value", cfg.hardware.backend)
    if backend not in spec.backends:
        # PEFT and the baseline optimizers are torch code; a sweep records the arm as SKIPPED.
        raise HardwareUnavailable(
            f"trainer={cfg.trainer.name} runs on {', '.join(spec.backends)} only; "
            f"hardware={cfg.hardware.name} (backend {backend}) runs trainer="
            + ", ".join(sorted(n for n, t in TRAINERS.items() if backend in t.backends)))
    if backend != "torch":
        check_backend_architecture(loaded.model_type, cfg.hardware.name, backend,
                                   SUPPORTED_ARCHS)
    family = {
        TrainerFamily.baseline: run_baseline_trainer,
        TrainerFamily.lr_grid: run_lr_grid,
        TrainerFamily.derived: run_derived,
    }
    return family[spec.family](cfg, loaded, splits, pad_id, console)


def run_baseline_trainer(cfg: RunConfig, loaded: LoadedModel, splits, pad_id: int,
                         console: Console) -> TrainOutcome:
    return run_baseline(cfg, cfg.trainer, loaded.model, splits, pad_id, console)


def run_baseline(cfg: RunConfig, trainer_cfg, base_model, splits, pad_id: int,
                 console: Console, checkpoint_name: str = "state") -> TrainOutcome:
    """PEFT LoRA + an optimizer; the seed fixes LoRA's random A init and dropout."""
    torch.manual_seed(cfg.seed)
    model = attach_lora(base_model, trainer_cfg)
    trainer = BaselineTrainer(model, trainer_cfg, _estimate_steps(splits.train, cfg))
    checkpoint = Checkpoint.for_run(cfg.runs_dir, config_hash(cfg), checkpoint_name)
    result = train_loop(model, trainer, splits, cfg.budget, seed=cfg.seed, pad_id=pad_id,
                        console=console, checkpoint=checkpoint)
    hyper = OmegaConf.to_container(OmegaConf.structured(trainer_cfg), enum_to_str=True)
    return TrainOutcome(model=model, result=result, hyperparameters=hyper)


def run_lr_grid(cfg: RunConfig, loaded: LoadedModel, splits, pad_id: int,
                console: Console) -> TrainOutcome:
    """AdamW tuned over `lr_grid`: every point trains on the full budget; keep the best.

    The pick is by final validation loss on the same split the claim reads, which favours the
    grid: any claim that the derived trainer matches it is tested against its best case.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    grid = list(cfg.trainer.lr_grid) or [cfg.trainer.lr]
    base, points, best = loaded.model, [], None
    for i, lr in enumerate(grid):
        console.print(f"adamw_grid: lr={lr:g} ({i + 1}/{len(grid)})")
        outcome = run_baseline(cfg, replace(cfg.trainer, lr=lr), base, splits, pad_id, console,
                               checkpoint_name=f"grid-{i}")  # a finished point is read back
        final = outcome.result.evals[-1].val_loss
        points.append({"lr": lr, "val_loss_final": final, "tokens": outcome.result.tokens,
                       "train_seconds": outcome.result.train_seconds,
                       "stop_reason": outcome.result.stop_reason})
        if best is None or (math.isfinite(final) and final < best[0]):
            state = {k: v.detach().clone()
                     for k, v in get_peft_model_state_dict(outcome.model).items()}
            best = (final, state, outcome)
        base = outcome.model.unload()  # the base model without this point's adapters
    _, state, best = best
    # Re-attach the best point's adapters (same config, same seed) and restore its weights.
    torch.manual_seed(cfg.seed)
    best.model = attach_lora(base, replace(cfg.trainer, lr=best.hyperparameters["lr"]))
    set_peft_model_state_dict(best.model, state)
    best.model.eval()
    best.extra_metrics = {
        "grid": points,
        "best_lr": best.hyperparameters["lr"],
        "tuning_tokens": sum(p["tokens"] for p in points),
        "tuning_seconds": sum(p["train_seconds"] for p in points),
        "grid_points": len(points),
    }
    return best


def _estimate_steps(train, cfg: RunConfig) -> int:
    """Steps the token budget will take (for warmup/schedule of baselines that use one)."""
    mean_len = sum(len(e.input_ids) for e in train) / len(train)
    steps = max(1, round(cfg.budget.max_tokens / (mean_len * cfg.trainer.batch_size)))
    return min(steps, cfg.budget.max_steps) if cfg.budget.max_steps else steps


@torch.no_grad()
def verify_adapter(model, loaded: LoadedModel, adapter_dir: Path, examples, pad_id: int) -> float:
    """Max |logit difference| between the trained model and base + PEFT-loaded adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = next(iter(batches(examples, len(examples), seed=0, epoch=0, pad_id=pad_id)))
    model.eval()
    ours = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = AutoModelForCausalLM.from_pretrained(loaded.weights_dir, dtype=ours.dtype,
                                                use_safetensors=True)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    theirs = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    return float((ours - theirs).abs()[mask].max())


def train_metrics(result: TrainResult, wall: float, reload_diff: float | None) -> dict:
    """The `metrics` of a trained trial's row (runner.trial.TRAIN_METRICS)."""
    first, last = result.evals[0], result.evals[-1]
    tail = result.train_losses[-10:]
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "loss_tokens": result.loss_tokens,
        "train_loss_first": result.train_losses[0] if result.train_losses else None,
        "train_loss_last10": sum(tail) / len(tail) if tail else None,
        "val_loss_initial": first.val_loss,
        "val_loss_final": last.val_loss,
        "val_loss_best": min(e.val_loss for e in result.evals),
        "retention_loss_initial": first.retention_loss,
        "retention_loss_final": last.retention_loss,
        "retention_loss_increase": None if first.retention_loss is None
        else last.retention_loss - first.retention_loss,
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "adapter_reload_max_abs_diff": reload_diff,
    }
