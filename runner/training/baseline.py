"""PEFT LoRA baselines: every knob the derived trainer removes is an explicit option here.

`adamw` follows PEFT's common defaults (r=8, alpha=16, q/v projections). The learning rate and
the rest come from the trainer config; nothing is derived.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model

from runner.config.schema import LoraBaselineConfig, Schedule
from runner.errors import ConfigError
from runner.training.loop import StepLog


def attach_lora(model, cfg: LoraBaselineConfig, patterns: dict | None = None):
    """Wrap `model` with PEFT LoRA adapters as the config says.

    `patterns` (`DerivedHyperparameters.peft_patterns()`) replaces the config's rank, alpha and
    targets with per-module ones: the derived trainer's adapter shapes under AdamW.
    """
    shape = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": list(cfg.target_modules)}
    if patterns is not None:  # (the derivation's own module names: nothing to check)
        shape = {k: patterns[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern",
                                          "alpha_pattern")}
    else:
        check_target_modules(model, list(cfg.target_modules))
    lora = LoraConfig(**shape, lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_target_modules(model, targets: list[str]) -> None:
    """Refuse target modules the model lacks, naming them and the Linear layers it has: PEFT
    matches each entry as the last part(s) of a module's dotted name, and refuses only when no
    entry matches, so a misspelt one among correct ones would go unadapted without a word."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"trainer.target_modules: {', '.join(missing)} not in "
                          f"{type(model).__name__} (its Linear layers: {', '.join(linears)})")


def build_optimizer(params, cfg: LoraBaselineConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":  # LoRA's factors are matrices, which is all Muon accepts
        return torch.optim.Muon(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, adjust_lr_fn="match_rms_adamw")
    raise ValueError(f"trainer.optimizer: unknown optimizer '{cfg.optimizer}'")


def lr_factor(step: int, total_steps: int, cfg: LoraBaselineConfig) -> float:
    """Multiplier of the base learning rate at `step` (0-based): linear warmup, then the schedule."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if cfg.schedule is Schedule.linear:
        return max(0.0, 1.0 - progress)
    if cfg.schedule is Schedule.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class BaselineTrainer:
    """One optimizer step per batch on the PEFT LoRA parameters."""

    def __init__(self, peft_model, cfg: LoraBaselineConfig, total_steps: int):
        self.model = peft_model
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg)
        )
        self.total_steps = total_steps
        self.training = False  # whether train_mode is in force (model and optimizer)

    def train_mode(self) -> None:
        """Schedule-Free evaluates at a different point (x) than it trains at (y)."""
        self.training = True
        self.model.train()
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()

    def eval_mode(self) -> None:
        self.training = False
        self.model.eval()
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()

    def state_dict(self) -> dict:
        """The LoRA weights, the optimizer's moments and the scheduler's position."""
        return {
            "params": {n: p.detach().clone() for n, p in self.model.named_parameters()
                       if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if params.keys() != state["params"].keys():
            raise ValueError("the LoRA parameters differ from the checkpoint's")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def step(self, batch) -> StepLog:
        if not (self.training and self.model.training):  # a walk over every module: once, and
            self.train_mode()                            # again only after an evaluation
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         labels=batch.labels)
        loss = out.loss
        if not torch.isfinite(loss):
            return StepLog(loss=float(loss.detach()))
        loss.backward()
        grad_norm = self._grad_norm()
        if not torch.isfinite(grad_norm):  # diverged: weights and optimizer stay as they are
            self.optimizer.zero_grad(set_to_none=True)
            return StepLog(loss=float(loss.detach()), extra={"grad_norm": float(grad_norm)})
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepLog(loss=float(loss.detach()), extra={"lr": lr, "grad_norm": float(grad_norm)})

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' total 2-norm, clipped to ``max_grad_norm`` when one is set. Without
        one only the norm is computed: clipping to infinity would multiply every gradient by
        exactly 1, a pass over them that changes nothing."""
        if self.cfg.max_grad_norm:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
