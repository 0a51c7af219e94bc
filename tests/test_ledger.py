"""The ledger never loses or overwrites a row; `make results` is idempotent."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest

from runner import report
from runner.ledger import read_trials, stable_hash, write_trial


def _row(run_id: str, val: float = 2.0) -> dict:
    return {
        "run_id": run_id, "experiment": "unit", "arm": "adamw", "model_id": "tiny_llama",
        "data_id": "stdlib_docs", "seed": 0, "hardware": "cpu", "status": "ok",
        "stop_reason": "budget",
        "metrics": {"steps": 3, "tokens": 300, "val_loss_initial": 3.0, "val_loss_final": val,
                    "retention_loss_initial": 3.1, "retention_loss_final": 3.2,
                    "tokens_per_second": 1234.5, "peak_rss_mb": 100.0},
    }


def test_write_then_read_roundtrip(tmp_path: Path) -> None:
    path = write_trial(tmp_path, _row("a"))
    assert json.loads(path.read_text())["run_id"] == "a"
    assert [r["run_id"] for r in read_trials(tmp_path)] == ["a"]
    assert not list((tmp_path / "trials").glob(".tmp-*"))


def test_existing_trial_is_never_overwritten(tmp_path: Path) -> None:
    write_trial(tmp_path, _row("a", val=1.0))
    with pytest.raises(FileExistsError):
        write_trial(tmp_path, _row("a", val=9.0))
    assert read_trials(tmp_path)[0]["metrics"]["val_loss_final"] == 1.0


def _write_many(args: tuple[str, int]) -> None:
    results_dir, worker = args
    for i in range(25):
        write_trial(results_dir, _row(f"w{worker:02d}-{i:03d}"))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    with mp.get_context("spawn").Pool(8) as pool:
        pool.map(_write_many, [(str(tmp_path), w) for w in range(8)])
    rows = read_trials(tmp_path)
    assert len(rows) == 8 * 25
    assert len({r["run_id"] for r in rows}) == 8 * 25


def test_stable_hash_ignores_key_order() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_results_are_idempotent(tmp_path: Path) -> None:
    results, docs, readme = tmp_path / "results", tmp_path / "docs", tmp_path / "README.md"
    readme.write_text("# X\n\nintro\n")
    write_trial(results, _row("a"))
    write_trial(results, _row("b", val=1.5))
    first = report.build(results, docs, readme)
    assert set(first) == {docs / "runs.md", readme}
    snapshot = {p: p.read_text() for p in (docs / "runs.md", readme)}
    assert report.build(results, docs, readme) == []
    assert {p: p.read_text() for p in snapshot} == snapshot
    assert "intro" in readme.read_text() and "1.7500" in readme.read_text()  # mean of 2.0, 1.5


def test_committed_docs_match_the_ledger(tmp_path: Path) -> None:
    """The committed docs are exactly what `make results` produces from the committed ledger.

    Markdown pages, the README sections and results/claims.json are compared byte for byte;
    figures only for presence (PNG bytes depend on the matplotlib and font build).
    """
    import shutil

    root = Path(__file__).resolve().parent.parent
    readme = tmp_path / "README.md"
    readme.write_text((root / "README.md").read_text())
    docs = tmp_path / "docs"
    shutil.copytree(root / "docs", docs)
    claims_json = tmp_path / "claims.json"
    if (root / "results" / "claims.json").exists():
        shutil.copy(root / "results" / "claims.json", claims_json)
    changed = report.build_all(root / "results", docs, readme, claims_json)
    stale = [str(p.relative_to(tmp_path)) for p in changed if p.suffix != ".png"]
    assert stale == [], f"run `make results` and commit the regenerated docs: {stale}"
    for page in docs.rglob("*.md"):
        for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", page.read_text()):
            assert (page.parent / figure).exists(), f"{page.name} shows a missing {figure}"


TRACKED_RUN = ["+experiment=quickstart", "task=train", "budget.max_tokens=400",
               "budget.eval_every=2", "budget.eval_examples=4", "data.max_examples=60",
               "verify_adapter=false"]


def test_wandb_tracks_every_step_offline(tmp_path: Path, monkeypatch) -> None:
    """tracking=wandb writes an offline run with every step's loss while training, then the
    trial's summary; nothing goes online."""
    pytest.importorskip("wandb")
    from support import compose_config

    from runner.app import run_job

    monkeypatch.setenv("WANDB_SILENT", "true")
    row = run_job(compose_config([*TRACKED_RUN, "tracking=wandb",
                                  f"results_dir={tmp_path / 'results'}",
                                  f"runs_dir={tmp_path / 'runs'}"]))
    # wandb's service process writes the offline log; its teardown waits until it has flushed
    # (reading the file before that depends on the machine's load).
    import wandb

    wandb.teardown()
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    record = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run's protobuf log
    assert row["run_id"].encode() in record and b"val_loss_final" in record
    # Each step's history record holds its loss as JSON text: every recorded loss is there.
    losses = row["curves"]["train_loss"]
    assert len(losses) == row["metrics"]["steps"] >= 2
    for loss in losses:
        assert json.dumps(loss).encode() in record, loss


