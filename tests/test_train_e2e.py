"""End to end on tiny random models: train, save, reload with PEFT, ledger row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import compose_config

from runner.app import run_job
from runner.config.load import to_run_config
from runner.data import batches, load_splits
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path
from runner.training.loop import evaluate_loss

FAST = ["task=train", "budget.max_tokens=2500", "budget.eval_every=5", "budget.eval_examples=8",
        "data.max_examples=120"]


def _train(overrides: list[str]) -> dict:
    return run_job(compose_config(["+experiment=quickstart", *FAST, *overrides]))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_lfm2"])
def test_quickstart_writes_one_complete_trial(model: str, ledger_overrides: list[str]) -> None:
    row = _train([f"model={model}", *ledger_overrides])
    results_dir = Path(ledger_overrides[0].split("=", 1)[1])
    files = list((results_dir / "trials").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    for key in ("run_id", "experiment", "arm", "seed", "hardware", "backend", "dtype",
                "model_id", "model_sha256", "data_sha256", "config_hash", "git_commit",
                "packages", "started_at", "ended_at", "metrics", "stop_reason"):
        assert stored[key] is not None, key
    m = stored["metrics"]
    assert m["tokens"] >= 2500 and m["steps"] > 0 and m["tokens_per_second"] > 0
    assert m["val_loss_final"] < m["val_loss_initial"]  # lr 1e-3 on a random model: must learn
    assert m["adapter_reload_max_abs_diff"] <= 1e-5
    assert stored["model_id"] == model and len(stored["model_sha256"]) == 64
    assert row["run_id"] == stored["run_id"]


def test_peft_reload_reproduces_the_runners_evaluation(ledger_overrides: list[str]) -> None:
    """Oracle: PEFT's own loader + our loss on the same examples gives the recorded val loss."""
    from peft import PeftModel

    row = _train(ledger_overrides)
    cfg = compose_config(["+experiment=quickstart", *FAST])
    loaded = load_model(to_run_config(cfg).model)
    model = PeftModel.from_pretrained(loaded.model, row["adapter_path"]).eval()
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    val = evaluate_loss(model, splits.val[:8], 8, loaded.tokenizer.pad_token_id)
    assert val == pytest.approx(row["metrics"]["val_loss_final"], rel=1e-5)  # same fp32 graph


def test_same_seed_same_result(ledger_overrides: list[str]) -> None:
    a = _train(ledger_overrides)
    b = _train(ledger_overrides)
    assert a["curves"]["train_loss"] == b["curves"]["train_loss"]  # bitwise on CPU
    assert a["config_hash"] == b["config_hash"] and a["run_id"] != b["run_id"]


def test_batches_cover_the_data_once_per_epoch() -> None:
    cfg = compose_config(["+experiment=quickstart"])
    loaded = load_model(to_run_config(cfg).model)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer, max_seq_len=96,
                         val_fraction=0.1, retention_path=None, max_examples=50)
    seen = sum(int(b.input_ids.shape[0]) for b in batches(splits.train, 4, seed=0, epoch=0,
                                                          pad_id=0))
    assert seen == len(splits.train)
    assert torch.is_tensor(next(iter(batches(splits.train, 4, seed=0, epoch=0, pad_id=0))).labels)
