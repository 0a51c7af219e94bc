"""The results ledger: one JSON file per finished trial under `<results_dir>/trials/`.

A trial file is written once and never rewritten: it is written to a temporary file in the same
directory, flushed to disk, and then hard-linked to its final name, which fails if that name
exists. Concurrent jobs (multirun, joblib, Ray, Slurm) therefore write side by side without
losing or corrupting a row, and nothing already in the ledger can be overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

TRIALS_DIR = "trials"
SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "torch", "transformers", "peft", "hydra-core", "omegaconf", "safetensors", "gguf",
    "numpy", "scipy", "array-api-compat", "mlx", "jax", "prodigyopt", "schedulefree",
)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def new_run_id(experiment: str, arm: str, seed: int, config_hash: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{experiment}-{arm}-s{seed}-{config_hash[:8]}-{uuid.uuid4().hex[:6]}"


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=30,
                          check=True).stdout


def git_state(repo: Path | None = None) -> tuple[str, bytes]:
    """(HEAD commit, binary diff of tracked files against HEAD); ("unknown", b"") outside git.

    Untracked files are not part of the state: only what git tracks can change a run.
    """
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        head = _git(repo, "rev-parse", "HEAD").decode().strip()
        return head, _git(repo, "diff", "HEAD", "--binary")
    except (OSError, subprocess.SubprocessError):
        return "unknown", b""


def git_commit(repo: Path | None = None) -> str:
    """HEAD, with "-dirty" when tracked files differ from it."""
    head, diff = git_state(repo)
    return head + ("-dirty" if diff else "") if head != "unknown" else head


def write_once(path: Path, data: bytes) -> Path:
    """Write `path` atomically (temp file + hard link); an existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_trial(results_dir: str | Path, row: dict[str, Any]) -> Path:
    """Write one trial row atomically; refuse to overwrite an existing trial."""
    trials = Path(results_dir) / TRIALS_DIR
    trials.mkdir(parents=True, exist_ok=True)
    final = trials / f"{row['run_id']}.json"
    text = json.dumps({"schema_version": SCHEMA_VERSION, **row}, indent=2, sort_keys=True,
                      default=str, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=trials)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, final)  # atomic, and fails with FileExistsError rather than overwrite
    finally:
        os.unlink(tmp)
    return final


def read_rows(folder: str | Path, what: str = "trial") -> list[dict[str, Any]]:
    """Every JSON row in `folder` (temp files of writers in progress skipped), by run id."""
    rows = []
    for path in sorted(Path(folder).glob("*.json")):
        if path.name.startswith(".tmp-"):
            continue
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: corrupt {what} file ({err})") from None
    return sorted(rows, key=lambda r: r["run_id"])


def read_trials(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial row in the ledger, sorted by run id (stable across machines)."""
    return read_rows(Path(results_dir) / TRIALS_DIR)
