"""Hardware that is absent inside a sweep: SKIPPED rows instead of a crash (DESIGN.md §7).

`python -m runner -m +experiment=quickstart hardware=cpu,mlx,cuda` runs one job per hardware.
A job whose hardware is not on this machine (or whose trainer cannot run on its backend)
writes SKIPPED trial rows with the reason and returns normally, so the sweep goes on:

- task=train: one row for the trial it would have run (`skip_train`);
- task=claims: one row per planned trial of the experiment (runner.tasks.claims).

Outside a sweep the same error ends the run with one line on stderr and exit code 2.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from runner.errors import HardwareUnavailable
from runner.hardware import resolved, setup_hardware, usable_cores
from runner.ledger import git_commit, new_run_id, package_versions, utc_now, write_trial
from runner.models import model_id_of
from runner.schema import RunConfig
from runner.trial import config_hash


def reason_of(err: BaseException) -> str:
    """The one-line reason a SKIPPED row records: `<ErrorType>: <first line>`."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def hardware_fields(cfg: RunConfig) -> dict:
    """The hardware columns of a row for a trial that did not reach `setup_hardware`."""
    hw = cfg.hardware
    return {"hardware": hw.name, "backend": getattr(hw.backend, "value", hw.backend),
            "device": hw.device, "dtype": getattr(hw.dtype, "value", hw.dtype),
            "threads": hw.threads or usable_cores()}


def skip_train(cfg: RunConfig, err: HardwareUnavailable) -> dict:
    """Write the SKIPPED row of a task=train job and return it."""
    from runner.config import trainer_options

    try:  # hardware that is present (a trainer its backend cannot run): record the device
        cfg = resolved(cfg, setup_hardware(cfg.hardware))
    except HardwareUnavailable:
        pass
    chash = config_hash(cfg)
    now = utc_now()
    row = {
        "run_id": new_run_id(cfg.experiment, cfg.trainer.name, cfg.seed, chash),
        "experiment": cfg.experiment, "claim_id": None, "rule_hash": None,
        "arm": cfg.trainer.name, "seed": cfg.seed, **hardware_fields(cfg),
        "model_id": model_id_of(cfg.model), "data_id": cfg.data.id, "config_hash": chash,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
        "git_commit": git_commit(), "packages": package_versions(),
        "started_at": now, "ended_at": now, "metrics": {}, "curves": {}, "derived": None,
        "hyperparameters": trainer_options(cfg.trainer), "stop_reason": None,
        "certificate": None, "status": "skipped", "skip_reason": reason_of(err),
    }
    path = write_trial(cfg.results_dir, row)
    print(f"skipped ({row['skip_reason']}): trial {path}", flush=True)
    return row
