"""The training loop shared by every trainer, and loss evaluation.

A trainer supplies `step(batch) -> StepLog` and `state_dict()` / `load_state_dict()`; this loop
owns everything around it: batching by (seed, epoch), the token budget, periodic evaluation,
divergence detection, checkpoints and resume (runner/training/checkpoint.py), the progress bar (tokens of
the budget, and examples of each evaluation, with an ETA), plain progress lines where no bar is
seen (runner/progress.py), and the per-step report to the tracker (runner/tracking.py).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from runner import tracking
from runner.config.schema import BudgetConfig
from runner.data import Example, batches
from runner.progress import Heartbeat, LoggedConsole, eta, format_seconds
from runner.training.checkpoint import Checkpoint


@dataclass
class StepLog:
    loss: float
    extra: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    batch_size: int

    def step(self, batch: Any) -> StepLog: ...

    def state_dict(self) -> dict[str, Any]: ...  # all stepping depends on (for checkpoints)

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class EvalPoint:
    step: int
    tokens: int
    val_loss: float
    retention_loss: float | None
    seconds: float = 0.0  # training wall seconds spent when this point was evaluated


@dataclass
class TrainResult:
    steps: int
    tokens: int  # non-padding input tokens seen by training
    loss_tokens: int  # tokens that carried loss (answer tokens for masked data)
    train_losses: list[float]
    evals: list[EvalPoint]
    stop_reason: str  # "budget", "max_steps", "certificate" or "diverged"
    train_seconds: float  # optimisation steps only: evaluation and checkpoints are not included
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
        # Shift: position t predicts token t+1 (as transformers' causal LM loss does). The
        # labels move, not the logits, and the loss runs on (B*T, V) rows: the class axis last
        # and contiguous (5x faster on CPU than cross-entropy over a transposed (B, V, T)).
        b, t, v = logits.shape
        labels = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=-100)  # (B, T)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(b * t, v).float(), labels.reshape(b * t), ignore_index=-100,
            reduction="none",
        ).view(b, t)  # (B, T); the last column is ignored (0)
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
    """Validation (and retention) loss at an evaluation point. A trainer that runs its own
    model (the MLX and JAX backends) supplies ``example_losses(examples, batch_size, pad_id)``;
    otherwise the torch ``model`` is evaluated."""

    def __init__(self, model, trainer, splits, budget: BudgetConfig, pad_id: int):
        self.trainer, self.budget, self.pad_id = trainer, budget, pad_id
        self.losses = getattr(trainer, "example_losses", None) or (
            lambda examples, bs, pad: example_losses(model, examples, bs, pad))
        self.val = splits.val[: budget.eval_examples]
        self.retention = splits.retention[: budget.eval_examples]
        self.seconds = 0.0  # time spent evaluating, excluded from training throughput
        self.per_example: list[float] = []  # mean loss per validation example, last evaluation
        self.shown = lambda done, total: None  # progress display: examples done of total

    def __call__(self, step: int, tokens: int, seconds: float = 0.0) -> EvalPoint:
        started = time.perf_counter()
        set_eval_mode(self.trainer)
        total = len(self.val) + len(self.retention)
        sums, counts = self._losses(self.val, 0, total)
        val = sum(sums) / max(sum(counts), 1)
        self.per_example = [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]
        ret = None
        if self.retention:
            sums, counts = self._losses(self.retention, len(self.val), total)
            ret = sum(sums) / max(sum(counts), 1)
        set_train_mode(self.trainer)
        self.seconds += time.perf_counter() - started
        tracking.log_step({"val_loss": val, "retention_loss": ret, "tokens": tokens}, step)
        return EvalPoint(step=step, tokens=tokens, val_loss=val, retention_loss=ret,
                         seconds=seconds)

    def _losses(self, examples, done: int, total: int) -> tuple[list[float], list[int]]:
        """The losses of `examples` one evaluation batch at a time, to show progress: the same
        batches (in order, unshuffled) as one call over all of them, so the same sums."""
        bs = self.budget.eval_batch_size
        sums: list[float] = []
        counts: list[int] = []
        for start in range(0, len(examples), bs):
            self.shown(done + start, total)
            s, c = self.losses(examples[start : start + bs], bs, self.pad_id)
            sums += s
            counts += c
        self.shown(done + len(examples), total)
        return sums, counts


def _progress(console: Console) -> Progress:
    """Two bars: training (tokens of the budget) and the evaluation under way (examples)."""
    return Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} {task.fields[unit]}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _train_info(state: LoopState, loss: float) -> str:
    return (f"step {state.step} loss {loss:.4f} val {state.evals[-1].val_loss:.4f} "
            f"{state.tokens / max(state.train_seconds, 1e-9):,.0f} tok/s")


class _Display:
    """The bars, and the plain lines that stand in for them in a log file or a pipe."""

    def __init__(self, console: Console, bar: Progress, budget: BudgetConfig):
        self.console, self.bar, self.budget = console, bar, budget
        self.train = bar.add_task("train", total=budget.max_tokens, unit="tok", info="")
        self.eval = bar.add_task("eval", total=1, unit="examples", info="", visible=False)
        self.heartbeat = Heartbeat(budget.eval_every)
        self.started, self.start_tokens = time.perf_counter(), 0

    def begin(self, state: LoopState) -> None:
        """Training starts (or resumes) here: the ETA counts from this point."""
        self.started, self.start_tokens = time.perf_counter(), state.tokens
        self.bar.update(self.train, completed=min(state.tokens, self.budget.max_tokens),
                        info=f"step {state.step} val {state.evals[-1].val_loss:.4f}")

    def evaluating(self, done: int, total: int) -> None:
        self.bar.update(self.eval, completed=done, total=total, visible=done < total)

    def step(self, state: LoopState, loss: float) -> None:
        info = _train_info(state, loss)
        self.bar.update(self.train, completed=min(state.tokens, self.budget.max_tokens),
                        info=info)
        if self.heartbeat.due(state.step):
            left = eta(state.tokens - self.start_tokens, self.budget.max_tokens - self.start_tokens,
                       time.perf_counter() - self.started)
            self._line(state, f"{info} {left}")

    def finish(self, state: LoopState) -> None:
        """The line training ends with (its stop reason), whatever the heartbeat said last."""
        loss = state.losses[-1] if state.losses else math.nan
        self._line(state, f"{_train_info(state, loss)} stopped: {state.stop_reason} after "
                          f"{format_seconds(time.perf_counter() - self.started)}")

    def _line(self, state: LoopState, info: str) -> None:
        plain_line(self.console, f"train {state.tokens:,}/{self.budget.max_tokens:,} tok {info}")


@dataclass
class LoopState:
    """Where the loop stands: with the trainer's state, all a checkpoint needs to continue."""

    evals: list[EvalPoint]
    step: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    epoch: int = 0
    next_batch: int = 0  # index of the next batch of `epoch` (batches are fixed by seed, epoch)
    epoch_start_val: float = math.nan  # validation loss when `epoch` began (certificate input)
    losses: list[float] = field(default_factory=list)
    step_logs: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = "budget"  # stays "budget" while training goes on
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        return cls(**{**d, "evals": [EvalPoint(**e) for e in d["evals"]]})

    def record(self, batch, log: StepLog) -> None:
        self.step += 1
        self.next_batch += 1
        self.tokens += int(batch.attention_mask.sum())
        self.loss_tokens += int(batch.n_tokens)
        self.losses.append(log.loss)
        self.step_logs.append({"step": self.step, "tokens": self.tokens, "loss": log.loss,
                               **log.extra})


