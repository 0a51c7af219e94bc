"""hardware.recompute: each decoder block recomputed in the backward instead of keeping its
activations; less memory held through the backward, the same trial bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import compose_config

from runner.app import run_job
from runner.config.load import to_run_config
from runner.errors import ConfigError
from runner.hardware import setup_hardware
from runner.models.loading import enable_recompute, load_model
from runner.tasks import train as train_task_module

FAST = ["+experiment=quickstart", "task=train", "hardware.threads=1", "budget.max_tokens=600",
        "budget.eval_every=4", "budget.eval_examples=8", "data.max_examples=60",
        "model=tiny_llama", "verify_adapter=false"]


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if "seconds" not in k and "per_second" not in k
                and k not in ("peak_rss_mb", "setup_cache")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.mark.parametrize("trainer", ["derived_matched_mass", "adamw"])
def test_recompute_gives_the_same_trial_bit_for_bit(trainer: str, tmp_path: Path,
                                                    monkeypatch) -> None:
    enabled = []

    def spy(model):
        enable_recompute(model)
        enabled.append(model.model.gradient_checkpointing)

    monkeypatch.setattr(train_task_module, "enable_recompute", spy)
    rows = {}
    for recompute in (False, True):
        rows[recompute] = run_job(compose_config([
            *FAST, f"trainer={trainer}", f"hardware.recompute={str(recompute).lower()}",
            f"runs_dir={tmp_path / f'runs-{recompute}'}",
            f"results_dir={tmp_path / f'results-{recompute}'}"]))
    off, on = rows[False], rows[True]
    assert enabled == [True]  # the recomputing run had its blocks recomputed
    assert on["config"]["hardware"]["recompute"] is True
    assert on["config_hash"] == off["config_hash"]  # the same trial
    assert _untimed(on["curves"]) == _untimed(off["curves"])
    assert _untimed(on["metrics"]) == _untimed(off["metrics"])
    assert on.get("derived") == off.get("derived")


def _saved_bytes(model, ids) -> int:
    """Bytes of the tensors a training forward keeps for its backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_lfm2"])
def test_recompute_keeps_only_the_blocks_inputs(model: str) -> None:
    cfg = to_run_config(compose_config([f"model={model}"]))
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    held = {}
    for recompute in (False, True):
        lm = load_model(cfg.model).model
        lm.get_output_embeddings().weight.requires_grad_(False)
        lm.train()
        if recompute:
            enable_recompute(lm)
        held[recompute] = _saved_bytes(lm, ids)
    assert held[True] < held[False] / 2, held


def test_recompute_is_torch_only() -> None:
    cfg = to_run_config(compose_config(["hardware=jax_cpu", "hardware.recompute=true"]))
    with pytest.raises(ConfigError, match="hardware.recompute: the torch backend only"):
        setup_hardware(cfg.hardware)
