"""task=claims: run every claim x arm x seed that the ledger lacks, then decide the verdicts.

1. Load the claims and resolve every arm's trainer config first, so a typo in any claim or
   trainer option stops the job before the first trial trains.
2. Pre-register each rule: `results/rules/<claim>-<hash>.json` is written once, before any of
   its trials, and keeps the statement and the full rule next to the trials it governs.
3. For each trial: reuse a finished row with the same config hash and rule hash (an
   interrupted experiment resumes where it stopped); share a finished trial of the same config
   that another claim ran *after* this claim's rule was registered (a copy tagged
   `shared_from`, so the derived arm common to several claims trains once); else train it. An
   arm that cannot run here (hardware, weights, an optional package) writes a SKIPPED row with
   the reason.
4. Decide every verdict from the ledger alone (for this job's hardware, where the experiment
   has run on several: runner.claims.verdicts.split_by_hardware).

Hardware that is absent here stops the job with one line (exit 2) before any rule is written;
inside a Hydra multirun it instead writes a SKIPPED row for every planned trial that the ledger
lacks, so a sweep over hardware=cpu,cuda,... goes on.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from runner.claims import (
    CHECKS,
    CLAIM_DIR,
    Claim,
    Kind,
    Verdict,
    VerdictWord,
    decide_on,
    load_claim,
)
from runner.claims.schema import claim_from_record
from runner.config import trainer_options
from runner.errors import HardwareUnavailable, ModelError
from runner.hardware import in_sweep, resolved, setup_hardware
from runner.ledger import (
    git_commit,
    new_run_id,
    package_versions,
    read_trials,
    stable_hash,
    utc_now,
    write_trial,
)
from runner.models import model_id_of
from runner.schema import RunConfig
from runner.sweep import hardware_fields, reason_of
from runner.trial import config_hash

RULES_DIR = "rules"
# What makes an arm unrunnable *here* (not a bad config): a missing device or backend, weights
# that are not present, an optional package that is not installed.
UNAVAILABLE = (HardwareUnavailable, ModelError, ModuleNotFoundError)


@dataclass(frozen=True)
class PlannedTrial:
    claim: Claim
    arm: str
    seed: int
    cfg: RunConfig | None  # None for a by-construction check
    config_hash: str


def claims_task(cfg: RunConfig) -> list[Verdict]:
    """`task=claims`: run the experiment's claims and print a verdict table."""
    from rich.console import Console
    from rich.table import Table

    from runner.tasks.train import check_data_paths
    from runner.tracking import enabled, mirror_verdicts

    check_data_paths(cfg)  # a missing data file fails before any rule is written
    enabled(cfg)  # a bad tracking option too
    cfg, unavailable = check_hardware(cfg)
    verdicts = run_claims(cfg, list(cfg.claims), unavailable=unavailable)
    mirror_verdicts(cfg, verdicts)
    table = Table(title=f"claims of experiment {cfg.experiment}")
    for col in ("claim", "verdict", "effect", "p", "n", "reason"):
        table.add_column(col)
    for v in verdicts:
        table.add_row(v.claim_id, v.verdict.value, _num(v.effect), _num(v.p_value), str(v.n),
                      v.reason)
    Console(stderr=True).print(table)
    print(f"claims: ledger {cfg.results_dir}/trials; `make results` regenerates the docs",
          flush=True)
    return verdicts


