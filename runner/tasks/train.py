"""task=train: load -> attach adapters -> train -> evaluate -> save adapter -> ledger row."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from runner.checkpoint import Checkpoint, remove_checkpoints
from runner.data import DataError, load_splits
from runner.errors import HardwareUnavailable
from runner.hardware import HardwareInfo, resolved, setup_hardware
from runner.ledger import (
    git_commit,
    new_run_id,
    package_versions,
    stable_hash,
    utc_now,
    write_trial,
)
from runner.models import LoadedModel, load_model
from runner.schema import RunConfig
from runner.tracking import mirror_trial
from runner.trainers.baseline import BaselineTrainer, attach_lora
from runner.paths import PROJECT_ROOT
from runner.training import TrainResult, peak_rss_mb, train_loop
from runner.derived import is_derived, run_derived
from runner.trial import TrainOutcome, config_hash

def resolve_data_path(path: str | None) -> str | None:
    """A relative data path is looked up in the working directory, then in the project root."""
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = PROJECT_ROOT / path
    return str(candidate) if candidate.exists() else path


def check_data_paths(cfg: RunConfig) -> tuple[str, str | None]:
    """Resolve the data files and fail before any model is loaded if one is missing."""
    data_path = resolve_data_path(cfg.data.path)
    retention_path = resolve_data_path(cfg.data.retention_path)
    for key, path in (("data.path", data_path), ("data.retention_path", retention_path)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{key}={path}: no such file")
    return data_path, retention_path


def train_task(cfg: RunConfig, *, claim_id: str | None = None, rule_hash: str | None = None,
               claim_arm: str | None = None) -> dict:
    """Run one trial; `claim_id` / `rule_hash` / `claim_arm` tag it when a claim's decision rule
    asked for it (the arm's name in the claim, which two arms with one trainer tell apart)."""
    console = Console(stderr=True)
    started = utc_now()
    wall_start = time.perf_counter()

    # 1. Hardware, then the model and the data (errors here name the file and line).
    hw = setup_hardware(cfg.hardware)
    cfg = resolved(cfg, hw)  # mlx device auto -> the device that runs (in the config hash)
    data_path, retention_path = check_data_paths(cfg)
    loaded = load_model(cfg.model, dtype=hw.dtype, device=hw.torch_device)
    splits = load_splits(
        data_path, loaded.tokenizer,
        max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
        retention_path=retention_path, max_examples=cfg.data.max_examples,
    )
    if not splits.train or not splits.val:
        raise DataError(f"{cfg.data.path}: too few examples for a train/validation split")
    console.print(f"model {loaded.model_id} sha256 {loaded.sha256[:12]}  data {cfg.data.id} "
                  f"train {len(splits.train)} val {len(splits.val)} "
                  f"retention {len(splits.retention)}")

    # 2. Train with the configured trainer (a grid trains once per learning rate).
    pad_id = loaded.tokenizer.pad_token_id
    outcome = run_trainer(cfg, loaded, splits, pad_id, console)
    model, result = outcome.model, outcome.result

    # 3. Save the adapter in PEFT's format and check PEFT reloads it to the same logits.
    chash = config_hash(cfg)
    run_id = new_run_id(cfg.experiment, cfg.trainer.name, cfg.seed, chash)
    adapter_dir = Path(cfg.runs_dir) / run_id / "adapter"
    model.save_pretrained(adapter_dir)
    reload_diff = (verify_adapter(model, loaded, adapter_dir, splits.val[:4], pad_id)
                   if cfg.verify_adapter else None)

    # 4. One trial row in the ledger.
    row = _trial_row(cfg, hw, loaded, splits, result, run_id, chash, started,
                     time.perf_counter() - wall_start, adapter_dir, reload_diff)
    row["metrics"].update(outcome.extra_metrics)
    row.update(claim_id=claim_id, rule_hash=rule_hash, claim_arm=claim_arm,
               hyperparameters=outcome.hyperparameters,
               derived=outcome.derived, certificate=outcome.certificate)
    if outcome.step_table:
        row["curves"]["steps"] = outcome.step_table
    path = write_trial(cfg.results_dir, row)
    remove_checkpoints(cfg.runs_dir, chash)  # the trial is in the ledger: nothing to resume
    mirror_trial(cfg, row)
    m = row["metrics"]
    console.print(f"[bold]done[/] {result.stop_reason}: val {m['val_loss_initial']:.4f} -> "
                  f"{m['val_loss_final']:.4f}, {m['tokens_per_second']:.0f} tok/s, "
                  f"trial {path}")
    return row


def run_trainer(cfg: RunConfig, loaded: LoadedModel, splits, pad_id: int,
                console: Console) -> TrainOutcome:
    backend = getattr(cfg.hardware.backend, "value", cfg.hardware.backend)
    if backend != "torch":
        # mlx / jax: only the derived trainer has a backend implementation (PEFT and the
        # baseline optimizers are torch code); a sweep records the other arms as SKIPPED.
        if not is_derived(cfg.trainer.name):
            raise HardwareUnavailable(
                f"trainer={cfg.trainer.name} runs on torch only; hardware={cfg.hardware.name} "
                f"(backend {backend}) runs the derived readings only")
        return run_derived(cfg, loaded, splits, pad_id, console)
    if cfg.trainer.name == "adamw_grid":
        return run_lr_grid(cfg, loaded, splits, pad_id, console)
    if is_derived(cfg.trainer.name):
        return run_derived(cfg, loaded, splits, pad_id, console)
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

    from runner.data import batches

    batch = next(iter(batches(examples, len(examples), seed=0, epoch=0, pad_id=pad_id)))
    model.eval()
    ours = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base = AutoModelForCausalLM.from_pretrained(loaded.weights_dir, dtype=ours.dtype,
                                                use_safetensors=True)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    theirs = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    return float((ours - theirs).abs()[mask].max())


def _trial_row(cfg: RunConfig, hw: HardwareInfo, loaded: LoadedModel, splits,
               result: TrainResult, run_id: str, chash: str, started: str, wall: float,
               adapter_dir: Path, reload_diff: float | None) -> dict:
    first, last = result.evals[0], result.evals[-1]
    tail = result.train_losses[-10:]
    metrics = {
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
        "train_seconds": result.train_seconds,
        "wall_seconds": wall,
        "tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "adapter_reload_max_abs_diff": reload_diff,
    }
    return {
        "run_id": run_id,
        "experiment": cfg.experiment,
        "claim_id": None,
        "rule_hash": None,
        "arm": cfg.trainer.name,
        "seed": cfg.seed,
        **hw.as_row(),
        "model_id": loaded.model_id,
        "model_sha256": loaded.sha256,
        "model_type": loaded.model_type,
        "data_id": cfg.data.id,
        "data_sha256": splits.sha256,
        "data_sizes": {"train": len(splits.train), "val": len(splits.val),
                       "retention": len(splits.retention)},
        "config_hash": chash,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "started_at": started,
        "ended_at": utc_now(),
        "metrics": metrics,
        "curves": {"eval": [asdict(e) for e in result.evals],
                   "train_loss": result.train_losses},
        "derived": None,
        "hyperparameters": OmegaConf.to_container(OmegaConf.structured(cfg.trainer),
                                                  enum_to_str=True),
        "stop_reason": result.stop_reason,
        "certificate": None,
        "status": "diverged" if result.stop_reason == "diverged" else "ok",
        "diverged_at": result.step_logs[-1] if result.stop_reason == "diverged" else None,
        "adapter_path": str(adapter_dir),
    }
