"""Divergence: a non-finite loss or gradient ends the trial with stop reason `diverged`, the
weights of the last finite step, a ledger row and exit status 0 -- never a crash or a NaN
adapter."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import ROOT, compose_config

from runner.app import run_job
from runner.derived.trainer import DerivedTrainer
from runner.training.baseline import BaselineTrainer

AT_STEP = 3
# One thread: on a shared CPU, torch's thread pool spinning against other processes makes
# these tiny runs many times slower.
BASELINE = ["+experiment=quickstart", "task=train", "hardware.threads=1",
            "budget.max_tokens=3000", "budget.eval_every=2", "budget.eval_examples=4",
            "data.max_examples=60"]
DERIVED = [*BASELINE, "trainer=derived"]


def _poison_loss(model):
    """Make the model's next loss NaN (a forward hook on the PEFT model's output)."""
    def hook(module, args, kwargs, out):
        out.loss = out.loss * math.nan
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


def _poison_grads(params):
    """Make the next gradient of the first parameter non-finite (the loss stays finite)."""
    return params[0].register_hook(lambda g: torch.full_like(g, math.inf))


def _poisoned_step(cls, poison: str, snapshots: list):
    """`cls.step`, poisoned at step AT_STEP; snapshots the weights around that step."""
    original, calls = cls.step, [0]

    def step(self, batch):
        calls[0] += 1
        if calls[0] != AT_STEP:
            return original(self, batch)
        handle = (_poison_loss(self.model) if poison == "loss" and cls is BaselineTrainer
                  else _poison_grads(self.params))
        before = [p.detach().clone() for p in self.params]
        try:
            log = original(self, batch)
        finally:
            handle.remove()
        snapshots.append((before, [p.detach().clone() for p in self.params]))
        return log

    return step


def _derived_nan_loss(snapshots: list):
    """DerivedTrainer's own loss (not the model's) made NaN at step AT_STEP."""
    original_fb, original_step, calls = (DerivedTrainer._forward_backward, DerivedTrainer.step,
                                         [0])

    def forward_backward(self, batch, **kwargs):
        loss, grads = original_fb(self, batch, **kwargs)
        return (loss * math.nan if calls[0] == AT_STEP and self._in_step else loss), grads

    def step(self, batch):
        calls[0] += 1
        self._in_step = True  # the certificate also calls _forward_backward: leave it alone
        before = [p.detach().clone() for p in self.params]
        try:
            log = original_step(self, batch)
        finally:
            self._in_step = False
        if calls[0] == AT_STEP:
            snapshots.append((before, [p.detach().clone() for p in self.params]))
        return log

    return forward_backward, step


def _check_diverged_row(row: dict, snapshots: list) -> None:
    assert row["stop_reason"] == "diverged" and row["status"] == "diverged"
    assert row["metrics"]["steps"] == AT_STEP
    last = row["diverged_at"]
    assert last["step"] == AT_STEP
    assert not (math.isfinite(last["loss"]) and math.isfinite(last.get("grad_norm", 0.0)))
    # The diverged step left every weight as it was, and the adapter on disk is finite.
    (before, after), = snapshots
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    tensors = load_file(Path(row["adapter_path"]) / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert math.isfinite(row["metrics"]["val_loss_final"])  # the last finite weights, evaluated
    assert row["curves"]["eval"][-1]["step"] == AT_STEP


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_baseline_divergence_ends_the_trial(poison: str, tmp_path: Path, monkeypatch) -> None:
    snapshots: list = []
    monkeypatch.setattr(BaselineTrainer, "step", _poisoned_step(BaselineTrainer, poison, snapshots))
    row = run_job(compose_config([*BASELINE, f"results_dir={tmp_path}/results",
                                  f"runs_dir={tmp_path}/runs"]))
    _check_diverged_row(row, snapshots)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_derived_divergence_ends_the_trial(poison: str, tmp_path: Path, monkeypatch) -> None:
    snapshots: list = []
    if poison == "loss":
        forward_backward, step = _derived_nan_loss(snapshots)
        monkeypatch.setattr(DerivedTrainer, "_forward_backward", forward_backward)
        monkeypatch.setattr(DerivedTrainer, "_in_step", False, raising=False)
    else:
        step = _poisoned_step(DerivedTrainer, poison, snapshots)
    monkeypatch.setattr(DerivedTrainer, "step", step)
    row = run_job(compose_config([*DERIVED, f"results_dir={tmp_path}/results",
                                  f"runs_dir={tmp_path}/runs"]))
    _check_diverged_row(row, snapshots)
    assert row["curves"]["steps"][-1]["step"] == AT_STEP  # the diverged step's log is kept
    # the certificate of the weights the trial ends with (the last finite ones), not of an
    # earlier evaluation (there was one at step 2)
    assert row["certificate"]["step"] == AT_STEP


DRIVER = """
import sys
sys.path.insert(0, "tests")
import test_divergence as t
from runner.app import main
from runner.training.baseline import BaselineTrainer
BaselineTrainer.step = t._poisoned_step(BaselineTrainer, "loss", [])
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_diverged_run_exits_zero_with_its_row(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, *BASELINE,
                           f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done diverged" in proc.stderr
    (trial,) = (tmp_path / "results" / "trials").glob("*.json")
    row = json.loads(trial.read_text())
    assert row["stop_reason"] == "diverged" and math.isnan(row["diverged_at"]["loss"])
