"""A trial: what training one arm produces (the outcome), the hash that identifies its config,
where its code came from (provenance) and the ledger row it leaves (DESIGN.md §6).

Every task builds its rows here: `TrialRow.trained` (a finished trial), `TrialRow.skipped` (an
arm that could not run here), `TrialRow.check` (a computed implementation check) and
`TrialRow.shared` (another claim's finished trial of the same config). `as_dict` gives the JSON
the ledger stores; readers take rows as dicts, so rows written before a field existed still read.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from runner.config.paths import DATA_DIR, resolve_data_path
from runner.config.schema import DataConfig, ModelSource, RunConfig
from runner.errors import UserError
from runner.hardware import HardwareInfo, cpu_facts, usable_cores
from runner.ledger import (
    git_state,
    new_run_id,
    package_versions,
    stable_hash,
    utc_now,
    write_once,
)
from runner.models.loading import model_id_of

if TYPE_CHECKING:  # the row needs the result's fields, not the training module's torch import
    from runner.training.loop import TrainResult

# What a trial's config hash covers: the keys of RunConfig that determine its outcome. A new
# top-level key (an output folder, a tracking or provenance option) stays out until it is named
# here. `task` keeps the keys it had when the first trials were recorded (name, top, adapter,
# trials); options of the bench task are not trial inputs and were never hashed, so committed
# trials keep their hashes.
HASHED_KEYS = ("model", "data", "hardware", "trainer", "task", "budget", "experiment", "seed",
               "claims", "claim_overrides")
HASHED_TASK_KEYS = ("name", "top", "adapter", "trials")
UNHASHED_HARDWARE_KEYS = ("threads", "recompute")  # more cores, less memory: same result
# Data options added after the first trials were recorded: hashed and compared only when set.
LATE_DATA_KEYS = ("replay_fraction", "generation_examples", "max_new_tokens")
# The same for claim_overrides (first_seed: a confirmatory experiment's seeds).
LATE_OVERRIDE_KEYS = ("first_seed",)
PATCH_DIR = "patches"

# Every metric a trained trial records under `metrics.` (the claims schema refuses a rule whose
# metric is not one of them). Trainer-specific metrics are listed with their trainer.
TRAIN_METRICS = (
    "steps", "tokens", "loss_tokens", "train_loss_first", "train_loss_last10",
    "val_loss_initial", "val_loss_final", "val_loss_best", "retention_loss_initial",
    "retention_loss_final", "train_seconds", "wall_seconds", "tokens_per_second", "peak_rss_mb",
    "adapter_reload_max_abs_diff",
)
GRID_METRICS = ("grid", "best_lr", "tuning_tokens", "tuning_seconds", "grid_points")
# setup_cache: whether the set-up's seed-independent steps came from runner.derived.cache
# ("hit", "miss" or "partial").
DERIVED_METRICS = ("derive_seconds", "setup_seconds", "setup_cache")
CHECK_METRICS = ("value", "expected", "abs_error", "tolerance")
# task=dimension_profile (runner/tasks/dimension_profile.py): its options and the profile.
PROFILE_METRICS = ("id_profile", "semantic_highway", "points", "pooling", "resamples",
                   "confidence", "levina_bickel_k")
# The measured arm family_geometry (runner/tasks/family_geometry.py).
FAMILY_METRICS = ("family_geometry", "neighbours", "other_model", "max_pairs")
# Greedy generation before and after training (runner.generation; data.generation_examples),
# and the retention loss's change (final - initial).
GENERATION_METRICS = ("generation", "retention_loss_increase")
# derived_seed_code: the pullback metric's deviation from I at every evaluation
# (geometry.pullback; runner.derived.run).
PULLBACK_METRICS = ("pullback",)
RECORDED_METRICS = (TRAIN_METRICS + GRID_METRICS + DERIVED_METRICS + CHECK_METRICS
                    + PROFILE_METRICS + FAMILY_METRICS + GENERATION_METRICS + PULLBACK_METRICS)
# The other parts of a row a claim may address (curves.steps, derived.layers, certificate...).
ROW_SECTIONS = ("metrics", "curves", "derived", "certificate", "hyperparameters", "data_sizes")


def plain(cfg: Any) -> dict:
    """A config dataclass as plain JSON-able data (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def comparable_data(data: dict | None) -> dict | None:
    """A plain data config without the late keys that are unset (LATE_DATA_KEYS), as trials
    recorded before those keys existed hold it."""
    if data is None:
        return None
    return {k: v for k, v in data.items() if not (k in LATE_DATA_KEYS and v is None)}


def hashed_config(config: dict) -> dict:
    """The part of a plain RunConfig dict that `config_hash` covers."""
    out = {k: config[k] for k in HASHED_KEYS if k in config}
    if "data" in out:
        out["data"] = comparable_data(out["data"])
    if isinstance(out.get("claim_overrides"), dict):
        out["claim_overrides"] = {k: v for k, v in out["claim_overrides"].items()
                                  if not (k in LATE_OVERRIDE_KEYS and v is None)}
    if "task" in out:
        out["task"] = {k: v for k, v in out["task"].items() if k in HASHED_TASK_KEYS}
    if "hardware" in out:
        out["hardware"] = {k: v for k, v in out["hardware"].items()
                           if k not in UNHASHED_HARDWARE_KEYS}
    return out


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that determines a trial's outcome (not where it is written)."""
    return stable_hash(hashed_config(plain(cfg)))


def random_init(model_config: dict | None) -> bool:
    """Whether a model config (a row's `config.model`) builds random weights: a smoke run."""
    return str((model_config or {}).get("source")) == ModelSource.tiny.value


def data_id(data: DataConfig) -> str:
    """The data id a trial records: the data option's id while it reads the option's own file;
    the file's name (stem) when `data.path` names another file, so own data is never recorded
    under the option's id (its sha256 is recorded beside it). A data option of the user's own
    (an id no file under conf/data declares) keeps its id."""
    declared = {}
    for option in sorted(DATA_DIR.glob("*.yaml")):
        spec = OmegaConf.load(option)
        declared.setdefault(spec.get("id"), spec.get("path"))
    own = declared.get(data.id)
    if own is None or _same_file(data.path, own):
        return data.id
    return Path(data.path).stem


def _same_file(a: str, b: str) -> bool:
    return Path(resolve_data_path(a)).resolve() == Path(resolve_data_path(b)).resolve()


@dataclass
class TrainOutcome:
    model: Any  # the trained model with its adapters attached, in evaluation mode
    result: TrainResult
    hyperparameters: dict
    extra_metrics: dict = field(default_factory=dict)
    derived: dict | None = None
    certificate: dict | None = None
    step_table: list[dict] | None = None


# ---------------------------------------------------------------------------------------------
# Provenance


@dataclass(frozen=True)
class Provenance:
    """Where a trial's code came from, read once when the run starts.

    A dirty tree is recorded as the sha256 of `git diff HEAD` and the patch itself, stored as
    `<results_dir>/patches/<sha256>.patch`, so a reviewer can rebuild the exact code.
    """

    git_commit: str
    git_diff_sha256: str | None = None
    git_patch: str | None = None  # path of the stored patch, relative to results_dir
    packages: dict[str, str] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, results_dir: str | Path, *, allow_dirty: bool = True,
             what: str = "this run", repo: Path | None = None) -> Provenance:
        head, diff = git_state(repo)
        if not diff:
            return cls(head, packages=package_versions(), cpu=cpu_facts())
        sha = hashlib.sha256(diff).hexdigest()
        if not allow_dirty:
            raise UserError(f"{what} needs a clean git tree: tracked files differ from "
                            f"{head[:12]} (commit them, or pass allow_dirty=true to record "
                            "the diff and its sha256 with every trial)")
        patch = Path(PATCH_DIR) / f"{sha}.patch"
        write_once(Path(results_dir) / patch, diff)
        return cls(f"{head}-dirty", sha, str(patch), package_versions(), cpu_facts())

    def as_row(self) -> dict[str, Any]:
        return {"git_commit": self.git_commit, "git_diff_sha256": self.git_diff_sha256,
                "git_patch": self.git_patch, "packages": self.packages, **self.cpu}


