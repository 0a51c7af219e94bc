"""Provenance of claims trials: a dirty tree is refused unless allowed, and then its diff is
stored beside the trials (a temporary git repository stands in for the project)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from runner.errors import UserError
from runner.trial import Provenance


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    return repo


def test_clean_tree_records_the_commit_and_no_diff(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    p = Provenance.read(tmp_path / "results", allow_dirty=False, repo=repo)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert p.git_commit == head and p.git_diff_sha256 is None
    row = p.as_row()
    assert row["cpu_cores"] >= 1 and row["cpu_model"] and "torch" in row["blas"]
    assert not (tmp_path / "results").exists()


def test_dirty_tree_is_refused_without_allow_dirty(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "a.py").write_text("x = 2\n")
    with pytest.raises(UserError, match=r"^task=claims needs a clean git tree: tracked files "
                                        r"differ from [0-9a-f]{12} \(commit them, or pass "
                                        r"allow_dirty=true"):
        Provenance.read(tmp_path / "results", allow_dirty=False, what="task=claims", repo=repo)
    assert not (tmp_path / "results").exists()  # nothing written before the refusal


def test_allowed_dirty_tree_stores_the_patch_and_its_sha256(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "a.py").write_text("x = 2\n")
    p = Provenance.read(tmp_path / "results", allow_dirty=True, repo=repo)
    patch = tmp_path / "results" / p.git_patch
    assert p.git_commit.endswith("-dirty") and patch.name == f"{p.git_diff_sha256}.patch"
    assert hashlib.sha256(patch.read_bytes()).hexdigest() == p.git_diff_sha256
    assert b"-x = 1\n+x = 2\n" in patch.read_bytes()
    # The patch applies to the recorded commit and gives back the dirty tree.
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "a.py"], check=True)
    subprocess.run(["git", "-C", str(repo), "apply", str(patch)], check=True)
    assert (repo / "a.py").read_text() == "x = 2\n"
    again = Provenance.read(tmp_path / "results", allow_dirty=True, repo=repo)
    assert again == p  # the same diff: the same stored file, written once
