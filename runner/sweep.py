"""Hardware that is absent inside a sweep: SKIPPED rows instead of a crash (DESIGN.md §7).

`python -m runner -m +experiment=quickstart hardware=cpu,mlx,cuda` runs one job per hardware.
A job whose hardware is not on this machine (or whose trainer cannot run on its backend)
writes SKIPPED trial rows with the reason and returns normally, so the sweep goes on:

- task=train: one row for the trial it would have run (`skip_train`);
- task=claims: one row per planned trial of the experiment (runner.tasks.claims).

Outside a sweep the same error ends the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

from runner.config.schema import RunConfig
from runner.errors import HardwareUnavailable
from runner.hardware import resolved, setup_hardware
from runner.ledger import write_trial
from runner.trial import Provenance, TrialRow, config_hash, hardware_fields

__all__ = ["hardware_fields", "reason_of", "skip_train"]


def reason_of(err: BaseException) -> str:
    """The one-line reason a SKIPPED row records: `<ErrorType>: <first line>`."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def skip_train(cfg: RunConfig, err: HardwareUnavailable) -> dict:
    """Write the SKIPPED row of a task=train job and return it."""
    try:  # hardware that is present (a trainer its backend cannot run): record the device
        cfg = resolved(cfg, setup_hardware(cfg.hardware))
    except HardwareUnavailable:
        pass
    row = TrialRow.skipped(cfg, reason_of(err), Provenance.read(cfg.results_dir),
                           chash=config_hash(cfg)).as_dict()
    path = write_trial(cfg.results_dir, row)
    print(f"skipped ({row['skip_reason']}): trial {path}", flush=True)
    return row
