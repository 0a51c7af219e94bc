"""The training loop shared by every trainer, and loss evaluation.

A trainer supplies `step(batch) -> StepLog`; this loop owns everything around it: batching by
(seed, epoch), the token budget, periodic evaluation, divergence detection and the progress bar.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from runner.data import Example, batches
from runner.schema import BudgetConfig


@dataclass
class StepLog:
    loss: float
    extra: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    batch_size: int

    def step(self, batch: Any) -> StepLog: ...


@dataclass
class EvalPoint:
    step: int
    tokens: int
    val_loss: float
    retention_loss: float | None


@dataclass
class TrainResult:
    steps: int
    tokens: int  # non-padding input tokens seen by training
    loss_tokens: int  # tokens that carried loss (answer tokens for masked data)
    train_losses: list[float]
    evals: list[EvalPoint]
    stop_reason: str  # "budget", "max_steps" or "diverged"
    train_seconds: float  # optimisation only: evaluation time is not included
    step_logs: list[dict[str, float]]
    eval_seconds: float = 0.0


@torch.no_grad()
def example_losses(model, examples: tuple[Example, ...], batch_size: int,
                   pad_id: int) -> tuple[list[float], list[int]]:
    """Per-example summed next-token cross-entropy over unmasked labels, and token counts."""
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for batch in batches(examples, batch_size, seed=0, epoch=0, pad_id=pad_id, shuffle=False):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        # Shift: position t predicts token t+1 (as transformers' causal LM loss does).
        logits = logits[:, :-1, :].float()  # (B, T-1, V)
        labels = batch.labels[:, 1:]  # (B, T-1)
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none",
        )  # (B, T-1)
        sums.extend(loss.double().sum(dim=1).tolist())
        counts.extend((labels != -100).sum(dim=1).tolist())
    model.train(was_training)
    return sums, counts


def evaluate_loss(model, examples: tuple[Example, ...], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean next-token cross-entropy over the unmasked labels of `examples`."""
    sums, counts = example_losses(model, examples, batch_size, pad_id)
    return sum(sums) / max(sum(counts), 1)


def set_eval_mode(trainer) -> None:
    """Put the trainer's weights at their evaluation point (e.g. Schedule-Free's x)."""
    if hasattr(trainer, "eval_mode"):
        trainer.eval_mode()


def set_train_mode(trainer) -> None:
    if hasattr(trainer, "train_mode"):
        trainer.train_mode()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Evaluator:
    def __init__(self, model, trainer, splits, budget: BudgetConfig, pad_id: int):
        self.model, self.trainer, self.budget, self.pad_id = model, trainer, budget, pad_id
        self.val = splits.val[: budget.eval_examples]
        self.retention = splits.retention[: budget.eval_examples]
        self.seconds = 0.0  # time spent evaluating, excluded from training throughput
        self.per_example: list[float] = []  # mean loss per validation example, last evaluation

    def __call__(self, step: int, tokens: int) -> EvalPoint:
        started = time.perf_counter()
        bs = self.budget.eval_batch_size
        set_eval_mode(self.trainer)
        sums, counts = example_losses(self.model, self.val, bs, self.pad_id)
        val = sum(sums) / max(sum(counts), 1)
        self.per_example = [s / max(c, 1) for s, c in zip(sums, counts)]
        ret = evaluate_loss(self.model, self.retention, bs, self.pad_id) if self.retention else None
        set_train_mode(self.trainer)
        self.seconds += time.perf_counter() - started
        return EvalPoint(step=step, tokens=tokens, val_loss=val, retention_loss=ret)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
        TimeElapsedColumn(),
        console=console,
    )


def train_loop(model, trainer: Trainer, splits, budget: BudgetConfig, *, seed: int,
               pad_id: int, console: Console | None = None, on_eval=None) -> TrainResult:
    """Train until the token budget (or max_steps) is spent, the loss stops being finite, or
    `on_eval(evals, step_logs, per_example_val, epoch_start_val) -> (stop, record)` says stop."""
    console = console or Console(stderr=True)
    evaluate = _Evaluator(model, trainer, splits, budget, pad_id)
    evals = [evaluate(0, 0)]
    first_eval_seconds = evaluate.seconds
    step, tokens, loss_tokens, epoch = 0, 0, 0, 0
    losses: list[float] = []
    step_logs: list[dict[str, float]] = []
    stop_reason = "budget"
    start = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("train", total=budget.max_tokens, step=0, loss=float("nan"),
                            val=f"{evals[0].val_loss:.4f}", tok_s=0.0)
        while stop_reason == "budget" and tokens < budget.max_tokens:
            epoch_start_val = evals[-1].val_loss
            for batch in batches(splits.train, trainer.batch_size, seed=seed, epoch=epoch,
                                 pad_id=pad_id):
                log = trainer.step(batch)
                step += 1
                tokens += int(batch.attention_mask.sum())
                loss_tokens += int(batch.n_tokens)
                losses.append(log.loss)
                step_logs.append({"step": step, "tokens": tokens, "loss": log.loss, **log.extra})
                if not math.isfinite(log.loss):
                    stop_reason = "diverged"
                    break
                elapsed = time.perf_counter() - start - (evaluate.seconds - first_eval_seconds)
                if step % budget.eval_every == 0:
                    evals.append(evaluate(step, tokens))
                    if on_eval is not None:
                        cert_started = time.perf_counter()
                        stop, _ = on_eval(evals, step_logs, evaluate.per_example, epoch_start_val)
                        evaluate.seconds += time.perf_counter() - cert_started
                        if stop:
                            stop_reason = "certificate"
                            break
                    if not console.is_terminal:  # a log file gets one line per evaluation
                        console.print(f"step {step} tokens {tokens} loss {log.loss:.4f} "
                                      f"val {evals[-1].val_loss:.4f} "
                                      f"{tokens / max(elapsed, 1e-9):.0f} tok/s")
                bar.update(task, completed=min(tokens, budget.max_tokens), step=step,
                           loss=log.loss, val=f"{evals[-1].val_loss:.4f}",
                           tok_s=tokens / max(elapsed, 1e-9))
                if tokens >= budget.max_tokens:
                    break
                if budget.max_steps is not None and step >= budget.max_steps:
                    stop_reason = "max_steps"
                    break
            epoch += 1
    if stop_reason != "diverged" and evals[-1].step != step:
        evals.append(evaluate(step, tokens))
    train_seconds = time.perf_counter() - start - (evaluate.seconds - first_eval_seconds)
    set_eval_mode(trainer)  # the weights saved and verified are the evaluated ones
    return TrainResult(step, tokens, loss_tokens, losses, evals, stop_reason, train_seconds,
                       step_logs, eval_seconds=evaluate.seconds)
