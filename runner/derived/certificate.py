"""The geometric stopping certificate (row 9), asked at every evaluation of a derived run."""

from __future__ import annotations

import math
from typing import Any

import torch

import geometry
from runner.data import collate


def ngram_repetition(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def calibration_batch(examples, pad_id: int, size: int):
    """The first ``size`` examples as one right-padded batch."""
    return collate(list(examples[:size]), pad_id=pad_id)


def prompts_of(examples, count: int, max_prompt: int = 24) -> list[torch.Tensor]:
    """The answer-free beginning of a few validation examples, for the drift criterion."""
    prompts = []
    for ex in examples[:count]:
        cut = next((i for i, lab in enumerate(ex.labels) if lab != -100), len(ex.labels))
        cut = max(1, min(cut, max_prompt))
        prompts.append(torch.tensor(ex.input_ids[:cut]))
    return prompts


class CertificateMonitor:
    """Computes the four criteria at each evaluation; says when the certificate holds.

    The trainer supplies what depends on its model: ``generation_stats(prompts, new_tokens,
    pad_id)`` (mean next-token entropy and 4-gram repetition of greedy continuations) and
    ``curvature(val_batch)`` (a = grad L_val . d and b = d^T H_val d along its last update d)."""

    def __init__(self, trainer, val_batch, prompts, pad_id: int, grad_window: int,
                 new_tokens: int = 16):
        self.trainer, self.val_batch, self.prompts = trainer, val_batch, prompts
        self.pad_id, self.grad_window, self.new_tokens = pad_id, grad_window, new_tokens
        # S = 0 here (a resumed run loads its adapters later): the base model's statistics
        self.base_entropy, self.base_rep = trainer.generation_stats(prompts, new_tokens, pad_id)
        self.history: list[dict] = []

    def on_eval(self, evals, step_logs, per_example_val: list[float], epoch_start_val: float):
        """Evaluate the certificate; return (satisfied, record)."""
        t = self.trainer
        t.eval_mode()
        vals = [e.val_loss for e in evals]
        stationarity = _windowed(geometry.gradient_stationarity, grad_norm_series(step_logs),
                                 self.grad_window)
        improvement = geometry.predicted_improvement(
            *t.curvature(self.val_batch), geometry.validation_ci_half_width(per_example_val))
        entropy, rep = t.generation_stats(self.prompts, self.new_tokens, self.pad_id)
        criteria = [
            stationarity, improvement,
            geometry.generation_drift(entropy, self.base_entropy, rep, self.base_rep),
            _windowed(geometry.validation_stability, vals, 2),
        ]
        cert = geometry.stopping_certificate(*criteria,
                                             validation_fell=vals[-1] < epoch_start_val)
        record = {"step": evals[-1].step, "tokens": evals[-1].tokens, **cert.to_dict()}
        self.history.append(record)
        t.train_mode()
        return cert.satisfied, record

    def state_dict(self) -> dict[str, Any]:
        """The certificate's history (the base model's generation statistics are recomputed)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def certificate_monitor(cfg, trainer, splits, pad_id: int) -> CertificateMonitor:
    """The monitor of a derived run: its validation batch (the first 8 validation examples),
    its 4 generation prompts and its gradient window (half the evaluation interval, at least
    2 steps). The curvature criterion reads the trainer's last update, so it is kept."""
    trainer.keep_direction = True
    return CertificateMonitor(trainer, calibration_batch(splits.val, pad_id, 8),
                              prompts_of(splits.val, 4), pad_id,
                              grad_window=max(2, cfg.budget.eval_every // 2))


def grad_norm_series(step_logs: list[dict]) -> list[float]:
    return [log["grad_norm"] for log in step_logs if math.isfinite(log.get("grad_norm", math.nan))]


def _windowed(criterion, series, window):
    """A two-window criterion needs 2 full windows; before that it cannot pass."""
    if len(series) < 2 * window or window < 2:
        return geometry.Criterion(criterion.__name__, math.nan, math.nan, False)
    return criterion(series, window)