def is_finite_step(log: StepLog) -> bool:
    """A step diverged when its loss or its gradient norm is not finite (trainers then leave
    their parameters untouched)."""
    return math.isfinite(log.loss) and math.isfinite(log.extra.get("grad_norm", 0.0))


def train_loop(model, trainer: Trainer, splits, budget: BudgetConfig, *, seed: int,
               pad_id: int, console: Console | None = None, on_eval=None,
               checkpoint: Checkpoint | None = None) -> TrainResult:
    """Train until the token budget (or max_steps) is spent, a step is not finite, or
    `on_eval(evals, step_logs, per_example_val, epoch_start_val) -> (stop, record)` says stop.

    With a `checkpoint`, the state is saved at every evaluation and at the end, and a run that
    finds a checkpoint of its own config continues from it (on CPU, bitwise as if never stopped).
    """
    console = console or Console(stderr=True)
    evaluate = _Evaluator(model, trainer, splits, budget, pad_id)
    tracking.start_loop()
    with _progress(console) as bar:
        display = _Display(console, bar, budget)
        evaluate.shown = display.evaluating

        # 1. Continue from the checkpoint, or evaluate the untrained model.
        state = _resume(checkpoint, trainer, console)
        if state is None:
            state = LoopState(evals=[evaluate(0, 0)])
            state.eval_seconds = evaluate.seconds
            _eval_line(console, state)
        evaluate.seconds = state.eval_seconds
        display.begin(state)

        # 2. Epochs of batches fixed by (seed, epoch); a resumed epoch skips what it has seen.
        while state.stop_reason == "budget" and state.tokens < budget.max_tokens:
            if state.next_batch == 0:
                state.epoch_start_val = state.evals[-1].val_loss
            started = time.perf_counter()
            for batch in batches(splits.train, trainer.batch_size, seed=seed, epoch=state.epoch,
                                 pad_id=pad_id, skip=state.next_batch):
                # 3. One step (timed with its batch: throughput counts training only).
                log = trainer.step(batch)
                state.record(batch, log)
                state.train_seconds += time.perf_counter() - started
                tracking.log_step(state.step_logs[-1], state.step)

                # 4. Stop on divergence; evaluate (and ask the certificate) every eval_every.
                if not is_finite_step(log):
                    state.stop_reason = "diverged"
                elif state.step % budget.eval_every == 0:
                    _evaluate_and_check(state, evaluate, on_eval, console)
                if (state.stop_reason == "budget" and state.tokens < budget.max_tokens
                        and budget.max_steps is not None and state.step >= budget.max_steps):
                    state.stop_reason = "max_steps"

                # 5. Checkpoint after each evaluation, with the stop decision already taken.
                if checkpoint is not None and state.step % budget.eval_every == 0:
                    checkpoint.save(state.to_dict(), trainer)
                display.step(state, log.loss)
                if state.stop_reason != "budget" or state.tokens >= budget.max_tokens:
                    break
                started = time.perf_counter()
            else:
                state.epoch, state.next_batch = state.epoch + 1, 0

        # 6. Evaluate the weights training ends with (after a diverged step: the last finite
        #    ones), and ask the certificate there too, so that a trial records the certificate
        #    it ended with even when it stopped between evaluations (its stop reason stands).
        if state.evals[-1].step != state.step:
            state.evals.append(evaluate(state.step, state.tokens, state.train_seconds))
            if on_eval is not None and math.isfinite(state.evals[-1].val_loss):
                _ask_certificate(state, evaluate, on_eval)
            state.eval_seconds = evaluate.seconds
            _eval_line(console, state)
        display.finish(state)
    set_eval_mode(trainer)  # the weights saved and verified are the evaluated ones
    if checkpoint is not None:  # a finished loop: a rerun (or a grid point) just reads it back
        checkpoint.save(state.to_dict(), trainer)
    return TrainResult(state.step, state.tokens, state.loss_tokens, state.losses, state.evals,
                       state.stop_reason, state.train_seconds, state.step_logs,
                       eval_seconds=state.eval_seconds)


