"""`tracking=wandb`: mirror trials and verdicts to Weights & Biases, offline.

The ledger under `results/` stays the source of truth; the mirror is a convenience for people
who browse runs in wandb. Runs are written with `mode="offline"` under `<runs_dir>/wandb/`
(nothing reaches the network); `wandb sync` uploads them later if the user wants. Each trial
becomes one wandb run (config, the validation/retention curve, the final metrics as summary);
the verdicts of a claims task become one run holding a table.
"""

from __future__ import annotations

import math
from pathlib import Path

from runner.errors import ConfigError
from runner.schema import RunConfig

MODES = ("offline", "disabled")  # never "online": nothing may leave the machine implicitly


def enabled(cfg: RunConfig) -> bool:
    if cfg.tracking.backend == "none":
        return False
    if cfg.tracking.backend != "wandb":
        raise ConfigError(f"tracking.backend: must be 'none' or 'wandb' (got '{cfg.tracking.backend}')")
    if cfg.tracking.mode not in MODES:
        raise ConfigError(f"tracking.mode: must be one of {', '.join(MODES)} "
                          f"(got '{cfg.tracking.mode}'); upload later with `wandb sync`")
    return True


def _wandb():
    try:
        import wandb
    except ModuleNotFoundError:
        raise ConfigError("tracking=wandb: the wandb package is not installed "
                          "(pip install -e '.[tracking]')") from None
    return wandb


def _start(cfg: RunConfig, name: str, config: dict, tags: list[str]):
    wandb = _wandb()
    directory = Path(cfg.runs_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.tracking.project, name=name, config=config, tags=tags,
                      dir=str(directory), mode=cfg.tracking.mode, reinit="create_new")


def mirror_trial(cfg: RunConfig, row: dict) -> None:
    """One wandb run per trial: its config, evaluation curve and final metrics."""
    if not enabled(cfg):
        return
    run = _start(cfg, row["run_id"], row.get("config") or {},
                 [str(row.get("experiment")), str(row.get("arm"))])
    for point in (row.get("curves") or {}).get("eval", []):
        values = {k: point[k] for k in ("val_loss", "retention_loss", "tokens")
                  if point.get(k) is not None}
        run.log(values, step=int(point["step"]))
    run.summary.update({k: v for k, v in (row.get("metrics") or {}).items()
                        if isinstance(v, int | float) and math.isfinite(v)})
    run.summary["stop_reason"] = row.get("stop_reason")
    run.finish()


def mirror_verdicts(cfg: RunConfig, verdicts: list) -> None:
    """One wandb run per claims task, holding the verdict table."""
    if not enabled(cfg):
        return
    wandb = _wandb()
    run = _start(cfg, f"claims-{cfg.experiment}", {"claims": list(cfg.claims)},
                 [cfg.experiment, "claims"])
    columns = ["claim", "verdict", "effect", "p_value", "n", "rule_hash", "reason"]
    table = wandb.Table(columns=columns)
    for v in verdicts:
        table.add_data(v.claim_id, v.verdict.value, v.effect, v.p_value, v.n, v.rule_hash,
                       v.reason)
        run.summary[f"verdict/{v.claim_id}"] = v.verdict.value
    run.log({"verdicts": table})
    run.finish()