def check_hardware(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """(cfg with the device that runs, None), or raise HardwareUnavailable -- except inside a
    Hydra multirun, where absent hardware gives (cfg, reason) and every trial is SKIPPED."""
    try:
        return resolved(cfg, setup_hardware(cfg.hardware)), None
    except HardwareUnavailable as err:
        if not in_sweep():
            raise
        return cfg, reason_of(err)


def validate_derived_task(cfg: RunConfig) -> Verdict:
    """`task=validate_derived`: the seed's `train validate-derived --trials N`.

    Runs the derived trainer on seeds 0..N-1 (each seed also draws its own data order) under the
    pre-registered counterexample search `derived_never_diverges` with `task.trials` seeds, and
    prints every counterexample: a run that diverged, did not improve its validation loss, or
    broke the Weyl bound. Exits non-zero when one is found.
    """
    from runner.errors import UserError
    from runner.tasks.train import check_data_paths

    check_data_paths(cfg)
    cfg, unavailable = check_hardware(cfg)
    claim_id = "derived_never_diverges"
    ov = replace(cfg.claim_overrides, trials=cfg.task.trials)
    (verdict,) = run_claims(replace(cfg, claim_overrides=ov), [claim_id],
                            unavailable=unavailable)
    for problem in verdict.details.get("counterexamples", []):
        print(f"counterexample: {problem}", flush=True)
    print(f"validate_derived: {verdict.verdict.value} over {verdict.n} trial(s) -- "
          f"{verdict.reason}", flush=True)
    if verdict.verdict is VerdictWord.DISPROVEN:
        raise UserError(f"validate_derived: counterexample found ({verdict.reason})")
    return verdict


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def with_overrides(claim: Claim, trials: int | None, budget: dict) -> Claim:
    """The claim with an experiment's trial count and budget (a changed rule, a new hash),
    validated like a claim file: an override the rule cannot take (e.g. 2 trials for a paired
    comparison) fails here, before anything is registered or trained."""
    changes = {}
    if trials is not None and claim.kind is not Kind.by_construction:
        changes["trials"] = trials
    if budget and claim.kind is not Kind.by_construction:
        changes["budget"] = {**claim.budget, **budget}
    if not changes:
        return claim
    return claim_from_record(replace(claim, **changes).as_dict(),
                             f"claim {claim.id} with claim_overrides")


def run_claims(cfg: RunConfig, claim_ids: list[str], *, claim_dir: Path = CLAIM_DIR,
               unavailable: str | None = None) -> list[Verdict]:
    """Run what the ledger lacks for each claim, then return one verdict per claim (on this
    job's hardware). `unavailable`: the reason this job's hardware is absent; every trial the
    ledger lacks is then written as SKIPPED with it."""
    # 1. Claims and every trial's config, before anything runs.
    ov = cfg.claim_overrides
    claims = [with_overrides(load_claim(cid, claim_dir), ov.trials, dict(ov.budget))
              for cid in claim_ids]
    plans = [trial for claim in claims for trial in plan_trials(cfg, claim)]

    # 2. Pre-registration records.
    registered = {claim.id: _registered_at(register_rule(cfg.results_dir, claim))
                  for claim in claims}

    # 3. Trials.
    for trial in plans:
        status = run_trial(trial, cfg, registered[trial.claim.id], unavailable)
        print(f"claim {trial.claim.id} arm {trial.arm} seed {trial.seed}: {status}", flush=True)

    # 4. Verdicts, from the ledger rows of this experiment.
    rows = [r for r in read_trials(cfg.results_dir) if r.get("experiment") == cfg.experiment]
    verdicts = [decide_on(claim, rows, cfg.hardware.name) for claim in claims]
    for v in verdicts:
        print(f"claim {v.claim_id}: {v.verdict.value} -- {v.reason}", flush=True)
    return verdicts


def plan_trials(cfg: RunConfig, claim: Claim) -> list[PlannedTrial]:
    """Every (arm, seed) trial of a claim with its full RunConfig and config hash."""
    from runner.config import load_trainer_option

    if claim.kind is Kind.by_construction:
        return [PlannedTrial(claim, claim.check, seed, None,
                             stable_hash({"check": claim.check, "seed": seed}))
                for seed in claim.seeds]
    budget = replace(cfg.budget, **claim.budget)
    plans = []
    for arm in claim.arms:
        trainer = load_trainer_option(arm.trainer, arm.overrides)
        for seed in claim.seeds:
            trial_cfg = replace(cfg, trainer=trainer, seed=seed, budget=budget)
            plans.append(PlannedTrial(claim, arm.name, seed, trial_cfg, config_hash(trial_cfg)))
    return plans


def run_trial(trial: PlannedTrial, cfg: RunConfig, registered_at: str = "",
              unavailable: str | None = None) -> str:
    """Reuse, share, run, or skip one trial; return what happened (for the progress line).

    Config hashes include the hardware (name, backend, device, dtype), so trials are reused and
    shared only on the same hardware; a by-construction check's hash does not (numpy, no device).
    """
    rh = trial.claim.rule_hash
    same_config = [r for r in read_trials(cfg.results_dir)  # verdicts are per experiment
                   if r.get("config_hash") == trial.config_hash
                   and r.get("experiment") == cfg.experiment]
    existing = [r for r in same_config
                if r.get("rule_hash") == rh and r.get("claim_id") == trial.claim.id]
    if any(r.get("status") != "skipped" for r in existing):
        return "reused"
    if unavailable is not None:
        if not any(r.get("skip_reason") == unavailable
                   and r.get("hardware") == cfg.hardware.name for r in existing):
            _write_skipped_row(trial, unavailable, cfg)
        return f"skipped ({unavailable})"
    # Only trials that started after this rule was fixed count for it (pre-registration).
    shareable = [r for r in same_config if not r.get("shared_from")
                 and r.get("claim_id") is not None and r.get("status") != "skipped"
                 and str(r.get("started_at", "")) > registered_at]
    if shareable:
        source = min(shareable, key=lambda r: r["run_id"])
        _write_shared_row(trial, source, cfg.results_dir)
        return f"shared (trial {source['run_id']} of claim {source['claim_id']})"
    if trial.cfg is None:
        _write_check_row(trial, cfg)
        return "done"
    try:
        _train(trial)
    except UNAVAILABLE as err:
        reason = reason_of(err)
        if not any(r.get("skip_reason") == reason for r in existing):
            _write_skipped_row(trial, reason, cfg)
        return f"skipped ({reason})"
    return "done"


def _train(trial: PlannedTrial) -> dict:
    from runner.tasks.train import train_task

    return train_task(trial.cfg, claim_id=trial.claim.id, rule_hash=trial.claim.rule_hash,
                      claim_arm=trial.arm)


def register_rule(results_dir: str | Path, claim: Claim) -> Path:
    """Write `results/rules/<id>-<hash12>.json` once (the pre-registration record)."""
    rules = Path(results_dir) / RULES_DIR
    rules.mkdir(parents=True, exist_ok=True)
    final = rules / f"{claim.id}-{claim.rule_hash[:12]}.json"
    if final.exists():
        return final
    record = {**claim.as_dict(), "registered_at": utc_now(), "git_commit": git_commit()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=rules)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, final)  # atomic; a concurrent job that registered first wins
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return final


