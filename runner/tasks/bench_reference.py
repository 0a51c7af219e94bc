"""The bench's stock reference: PEFT LoRA + AdamW as a user writes it from the libraries' own
documentation, with none of this project's code around it.

`get_peft_model` with `LoraConfig(r=8, target_modules=["q_proj", "v_proj"])` (PEFT's defaults
otherwise: lora_alpha=8, lora_dropout=0.0), the Hugging Face loss (`model(input_ids=...,
labels=...)`), `torch.optim.AdamW` at its defaults but the learning rate. It is the arm a skeptic
would write to check the bench's own baselines, so the bench measures it in the same run, on the
same batches and threads, and compares the derived trainer against the faster of the two.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from runner.training.loop import StepLog

STOCK_TARGETS = ("q_proj", "v_proj")
STOCK_R = 8


class StockPeftTrainer:
    """One plain PEFT + AdamW step per batch: forward with labels, backward, step, zero."""

    def __init__(self, model, lr: float, batch_size: int):
        torch.manual_seed(0)  # PEFT draws lora_A from torch's global generator
        self.model = get_peft_model(model, LoraConfig(r=STOCK_R, target_modules=list(STOCK_TARGETS),
                                                      task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.batch_size = batch_size
        cfg = self.model.peft_config["default"]
        self.adapters = (f"stock PEFT: r={cfg.r} alpha={cfg.lora_alpha} "
                         f"dropout={cfg.lora_dropout} on "
                         + "/".join(t.removesuffix("_proj") for t in sorted(cfg.target_modules)))

    def step(self, batch) -> StepLog:
        loss = self.model(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return StepLog(loss=loss.item())
