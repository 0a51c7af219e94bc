"""Training checkpoints: everything a run needs to continue exactly where it was interrupted.

A run keeps one file per training loop (a learning-rate grid keeps one per point) under
`<runs_dir>/checkpoints/<config hash>/`. Running the same command again finds it by the config
hash and continues from it; on CPU the result is bitwise the one an uninterrupted run gives.
What is stored (see `train_loop`): the loop's counters and curves, the trainer's state
(`trainer.state_dict()`), the state of any other stateful helper (the stopping certificate's
history), and the torch random state that dropout draws from. The base model and anything the
set-up derives from it deterministically (the derived trainer's hyperparameters, residual
scales, noise scale) are not stored: they are recomputed, and the trainer checks they agree.

A file is written to a temporary name in the same directory and renamed over the old one
(`os.replace`), so a kill during a write leaves the previous checkpoint intact. The directory is
removed once the trial's row is in the ledger.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.errors import UserError

CHECKPOINT_FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(UserError):
    """A checkpoint exists but cannot be continued from (unreadable, or another set-up)."""


def checkpoint_dir(runs_dir: str | Path, config_hash: str) -> Path:
    return Path(runs_dir) / CHECKPOINTS_DIR / config_hash


def remove_checkpoints(runs_dir: str | Path, config_hash: str) -> None:
    """Drop a finished run's checkpoints (called after its trial row is written)."""
    folder = checkpoint_dir(runs_dir, config_hash)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when no other run has checkpoints there
        folder.parent.rmdir()


@dataclass
class Checkpoint:
    """Where one training loop checkpoints, and which extra objects it saves with the trainer."""

    path: Path
    config_hash: str
    # name -> an object with state_dict() / load_state_dict(state), e.g. the certificate monitor
    stateful: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_run(cls, runs_dir: str | Path, config_hash: str, name: str = "state",
                stateful: dict[str, Any] | None = None) -> Checkpoint:
        path = checkpoint_dir(runs_dir, config_hash) / f"{name}.pt"
        return cls(path, config_hash, dict(stateful or {}))

    def save(self, loop: dict[str, Any], trainer) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config_hash": self.config_hash,
            "loop": loop,
            "trainer": trainer.state_dict(),
            "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
            "rng": _rng_state(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                   dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> dict[str, Any] | None:
        """The stored state, or None when there is none for this config."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a file we did not write (os.replace never leaves a partial one)
            raise CheckpointError(f"{self.path}: unreadable checkpoint ({err}); delete it to "
                                  f"start over") from None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("config_hash") != self.config_hash:
            return None
        return state

    def restore(self, state: dict[str, Any], trainer) -> dict[str, Any]:
        """Load the trainer and the stateful helpers, then the random state; return the loop's."""
        try:
            trainer.load_state_dict(state["trainer"])
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["stateful"][name])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.path}: does not match this run's set-up ({err}); "
                                  f"delete it to start over") from None
        _set_rng_state(state["rng"])
        return state["loop"]


def _rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
