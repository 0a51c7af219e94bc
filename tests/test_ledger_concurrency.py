"""Concurrent multirun jobs (joblib, Ray, Slurm) write one ledger side by side (DESIGN.md §6):
8 processes released at once each write trial rows and pre-register the same claim, while a
ninth reads the ledger the whole time. No row is lost, duplicated or corrupted; one rule file."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from runner.ledger import read_trials, stable_hash

WRITERS = 8
ROWS_EACH = 12
CLAIM = "derived_beats_sgd"


def _payload(worker: int, i: int) -> dict:
    # Rows large enough (~40 kB) that a torn write would be visible to a reader.
    return {"experiment": "concurrency", "arm": f"w{worker}", "seed": i, "hardware": "cpu",
            "status": "ok", "claim_id": None, "metrics": {"val_loss_final": worker + i / 100},
            "curves": {"train_loss": [float(worker * 1000 + i + k) for k in range(2000)]}}


def _writer(results: str, worker: int, barrier, out) -> None:
    from runner.claims import load_claim
    from runner.ledger import new_run_id, write_trial
    from runner.tasks.claims import register_rule

    claim = load_claim(CLAIM)
    barrier.wait()
    written, rule = [], None
    for i in range(ROWS_EACH):
        if i == ROWS_EACH // 2:
            rule = str(register_rule(results, claim))  # every worker at about the same time
        row = _payload(worker, i)
        row["run_id"] = new_run_id("concurrency", f"w{worker}", i, stable_hash(row))
        write_trial(results, row)
        written.append((row["run_id"], stable_hash(row)))
    out.put((worker, written, rule))


def _reader(results: str, barrier, stop, out) -> None:
    barrier.wait()
    reads, errors = 0, []
    while not stop.is_set():
        try:
            read_trials(results)  # raises on a corrupt (torn) row
            reads += 1
        except (ValueError, FileNotFoundError) as err:
            errors.append(str(err))
    out.put(("reader", reads, errors))


def test_concurrent_writers_and_rule_registration_lose_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    results = str(tmp_path / "results")
    barrier, stop, out = ctx.Barrier(WRITERS + 1), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(results, w, barrier, out))
               for w in range(WRITERS)]
    reader = ctx.Process(target=_reader, args=(results, barrier, stop, out))
    for p in [*writers, reader]:
        p.start()
    reports = [out.get(timeout=300) for _ in writers]
    stop.set()
    reader_report = out.get(timeout=120)
    for p in [*writers, reader]:
        p.join(timeout=60)
        assert p.exitcode == 0

    expected = {run_id: digest for _, written, _ in reports for run_id, digest in written}
    assert len(expected) == WRITERS * ROWS_EACH  # every writer's run ids are distinct
    files = sorted((tmp_path / "results" / "trials").iterdir())
    assert not [f.name for f in files if f.name.startswith(".tmp-")]
    assert len(files) == WRITERS * ROWS_EACH
    for f in files:
        row = json.loads(f.read_text())  # parses: nothing torn
        assert f.name == f"{row['run_id']}.json"
        body = {k: v for k, v in row.items() if k != "schema_version"}
        assert stable_hash(body) == expected.pop(row["run_id"]), f.name  # intact, once
    assert expected == {}  # nothing lost
    assert len(read_trials(results)) == WRITERS * ROWS_EACH

    rules = sorted((tmp_path / "results" / "rules").iterdir())
    assert len(rules) == 1 and rules[0].name.startswith(f"{CLAIM}-")
    assert {rule for _, _, rule in reports} == {str(rules[0])}
    record = json.loads(rules[0].read_text())
    assert record["id"] == CLAIM and record["registered_at"]

    _, reads, errors = reader_report
    assert errors == [] and reads > 0