def test_csv_tracker_has_every_step_and_evaluation(tmp_path: Path) -> None:
    """tracking=csv: steps.csv holds each step's loss and tokens and each evaluation's losses,
    exactly as the trial records them, and summary.json the final metrics."""
    from support import compose_config

    from runner.app import run_job
    from runner.tracking import read_steps

    row = run_job(compose_config([*TRACKED_RUN, "tracking=csv",
                                  f"results_dir={tmp_path / 'results'}",
                                  f"runs_dir={tmp_path / 'runs'}"]))
    folder = tmp_path / "runs" / "csv" / row["run_id"]
    steps = read_steps(folder / "steps.csv")
    logged = {(step, key): value for loop, step, key, value in steps if loop == 0}
    assert {loop for loop, *_ in steps} == {0}
    for step, loss in enumerate(row["curves"]["train_loss"], start=1):
        assert logged[(step, "loss")] == loss  # repr round-trips a float exactly
    for point in row["curves"]["eval"]:
        assert logged[(point["step"], "val_loss")] == point["val_loss"]
        assert logged[(point["step"], "tokens")] == point["tokens"]
    assert logged[(row["metrics"]["steps"], "tokens")] == row["metrics"]["tokens"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["val_loss_final"] == row["metrics"]["val_loss_final"]
    assert summary["run_id"] == row["run_id"] and summary["stop_reason"] == row["stop_reason"]


def test_own_data_trial_records_its_file_and_truncation(tmp_path: Path) -> None:
    """data.path=<own file>: the trial's data id is the file's name, its sha256 the file's,
    and the records cut to max_seq_len are counted; an ad-hoc run keeps out of results/."""
    from support import compose_config

    from runner.app import run_job

    records = [{"prompt": f"Q{i}: ", "completion": ("a long answer " * (1 + i % 3)) + str(i)}
               for i in range(40)]
    own = tmp_path / "my_notes.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = run_job(compose_config([
        "task=train", "budget.max_tokens=300", "budget.eval_every=5", "budget.eval_examples=4",
        f"data.path={own}", "data.retention_path=null", "data.max_seq_len=32",
        "verify_adapter=false", f"runs_dir={tmp_path / 'runs'}"]))
    assert row["data_id"] == "my_notes"
    assert row["data_sha256"] == hashlib.sha256(own.read_bytes()).hexdigest()
    # A byte tokenizer: one token per byte, plus BOS; longer than 32 is cut.
    cut = sum(len(f"Q{i}: ") + len(r["completion"]) + 2 > 32 for i, r in enumerate(records))
    assert 0 < cut < len(records)
    assert row["data_sizes"]["truncated_records"] == cut
    assert row["data_sizes"]["truncated_share"] == pytest.approx(cut / len(records))
    assert list((tmp_path / "runs" / "ledger" / "trials").glob("*.json"))  # the ad-hoc ledger


def test_wandb_online_mode_is_refused() -> None:
    from support import compose_config

    from runner.config.load import to_run_config
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.mode"):
        to_run_config(compose_config(["tracking=wandb", "tracking.mode=online"]))


def test_committed_trials_keep_their_config_hash() -> None:
    """Golden: every trained trial in the committed ledger, rebuilt from its stored config with
    today's schema, hashes to the config_hash it was recorded with -- a new config key left in
    the hash (instead of LATE_* in runner.trial) would orphan them all, and task=claims would
    train them again."""
    from omegaconf import OmegaConf, open_dict
    from support import compose_config

    from runner.config.load import to_run_config
    from runner.trial import config_hash

    checked = 0
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "results" / "trials").glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("status") == "skipped" or row.get("shared_from") or "metrics" not in row \
                or "val_loss_final" not in row["metrics"]:
            continue
        stored = row["config"]
        base = compose_config([f"trainer={stored['trainer']['name']}",
                               f"model={stored['model']['id']}"])
        with open_dict(base):
            cfg = OmegaConf.merge(base, stored)
        assert config_hash(to_run_config(cfg)) == row["config_hash"], path.name
        checked += 1
    assert checked >= 30