def _resume(checkpoint: Checkpoint | None, trainer, console: Console) -> LoopState | None:
    stored = checkpoint.load() if checkpoint is not None else None
    if stored is None:
        return None
    state = LoopState.from_dict(checkpoint.restore(stored, trainer))
    console.print(f"resumed at step {state.step} (epoch {state.epoch}, batch {state.next_batch}, "
                  f"{state.tokens} tokens) from {checkpoint.path}")
    return state


def _ask_certificate(state: LoopState, evaluate: _Evaluator, on_eval) -> bool:
    """Whether ``on_eval`` says stop, for the evaluation just made; its time counts as
    evaluation time (not training time either)."""
    started = time.perf_counter()
    stop, _ = on_eval(state.evals, state.step_logs, evaluate.per_example, state.epoch_start_val)
    evaluate.seconds += time.perf_counter() - started
    return bool(stop)


def _evaluate_and_check(state: LoopState, evaluate: _Evaluator, on_eval,
                        console: Console) -> None:
    """Evaluate; a non-finite validation loss is a divergence, else the certificate may stop."""
    state.evals.append(evaluate(state.step, state.tokens, state.train_seconds))
    if not math.isfinite(state.evals[-1].val_loss):
        state.stop_reason = "diverged"
    elif on_eval is not None and _ask_certificate(state, evaluate, on_eval):
        state.stop_reason = "certificate"
    state.eval_seconds = evaluate.seconds
    _eval_line(console, state)


def _eval_line(console: Console, state: LoopState) -> None:
    point = state.evals[-1]
    retention = "" if point.retention_loss is None else f" retention {point.retention_loss:.4f}"
    plain_line(console, f"eval step {point.step} tokens {point.tokens:,}: val "
                        f"{point.val_loss:.4f}{retention}")


def plain_line(console: Console, line: str) -> None:
    """A progress line for a log file or a pipe (a terminal sees the live bars instead)."""
    if isinstance(console, LoggedConsole):
        console.log_line(line)
    elif not console.is_terminal:
        console.print(line, markup=False, highlight=False)
