"""Reading the ledger for `make results`: trial rows, bench rows, registered claim rules.

Tolerant of what a live ledger holds (writers' temporary files, rows of older schema versions
that lack newer keys: the pages read every optional key with a default), strict about what
would make the pages wrong: a file that is not a JSON object with a run id stops the build
with one line naming the file (`LedgerError`), which the command line prints without a
traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.claims.schema import Claim, claim_from_record
from runner.errors import ConfigError

TRIALS_DIR = "trials"
BENCH_DIR = "bench"
RULES_DIR = "rules"


class LedgerError(ValueError):
    """A ledger file that cannot be read; the message names the file."""


def _json_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.glob("*.json")) if not p.name.startswith(".tmp-")]


def _read_object(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: corrupt {what} file ({err})") from None
    if not isinstance(obj, dict):
        raise LedgerError(f"{path}: corrupt {what} file (a JSON {type(obj).__name__}, "
                          "not an object)")
    return obj


def read_rows(folder: str | Path, what: str = "trial") -> list[dict]:
    """Every row in `folder`, sorted by run id (which starts with the UTC time)."""
    rows = []
    for path in _json_files(Path(folder)):
        row = _read_object(path, what)
        if not isinstance(row.get("run_id"), str):
            raise LedgerError(f"{path}: corrupt {what} file (no run_id)")
        rows.append(row)
    return sorted(rows, key=lambda r: r["run_id"])


def read_trials(results_dir: str | Path) -> list[dict]:
    """Every trial row under `<results_dir>/trials/`."""
    return read_rows(Path(results_dir) / TRIALS_DIR, "trial")


def read_bench_rows(results_dir: str | Path) -> list[dict]:
    """Every bench row under `<results_dir>/bench/`."""
    return read_rows(Path(results_dir) / BENCH_DIR, "bench row")


def registered_claims(results_dir: str | Path) -> list[Claim]:
    """Every pre-registered rule under `<results_dir>/rules/`, sorted by claim id and hash."""
    claims = []
    for path in _json_files(Path(results_dir) / RULES_DIR):
        try:
            claims.append(claim_from_record(_read_object(path, "claim rule"), str(path)))
        except ConfigError as err:
            raise LedgerError(str(err)) from None
    return sorted(claims, key=lambda c: (c.id, c.rule_hash))
