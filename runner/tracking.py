"""`tracking=...`: follow trials while they train, in Weights & Biases (offline), TensorBoard
or CSV files.

The ledger under `results/` stays the source of truth; a tracker is a convenience for people who
browse or plot runs. Each trial is one tracked run, opened before training starts
(`trial_run`): the training loop reports every step (loss, tokens, the trainer's own values such
as the gradient norm) and every evaluation (validation and retention loss) to it while it
trains (`log_step`), and the finished trial adds its final metrics as the run's summary. The
verdicts of a claims task become one more run (`mirror_verdicts`).

* `tracking=wandb`: `mode="offline"` under `<runs_dir>/wandb/` (nothing reaches the network;
  `wandb sync` uploads later).
* `tracking=csv`: plain files under `<runs_dir>/csv/<run id>/`, readable while the run trains:
  `steps.csv` (long format, one value a line: `loop,step,key,value`; `loop` counts the
  training loops of one trial, e.g. the points of a learning-rate grid), `config.json` and, at
  the end, `summary.json`. Claims write `claims-<experiment>/verdicts.csv`.
* `tracking=tensorboard`: event files under `<runs_dir>/tensorboard/<run id>/` (`tensorboard
  --logdir <runs_dir>/tensorboard`), written through `torch.utils.tensorboard`: every value a
  scalar under its own key, the config as text, the final metrics as `summary/<key>`. A trial
  with several training loops writes loop k > 0 into `loop-<k>/` (a run of its own, since each
  loop counts its steps from 1). Claims write the verdict table as text to `claims-<experiment>`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

from runner.config.schema import RunConfig, TrackingBackend
from runner.errors import ConfigError

MODES = ("offline", "disabled")  # never "online": nothing may leave the machine implicitly
VERDICT_COLUMNS = ("claim", "verdict", "effect", "p_value", "n", "rule_hash", "reason")


class TrackedRun(Protocol):
    def start_loop(self) -> None: ...  # a training loop begins (steps count from 1 again)

    def log(self, values: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def abandon(self) -> None: ...  # the trial failed: close without a summary


def enabled(cfg: RunConfig) -> bool:
    if cfg.tracking.backend == TrackingBackend.none:
        return False
    if cfg.tracking.mode not in MODES:
        raise ConfigError(f"tracking.mode: must be one of {', '.join(MODES)} "
                          f"(got '{cfg.tracking.mode}'); upload later with `wandb sync`")
    if cfg.tracking.backend == TrackingBackend.wandb:
        _wandb()  # installed?
    if cfg.tracking.backend == TrackingBackend.tensorboard:
        _summary_writer()
    return True


# ---------------------------------------------------------------------------------------------
# The run the training loop reports to


_ACTIVE: ContextVar[TrackedRun | None] = ContextVar("tracked_run", default=None)


@contextmanager
def trial_run(cfg: RunConfig, name: str, config: dict,
              tags: list[str]) -> Iterator[TrackedRun | None]:
    """Open the tracked run of one trial (None without tracking); `log_step` reports to it."""
    run = _open(cfg, name, config, tags) if enabled(cfg) else None
    token = _ACTIVE.set(run)
    try:
        yield run
    except BaseException:
        if run is not None:
            run.abandon()
        raise
    finally:
        _ACTIVE.reset(token)


def start_loop() -> None:
    run = _ACTIVE.get()
    if run is not None:
        run.start_loop()


def log_step(values: dict[str, float | None], step: int) -> None:
    """Report one step's (or evaluation's) values to the open run, if any; non-finite and
    missing values are left out."""
    run = _ACTIVE.get()
    if run is None:
        return
    finite = {k: float(v) for k, v in values.items()
              if k != "step" and isinstance(v, int | float) and math.isfinite(v)}
    if finite:
        run.log(finite, step)


def trial_summary(row: dict) -> dict[str, Any]:
    """What a finished trial adds to its run: its final metrics and why it stopped."""
    summary = {k: v for k, v in (row.get("metrics") or {}).items()
               if isinstance(v, int | float) and math.isfinite(v)}
    summary["stop_reason"] = row.get("stop_reason")
    summary["run_id"] = row.get("run_id")
    return summary


def _open(cfg: RunConfig, name: str, config: dict, tags: list[str]) -> TrackedRun:
    if cfg.tracking.backend == TrackingBackend.csv:
        return CsvRun(Path(cfg.runs_dir) / "csv" / name, config)
    if cfg.tracking.backend == TrackingBackend.tensorboard:
        return TensorBoardRun(Path(cfg.runs_dir) / "tensorboard" / name, config)
    return WandbRun(cfg, name, config, tags)


# ---------------------------------------------------------------------------------------------
# Weights & Biases, offline


def _wandb():
    try:
        import wandb
    except ModuleNotFoundError:
        raise ConfigError("tracking=wandb: the wandb package is not installed "
                          "(pip install -e '.[tracking]')") from None
    return wandb


def _wandb_init(cfg: RunConfig, name: str, config: dict, tags: list[str]):
    directory = Path(cfg.runs_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return _wandb().init(project=cfg.tracking.project, name=name, config=config, tags=tags,
                         dir=str(directory), mode=cfg.tracking.mode, reinit="create_new")


class WandbRun:
    """wandb's own step must only grow, so it counts every report of the trial; the loop's
    step is logged as `step` (the x axis) beside `loop`."""

    def __init__(self, cfg: RunConfig, name: str, config: dict, tags: list[str]):
        self.run = _wandb_init(cfg, name, config, tags)
        self.run.define_metric("*", step_metric="step")
        self.loop = -1

    def start_loop(self) -> None:
        self.loop += 1

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step, "loop": max(self.loop, 0)})

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)
        self.run.finish()

    def abandon(self) -> None:
        self.run.finish(exit_code=1)


# ---------------------------------------------------------------------------------------------
# CSV files


class CsvRun:
    def __init__(self, directory: Path, config: dict):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True,
                                                          default=str) + "\n")
        # Line-buffered: every row is on disk as soon as it is written (tail -f, plots mid-run).
        self.file = open(directory / "steps.csv", "w", newline="", buffering=1)  # noqa: SIM115
        self.writer = csv.writer(self.file, lineterminator="\n")
        self.writer.writerow(("loop", "step", "key", "value"))
        self.loop = -1

    def start_loop(self) -> None:
        self.loop += 1

    def log(self, values: dict[str, float], step: int) -> None:
        for key in sorted(values):
            self.writer.writerow((max(self.loop, 0), step, key, repr(values[key])))

    def finish(self, summary: dict[str, Any]) -> None:
        self.file.close()
        (self.directory / "summary.json").write_text(
            json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")

    def abandon(self) -> None:
        self.file.close()


def read_steps(path: str | Path) -> list[tuple[int, int, str, float]]:
    """The rows of a `steps.csv`: (loop, step, key, value)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return [(int(loop), int(step), key, float(value)) for loop, step, key, value in rows]