# ---------------------------------------------------------------------------------------------
# The ledger row


# Keys written only when set, so the rows of each kind keep the shape they always had.
OPTIONAL_KEYS = ("skip_reason", "detail", "shared_from", "git_diff_sha256", "git_patch",
                 "model_sha256", "model_type", "data_sha256", "data_sizes", "adapter_path",
                 "hyperparameters")


@dataclass
class TrialRow:
    """One ledger row. Field names are the JSON keys (DESIGN.md §6)."""

    run_id: str
    experiment: str
    arm: str  # the trainer's name, or "check"
    seed: int
    config_hash: str
    config: dict
    hardware: dict  # hardware, backend, device, dtype, threads
    provenance: Provenance
    started_at: str
    ended_at: str
    status: str = "ok"  # ok, diverged, skipped
    claim_id: str | None = None
    rule_hash: str | None = None
    claim_arm: str | None = None
    model_id: str | None = None
    model_sha256: str | None = None
    model_type: str | None = None
    data_id: str | None = None
    data_sha256: str | None = None
    data_sizes: dict | None = None
    metrics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    derived: dict | None = None
    hyperparameters: dict | None = None
    certificate: dict | None = None
    stop_reason: str | None = None
    diverged_at: dict | None = None
    adapter_path: str | None = None
    skip_reason: str | None = None
    detail: str | None = None
    shared_from: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("hardware", "provenance")}
        out.update(self.hardware)
        out.update(self.provenance.as_row())
        for key in OPTIONAL_KEYS:
            if out.get(key) is None:
                out.pop(key, None)
        return out

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def trained(cls, cfg: RunConfig, hw: HardwareInfo, provenance: Provenance, *,
                run_id: str, chash: str, started: str, loaded: Any, splits: Any,
                outcome: TrainOutcome, metrics: dict, adapter_dir: Path,
                claim: ClaimTag | None = None) -> TrialRow:
        """The row of a finished trial (its metrics computed by the train task)."""
        result = outcome.result
        diverged = result.stop_reason == "diverged"
        curves = {"eval": [asdict(e) for e in result.evals], "train_loss": result.train_losses}
        if outcome.step_table:
            curves["steps"] = outcome.step_table
        return cls(
            run_id=run_id, experiment=cfg.experiment, arm=cfg.trainer.name, seed=cfg.seed,
            config_hash=chash, config=plain(cfg), hardware=hw.as_row(), provenance=provenance,
            started_at=started, ended_at=utc_now(), status="diverged" if diverged else "ok",
            **(claim or ClaimTag()).as_row(),
            model_id=loaded.model_id, model_sha256=loaded.sha256, model_type=loaded.model_type,
            data_id=data_id(cfg.data), data_sha256=splits.sha256,
            data_sizes={"train": len(splits.train), "val": len(splits.val),
                        "retention": len(splits.retention),
                        **({"replayed": splits.replayed} if splits.replayed else {}),
                        "truncated_records": splits.truncated_records,
                        "truncated_share": splits.truncated_share},
            metrics={**metrics, **outcome.extra_metrics}, curves=curves,
            derived=outcome.derived, hyperparameters=outcome.hyperparameters,
            certificate=outcome.certificate, stop_reason=result.stop_reason,
            diverged_at=result.step_logs[-1] if diverged else None,
            adapter_path=str(adapter_dir))

    @classmethod
    def skipped(cls, cfg: RunConfig, reason: str, provenance: Provenance, *, chash: str,
                claim: ClaimTag | None = None, check: str | None = None) -> TrialRow:
        """The row of a trial that could not run here (`check`: an implementation check's)."""
        now = utc_now()
        arm = "check" if check else cfg.trainer.name
        return cls(
            run_id=new_run_id(cfg.experiment, arm, cfg.seed, chash), experiment=cfg.experiment,
            arm=arm, seed=cfg.seed, config_hash=chash,
            config={"check": check, "seed": cfg.seed} if check else plain(cfg),
            hardware=hardware_fields(cfg), provenance=provenance, started_at=now, ended_at=now,
            status="skipped", skip_reason=reason, **(claim or ClaimTag()).as_row(),
            model_id=None if check else model_id_of(cfg.model),
            data_id=None if check else data_id(cfg.data),
            hyperparameters=None if check else plain(cfg.trainer))

    @classmethod
    def check(cls, cfg: RunConfig, provenance: Provenance, *, check: str, seed: int,
              chash: str, claim: ClaimTag, started: str, metrics: dict,
              detail: str) -> TrialRow:
        """The row of a computed implementation check (no model, no data, no device)."""
        return cls(
            run_id=new_run_id(cfg.experiment, "check", seed, chash), experiment=cfg.experiment,
            arm="check", seed=seed, config_hash=chash, config={"check": check, "seed": seed},
            hardware=hardware_fields(cfg), provenance=provenance, started_at=started,
            ended_at=utc_now(), **claim.as_row(), metrics=metrics, detail=detail)

    @classmethod
    def measured(cls, cfg: RunConfig, hw: HardwareInfo, provenance: Provenance, *, arm: str,
                 chash: str, started: str, loaded: Any, claim: ClaimTag,
                 metrics: dict, data_sha256: str | None = None) -> TrialRow:
        """The row of an analysis task's measurement of a model (nothing trained), e.g.
        task=dimension_profile's intrinsic-dimension profile; `data_sha256`: the data file the
        measurement read."""
        return cls(
            run_id=new_run_id(cfg.experiment, arm, cfg.seed, chash), experiment=cfg.experiment,
            arm=arm, seed=cfg.seed, config_hash=chash, config=plain(cfg), hardware=hw.as_row(),
            provenance=provenance, started_at=started, ended_at=utc_now(), **claim.as_row(),
            model_id=loaded.model_id, model_sha256=loaded.sha256, model_type=loaded.model_type,
            data_id=cfg.data.id, data_sha256=data_sha256, metrics=metrics)

    @staticmethod
    def shared(source: dict, claim: ClaimTag, seed: int, chash: str) -> dict:
        """A copy of another claim's finished trial of the same config, tagged `shared_from`
        (returned as a dict: the source row may predate fields of this class)."""
        row = {k: v for k, v in source.items() if k != "schema_version"}
        row.update(run_id=new_run_id(source["experiment"], str(source.get("arm")), seed, chash),
                   **claim.as_row(), shared_from=source["run_id"])
        return row


@dataclass(frozen=True)
class ClaimTag:
    """Which claim's rule asked for a trial, and as which of its arms."""

    claim_id: str | None = None
    rule_hash: str | None = None
    claim_arm: str | None = None

    def as_row(self) -> dict[str, Any]:
        return {"claim_id": self.claim_id, "rule_hash": self.rule_hash,
                "claim_arm": self.claim_arm}


def hardware_fields(cfg: RunConfig) -> dict:
    """The hardware columns of a row for a trial that did not reach `setup_hardware`."""
    hw = cfg.hardware
    return {"hardware": hw.name, "backend": getattr(hw.backend, "value", hw.backend),
            "device": hw.device, "dtype": getattr(hw.dtype, "value", hw.dtype),
            "threads": hw.threads or usable_cores()}
