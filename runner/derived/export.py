"""The trained factors as plain PEFT LoRA: B = c U diag(S), A = V^T, lora_alpha = r."""

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
    config = LoraConfig(
        r=patterns["r"], lora_alpha=patterns["r"], target_modules=list(specs),
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
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
