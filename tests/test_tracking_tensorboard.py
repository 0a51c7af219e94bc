"""tracking=tensorboard: the event files hold every step and evaluation the trial records, read
back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from support import compose_config

from runner.app import run_job
from runner.config.load import to_run_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

TRACKED_RUN = ["+experiment=quickstart", "task=train", "budget.max_tokens=400",
               "budget.eval_every=2", "budget.eval_examples=4", "data.max_examples=60",
               "verify_adapter=false", "tracking=tensorboard"]


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores a scalar as a float32


def test_tensorboard_has_every_step_and_evaluation(tmp_path: Path) -> None:
    row = run_job(compose_config([*TRACKED_RUN, f"results_dir={tmp_path / 'results'}",
                                  f"runs_dir={tmp_path / 'runs'}"]))
    folder = tmp_path / "runs" / "tensorboard" / row["run_id"]
    assert list(folder.glob("events.out.tfevents.*"))
    events = _events(folder)
    losses = _scalars(events, "loss")
    assert len(row["curves"]["train_loss"]) == row["metrics"]["steps"] >= 2
    assert losses == {step: f32(loss)
                      for step, loss in enumerate(row["curves"]["train_loss"], start=1)}
    val, tokens = _scalars(events, "val_loss"), _scalars(events, "tokens")
    assert len(row["curves"]["eval"]) >= 2
    for point in row["curves"]["eval"]:
        assert val[point["step"]] == f32(point["val_loss"])
        assert tokens[point["step"]] == f32(point["tokens"])
    assert _scalars(events, "summary/val_loss_final")[0] == f32(row["metrics"]["val_loss_final"])
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"name": "adamw"' in config and '"max_tokens": 400' in config  # the resolved config
    assert not list(folder.glob("loop-*"))  # one training loop: one run


def test_tensorboard_gives_each_grid_point_its_own_run(tmp_path: Path) -> None:
    """adamw_grid trains once per learning rate, each loop counting steps from 1: loop k > 0
    is its own run under loop-<k>/, so no step is logged twice in one run."""
    row = run_job(compose_config([*TRACKED_RUN, "trainer=adamw_grid",
                                  "trainer.lr_grid=[0.001,0.01]",
                                  f"results_dir={tmp_path / 'results'}",
                                  f"runs_dir={tmp_path / 'runs'}"]))
    folder = tmp_path / "runs" / "tensorboard" / row["run_id"]
    first, second = _events(folder), _events(folder / "loop-1")
    for events in (first, second):
        steps = [e.step for e in events.Scalars("loss")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert _scalars(second, "val_loss") != _scalars(first, "val_loss")  # another lr


def test_tensorboard_records_the_verdicts(tmp_path: Path) -> None:
    from runner.tracking import mirror_verdicts

    cfg = to_run_config(compose_config(["tracking=tensorboard", "+experiment=quickstart",
                                        f"runs_dir={tmp_path / 'runs'}"]))
    verdict = SimpleNamespace(claim_id="derived_beats_sgd", verdict=SimpleNamespace(
        value="VALIDATED"), effect=0.5, p_value=0.01, n=3, rule_hash="abc", reason="test")
    mirror_verdicts(cfg, [verdict])
    events = _events(tmp_path / "runs" / "tensorboard" / "claims-quickstart")
    text = events.Tensors("verdicts/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| derived_beats_sgd | VALIDATED | 0.5 | 0.01 | 3 | abc | test |" in text