# ---------------------------------------------------------------------------------------------
# TensorBoard event files


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tracking=tensorboard: the tensorboard package is not installed "
                          "(pip install -e '.[tracking]')") from None
    return SummaryWriter


class TensorBoardRun:
    FLUSH_SECONDS = 5  # event files on disk within seconds (TensorBoard reads them mid-run)

    def __init__(self, directory: Path, config: dict):
        self.directory = directory
        self.loop = -1
        self.writer = self._writer(directory)
        self.writer.add_text("config", "```json\n" + json.dumps(
            config, indent=2, sort_keys=True, default=str) + "\n```")

    def _writer(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        return _summary_writer()(log_dir=str(directory), flush_secs=self.FLUSH_SECONDS)

    def start_loop(self) -> None:
        self.loop += 1
        if self.loop > 0:  # a new loop counts steps from 1 again: a run of its own
            self.writer.close()
            self.writer = self._writer(self.directory / f"loop-{self.loop}")

    def log(self, values: dict[str, float], step: int) -> None:
        for key in sorted(values):
            self.writer.add_scalar(key, values[key], global_step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in sorted(summary.items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"summary/{key}", value, global_step=0)
            else:
                self.writer.add_text(f"summary/{key}", str(value))
        self.writer.close()

    def abandon(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Verdicts


def mirror_verdicts(cfg: RunConfig, verdicts: list) -> None:
    """One tracked run per claims task, holding the verdict table."""
    if not enabled(cfg):
        return
    rows = [(v.claim_id, v.verdict.value, v.effect, v.p_value, v.n, v.rule_hash, v.reason)
            for v in verdicts]
    name = f"claims-{cfg.experiment}"
    if cfg.tracking.backend == TrackingBackend.csv:
        directory = Path(cfg.runs_dir) / "csv" / name
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "verdicts.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(VERDICT_COLUMNS)
            writer.writerows(rows)
        return
    if cfg.tracking.backend == TrackingBackend.tensorboard:
        writer = _summary_writer()(log_dir=str(Path(cfg.runs_dir) / "tensorboard" / name))
        lines = ["| " + " | ".join(VERDICT_COLUMNS) + " |", "|" + "---|" * len(VERDICT_COLUMNS)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
        writer.add_text("verdicts", "\n".join(lines))
        writer.close()
        return
    run = _wandb_init(cfg, name, {"claims": list(cfg.claims)}, [cfg.experiment, "claims"])
    table = _wandb().Table(columns=list(VERDICT_COLUMNS))
    for row in rows:
        table.add_data(*row)
        run.summary[f"verdict/{row[0]}"] = row[1]
    run.log({"verdicts": table})
    run.finish()
