"""The trained factors as plain PEFT LoRA: B = c U diag(S), A = V^T, lora_alpha = rank (the
tail start: rank 2r, its frozen tail included; DerivedTrainer.peft_weights)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model


def export_peft(base_model, trainer, derived):
    """Detach the trainer's adapters from ``base_model`` (torch: remove the hooks) and attach
    the same adapters as PEFT LoRA modules; returns the PEFT model in evaluation mode."""
    trainer.ops.detach()
    patterns = derived.peft_patterns()
    specs = trainer.adapters.specs
    dropout = sum(s.dropout for s in specs.values()) / len(specs)  # PEFT has one dropout
    ranks = trainer.peft_ranks()
    r = patterns["r"] * (2 if ranks != patterns["rank_pattern"] else 1)
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=list(specs),
        rank_pattern=ranks, alpha_pattern=ranks,
        lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base_model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in trainer.peft_weights().items():
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return peft_model.eval()
