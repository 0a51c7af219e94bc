"""Resume: a run killed at any step continues from its last checkpoint when the same command is
run again, and ends with the adapter and metrics of a run that was never interrupted (bitwise on
CPU: same batches, same random state, same arithmetic)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import ROOT, compose_config

from runner.app import run_job

# Enough steps that the run is still training when the first checkpoint appears (one every
# `eval_every` steps), few enough to stay quick. The derived trainer's batches are 1 example
# here (its derived batch size), hence its smaller token budget. One thread: on a shared CPU,
# torch's thread pool spinning against other processes makes tiny runs many times slower.
ONE_THREAD = "hardware.threads=1"
TRAIN = "task=train"  # quickstart itself runs claims
ADAMW = [TRAIN, ONE_THREAD, "budget.max_tokens=4000", "budget.eval_every=2",
         "budget.eval_examples=8", "data.max_examples=120"]
DERIVED = [TRAIN, ONE_THREAD, "trainer=derived", "budget.max_tokens=1200", "budget.eval_every=3",
           "budget.eval_examples=8", "data.max_examples=120"]
GRID = [TRAIN, ONE_THREAD, "trainer=adamw_grid", "trainer.lr_grid=[1e-4,1e-3]",
        "budget.max_tokens=1500", "budget.eval_every=2", "budget.eval_examples=8",
        "data.max_examples=120"]
# (and setup_cache: the resumed run reads the set-up its interrupted start stored)
TIMING = {"train_seconds", "wall_seconds", "tokens_per_second", "peak_rss_mb", "derive_seconds",
          "setup_seconds", "tuning_seconds", "setup_cache"}


def _ledger(tmp: Path) -> list[str]:
    return [f"results_dir={tmp / 'results'}", f"runs_dir={tmp / 'runs'}"]


def _command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "runner", "+experiment=quickstart", *overrides]


def _only_row(tmp: Path) -> dict:
    files = list((tmp / "results" / "trials").glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _interrupt(command: list[str], checkpoint: str, sig: signal.Signals) -> None:
    """Start the run, send `sig` once `checkpoint` (a glob) is on disk, wait for it to end."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(Path("/").glob(checkpoint.lstrip("/"))):  # temporary files end in .tmp
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, f"the run finished before the {sig.name} reached it:\n{stderr}"


def _comparable(row: dict) -> str:
    """Everything a resumed run must reproduce exactly (not timings, ids or dates)."""
    metrics = {k: v for k, v in row["metrics"].items() if k not in TIMING}
    for point in metrics.get("grid", []):
        point.pop("train_seconds")
    keep = {k: row[k] for k in ("curves", "stop_reason", "certificate", "derived",
                                "hyperparameters", "config_hash", "diverged_at")}
    for point in keep["curves"].get("eval", []):
        point.pop("seconds", None)  # a timing
    return json.dumps({"metrics": metrics, **keep}, sort_keys=True, default=str)  # NaN == NaN


def _assert_same_adapter(a: dict, b: dict) -> None:
    file_a = Path(a["adapter_path"]) / "adapter_model.safetensors"
    file_b = Path(b["adapter_path"]) / "adapter_model.safetensors"
    tensors_a, tensors_b = load_file(file_a), load_file(file_b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    assert file_a.read_bytes() == file_b.read_bytes()


def _check_resume(tmp_path: Path, overrides: list[str], sig: signal.Signals,
                  wait_for: str = "state.pt") -> list[int]:
    """Interrupt, rerun, compare with an uninterrupted run; return the steps resumed at."""
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    command = _command([*overrides, *_ledger(interrupted)])
    checkpoints = interrupted / "runs" / "checkpoints"

    # 1. Interrupt a run once it has checkpointed: no trial row, a checkpoint left behind.
    _interrupt(command, f"{checkpoints}/*/{wait_for}", sig)
    assert not list((interrupted / "results").glob("trials/*.json"))

    # 2. The same command again continues from the checkpoint, then cleans it up.
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed_at = [int(step) for step in re.findall(r"resumed at step (\d+)", proc.stderr)]
    assert resumed_at, proc.stderr
    assert not checkpoints.exists()

    # 3. An uninterrupted run (in this process: same threads, same arithmetic) is the oracle:
    #    same adapter bytes, same curves, metrics, certificate and derived set-up.
    run_job(compose_config(["+experiment=quickstart", *overrides, *_ledger(reference)]))
    resumed, uninterrupted = _only_row(interrupted), _only_row(reference)
    assert 0 < resumed_at[-1] < resumed["metrics"]["steps"]  # resumed mid-run
    assert _comparable(resumed) == _comparable(uninterrupted)
    _assert_same_adapter(resumed, uninterrupted)
    assert resumed["metrics"]["train_seconds"] > 0
    return resumed_at


def test_adamw_resumes_bitwise_after_sigkill(tmp_path: Path) -> None:
    _check_resume(tmp_path, ADAMW, signal.SIGKILL)


@pytest.mark.slow
def test_derived_resumes_bitwise_after_sigkill(tmp_path: Path) -> None:
    """Also checks the derived set-up (derivation, noise scale, residual scales, certificate
    baseline) is recomputed identically: the trainer refuses a checkpoint whose set-up differs,
    and the rows' derived records and hyperparameters are compared."""
    _check_resume(tmp_path, DERIVED, signal.SIGKILL)


@pytest.mark.slow
def test_tail_start_resumes_bitwise_after_sigkill(tmp_path: Path) -> None:
    """derived_tail_start: its start (the tail moved into the adapter, the boxes) is recomputed
    identically on resume, and the run ends as an uninterrupted one."""
    _check_resume(tmp_path, [*DERIVED, "trainer=derived_tail_start"], signal.SIGKILL)


@pytest.mark.slow
def test_adamw_resumes_bitwise_after_sigint(tmp_path: Path) -> None:
    _check_resume(tmp_path, ADAMW, signal.SIGINT)


@pytest.mark.slow
def test_lr_grid_resumes_bitwise(tmp_path: Path) -> None:
    """Each grid point checkpoints on its own; a finished point is read back, not retrained."""
    first, second = _check_resume(tmp_path, GRID, signal.SIGKILL, wait_for="grid-1.pt")
    assert first > second  # point 1 read back at its end, point 2 continued mid-run


@pytest.mark.parametrize("trainer", ["sgd", "adamw", "prodigy", "schedulefree", "muon"])
def test_baseline_state_round_trips(trainer: str, tmp_path: Path) -> None:
    """Every baseline optimizer's state survives a checkpoint (torch.load weights_only): a
    restored trainer takes the same next step as the original, bitwise."""
    from runner.config.load import to_run_config
    from runner.data import Example, collate
    from runner.models.loading import load_model
    from runner.training.baseline import BaselineTrainer, attach_lora
    from runner.training.checkpoint import Checkpoint

    cfg = to_run_config(compose_config([f"trainer={trainer}"]))
    tokens = tuple(range(5, 40))
    example = Example(input_ids=tokens, labels=tokens)
    batch = collate([example, example], pad_id=0)

    def fresh() -> BaselineTrainer:
        torch.manual_seed(0)
        model = attach_lora(load_model(cfg.model).model, cfg.trainer)
        return BaselineTrainer(model, cfg.trainer, total_steps=10)

    original = fresh()
    for _ in range(2):
        original.step(batch)
    ckpt = Checkpoint.for_run(tmp_path, "0" * 64)
    ckpt.save({}, original)
    restored = fresh()
    ckpt.restore(ckpt.load(), restored)
    for t in (original, restored):
        torch.manual_seed(1)  # the same dropout draws for both
        t.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(original.params, restored.params, strict=True))