def _registered_at(path: Path) -> str:
    return str(json.loads(path.read_text()).get("registered_at", ""))


def _write_shared_row(trial: PlannedTrial, source: dict, results_dir: str) -> None:
    row = {k: v for k, v in source.items() if k != "schema_version"}
    row.update(run_id=new_run_id(source["experiment"], str(source.get("arm")), trial.seed,
                                 trial.config_hash),
               claim_id=trial.claim.id, rule_hash=trial.claim.rule_hash, claim_arm=trial.arm,
               shared_from=source["run_id"])
    write_trial(results_dir, row)


def _base_row(trial: PlannedTrial, cfg: RunConfig, arm_label: str) -> dict:
    from omegaconf import OmegaConf

    run_cfg = trial.cfg or cfg
    return {
        "run_id": new_run_id(cfg.experiment, arm_label, trial.seed, trial.config_hash),
        "experiment": cfg.experiment, "claim_id": trial.claim.id,
        "rule_hash": trial.claim.rule_hash, "claim_arm": trial.arm, "arm": arm_label,
        "seed": trial.seed, **hardware_fields(cfg),
        "model_id": model_id_of(cfg.model) if trial.cfg else None,
        "data_id": cfg.data.id if trial.cfg else None, "config_hash": trial.config_hash,
        "config": OmegaConf.to_container(OmegaConf.structured(run_cfg), enum_to_str=True)
        if trial.cfg else {"check": trial.claim.check, "seed": trial.seed},
        "git_commit": git_commit(), "packages": package_versions(),
        "started_at": utc_now(), "metrics": {}, "curves": {}, "derived": None,
        "certificate": None, "stop_reason": None,
    }


def _write_skipped_row(trial: PlannedTrial, reason: str, cfg: RunConfig) -> None:
    if trial.cfg is None:  # a by-construction check
        row = _base_row(trial, cfg, "check")
        row.update(hyperparameters=None)
    else:
        row = _base_row(trial, trial.cfg, trial.cfg.trainer.name)
        row.update(hyperparameters=trainer_options(trial.cfg.trainer))
    row.update(status="skipped", skip_reason=reason, ended_at=utc_now())
    write_trial(cfg.results_dir, row)


def _write_check_row(trial: PlannedTrial, cfg: RunConfig) -> None:
    result = CHECKS[trial.claim.check](trial.seed)
    row = _base_row(trial, cfg, "check")
    row.update(status="ok", ended_at=utc_now(), metrics={
        "value": result.value, "expected": result.expected, "abs_error": result.abs_error,
        "tolerance": trial.claim.tolerance}, detail=result.detail)
    write_trial(cfg.results_dir, row)