def test_a_finished_loop_is_read_back_not_retrained(tmp_path: Path, monkeypatch) -> None:
    """A run killed after training but before its row was written only writes the row."""
    from runner.tasks import train
    from runner.training.baseline import BaselineTrainer

    fast = ["+experiment=quickstart", TRAIN, ONE_THREAD, "budget.max_tokens=600",
            "budget.eval_every=50", "budget.eval_examples=4", "data.max_examples=40",
            "verify_adapter=false"]
    monkeypatch.setattr(train, "remove_checkpoints", lambda *a: None)  # as if killed after it
    first = run_job(compose_config([*fast, *_ledger(tmp_path / "a")]))
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "runs", tmp_path / "b" / "runs")

    def no_step(self, batch):
        raise AssertionError("a finished loop must not train again")

    monkeypatch.setattr(BaselineTrainer, "step", no_step)
    second = run_job(compose_config([*fast, *_ledger(tmp_path / "b")]))
    assert _comparable(first) == _comparable(second)
    assert second["metrics"]["train_seconds"] == first["metrics"]["train_seconds"]


def test_a_checkpoint_of_another_config_is_ignored(tmp_path: Path) -> None:
    from runner.training.checkpoint import Checkpoint

    ckpt = Checkpoint.for_run(tmp_path, "a" * 64)
    ckpt.path.parent.mkdir(parents=True)
    torch.save({"format": 1, "config_hash": "b" * 64}, ckpt.path)
    assert ckpt.load() is None


def test_a_checkpoint_of_another_set_up_is_refused(tmp_path: Path) -> None:
    """Same config hash, different trainer state (here: other LoRA targets): one clear error."""
    from runner.config.load import to_run_config
    from runner.models.loading import load_model
    from runner.training.baseline import BaselineTrainer, attach_lora
    from runner.training.checkpoint import Checkpoint, CheckpointError

    def trainer(targets: str) -> BaselineTrainer:
        cfg = to_run_config(compose_config([f"trainer.target_modules={targets}"]))
        model = attach_lora(load_model(cfg.model).model, cfg.trainer)
        return BaselineTrainer(model, cfg.trainer, total_steps=10)

    ckpt = Checkpoint.for_run(tmp_path, "0" * 64)
    ckpt.save({}, trainer("[q_proj]"))
    with pytest.raises(CheckpointError, match="delete it to start over") as info:
        ckpt.restore(ckpt.load(), trainer("[v_proj]"))
    assert "\n" not in str(info.value)



def test_skipped_batches_are_the_epochs_tail() -> None:
    from runner.data import Example, batches

    examples = [Example(input_ids=tuple(range(1, n + 2)), labels=tuple(range(1, n + 2)))
                for n in range(10)]
    full = list(batches(examples, 3, seed=5, epoch=2, pad_id=0))
    tail = list(batches(examples, 3, seed=5, epoch=2, pad_id=0, skip=2))
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(full[2:], tail, strict=True))
