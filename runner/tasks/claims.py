"""task=claims: run every claim x arm x seed that the ledger lacks, then decide the verdicts.

1. Load the claims and resolve every arm's trainer config first, so a typo in any claim or
   trainer option stops the job before the first trial trains.
2. Pre-register each rule: `results/rules/<claim>-<hash>.json` is written once, before any of
   its trials, and keeps the statement and the full rule next to the trials it governs. The
   rule is registered with its setting (each arm's resolved trainer options, the model, the
   data and its sha256, the budget), so the rule hash covers everything a verdict pools.
3. For each trial: reuse a finished row with the same config hash and rule hash (an
   interrupted experiment resumes where it stopped); share a finished trial of the same config
   that another claim ran *after* this claim's rule was registered (a copy tagged
   `shared_from`, so the derived arm common to several claims trains once); else train it. An
   arm that cannot run here (hardware, weights, an optional package) writes a SKIPPED row with
   the reason.
4. Decide every verdict from the ledger alone (for this job's hardware, where the experiment
   has run on several: runner.claims.verdicts.split_by_hardware).

The job reads the git state when it starts and refuses a tree whose tracked files differ from
HEAD unless `allow_dirty=true`, which stores the diff's sha256 on every row and the patch
under `<results_dir>/patches/`.

Hardware that is absent here stops the job with one line (exit 2) before any rule is written;
inside a Hydra multirun it instead writes a SKIPPED row for every planned trial that the ledger
lacks, so a sweep over hardware=cpu,cuda,... goes on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

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
from runner.claims.measurements import is_measured, measured_options
from runner.claims.registration import RULES_DIR, register_rule, registered_at
from runner.claims.schema import claim_from_record
from runner.config.load import budget_checks, load_trainer_option, refuse_failed
from runner.config.schema import RunConfig
from runner.errors import ConfigError, HardwareUnavailable, ModelError, UserError
from runner.hardware import in_sweep, resolved, setup_hardware
from runner.ledger import read_trials, stable_hash, utc_now, write_trial
from runner.sweep import reason_of
from runner.tasks.measured import MEASURED
from runner.tasks.summary import build_pages, summary_lines
from runner.tasks.train import check_data_paths, train_task
from runner.tracking import enabled, mirror_verdicts
from runner.trial import ClaimTag, Provenance, TrialRow, comparable_data, config_hash, plain

__all__ = ["RULES_DIR", "claims_task", "register_rule", "run_claims", "run_trial"]

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
    measured: str | None = None  # a measured arm: the measurement's name


def claims_task(cfg: RunConfig) -> list[Verdict]:
    """`task=claims`: run the experiment's claims and print a verdict table."""
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
    if cfg.task.docs_dir:
        build_pages(cfg.results_dir, cfg.task.docs_dir)
    for line in summary_lines(cfg, verdicts):
        print(line, flush=True)
    if cfg.task.docs_dir:
        print(f"claims: ledger {cfg.results_dir}/trials; pages {cfg.task.docs_dir}/claims.md "
              f"and {cfg.task.docs_dir}/experiments/{cfg.experiment}.md", flush=True)
    else:
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


def with_overrides(claim: Claim, trials: int | None, budget: dict,
                   first_seed: int | None = None) -> Claim:
    """The claim with an experiment's trial count and budget (a changed rule, a new hash),
    validated like a claim file: an override the rule cannot take (e.g. 2 trials for a paired
    comparison) fails here, before anything is registered or trained."""
    changes = {}
    if trials is not None and claim.kind is not Kind.by_construction:
        changes["trials"] = trials
    if budget and claim.kind is not Kind.by_construction:
        changes["budget"] = {**claim.budget, **budget}
    if first_seed is not None and claim.kind is not Kind.by_construction:
        changes["first_seed"] = first_seed
    if not changes:
        return claim
    return claim_from_record(replace(claim, **changes).as_dict(),
                             f"claim {claim.id} with claim_overrides")


def run_claims(cfg: RunConfig, claim_ids: list[str], *, claim_dir: Path = CLAIM_DIR,
               unavailable: str | None = None) -> list[Verdict]:
    """Run what the ledger lacks for each claim, then return one verdict per claim (on this
    job's hardware). `unavailable`: the reason this job's hardware is absent; every trial the
    ledger lacks is then written as SKIPPED with it."""
    # 1. The code state (a dirty tree is refused unless allowed), the claims with the setting
    #    of this experiment, and every trial's config, before anything runs.
    if not 0 <= cfg.task.shard < cfg.task.shards:
        raise ConfigError(f"task.shard={cfg.task.shard}: must be in 0..task.shards-1 "
                          f"(task.shards={cfg.task.shards})")
    ov = cfg.claim_overrides
    claims = [in_setting(with_overrides(load_claim(cid, claim_dir), ov.trials,
                                        dict(ov.budget), ov.first_seed), cfg)
              for cid in claim_ids]
    plans = [trial for claim in claims for trial in plan_trials(cfg, claim)]
    provenance = Provenance.read(cfg.results_dir, allow_dirty=cfg.allow_dirty,
                                 what="task=claims")

    # 2. Pre-registration records.
    registered = {claim.id: registered_at(register_rule(cfg.results_dir, claim, provenance))
                  for claim in claims}

    # 3. Trials (this job's shard of them).
    for trial in plans:
        if int(trial.config_hash, 16) % cfg.task.shards != cfg.task.shard:
            continue
        status = run_trial(trial, cfg, registered[trial.claim.id], unavailable, provenance)
        print(f"claim {trial.claim.id} arm {trial.arm} seed {trial.seed}: {status}", flush=True)

    # 4. Verdicts, from the ledger rows of this experiment.
    rows = [r for r in read_trials(cfg.results_dir) if r.get("experiment") == cfg.experiment]
    verdicts = [decide_on(claim, rows, cfg.hardware.name) for claim in claims]
    for v in verdicts:
        print(f"claim {v.claim_id}: {v.verdict.value} -- {v.reason}", flush=True)
    return verdicts


def in_setting(claim: Claim, cfg: RunConfig) -> Claim:
    """The claim with the setting this experiment runs it in (`Claim.setting`): each arm's
    resolved trainer options, the model, the data (with its file's sha256) and the budget.
    Implementation checks computed without a model have no setting."""
    if claim.kind is Kind.by_construction:
        return claim
    data_path, _ = check_data_paths(cfg)
    data_sha = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()
    setting = {
        "arms": {a.name: _arm_setting(a, cfg) for a in claim.arms},
        "model": plain(cfg.model), "data": comparable_data(plain(cfg.data)),
        "data_sha256": data_sha,
        "budget": plain(replace(cfg.budget, **claim.budget)),
    }
    return claim_from_record(replace(claim, setting=setting).as_dict(),
                             f"claim {claim.id} in experiment {cfg.experiment}")


def _arm_setting(arm, cfg: RunConfig) -> dict:
    """An arm's part of the setting: its resolved trainer options, or a measured arm's task
    options (runner.claims.measurements)."""
    if is_measured(arm.trainer):
        return measured_options(arm.trainer, plain(cfg.task))
    return plain(load_trainer_option(arm.trainer, arm.overrides))


def plan_trials(cfg: RunConfig, claim: Claim) -> list[PlannedTrial]:
    """Every (arm, seed) trial of a claim with its full RunConfig and config hash; a measured
    arm's trial keeps the job's trainer (it trains nothing) and takes its measurement's hash."""
    if claim.kind is Kind.by_construction:
        return [PlannedTrial(claim, claim.check, seed, None,
                             stable_hash({"check": claim.check, "seed": seed}))
                for seed in claim.seeds]
    budget = replace(cfg.budget, **claim.budget)
    refuse_failed(budget_checks(budget), f"claim={claim.id}: ")  # checked like a run's
    plans = []
    for arm in claim.arms:
        if is_measured(arm.trainer):
            for seed in claim.seeds:
                trial_cfg = replace(cfg, seed=seed, budget=budget)
                plans.append(PlannedTrial(claim, arm.name, seed, trial_cfg,
                                          MEASURED[arm.trainer].trial_hash(trial_cfg),
                                          measured=arm.trainer))
            continue
        trainer = load_trainer_option(arm.trainer, arm.overrides)
        for seed in claim.seeds:
            trial_cfg = replace(cfg, trainer=trainer, seed=seed, budget=budget)
            plans.append(PlannedTrial(claim, arm.name, seed, trial_cfg, config_hash(trial_cfg)))
    return plans


def run_trial(trial: PlannedTrial, cfg: RunConfig, registered_at: str = "",
              unavailable: str | None = None, provenance: Provenance | None = None) -> str:
    """Reuse, share, run, or skip one trial; return what happened (for the progress line).

    Config hashes include the hardware (name, backend, device, dtype), so trials are reused and
    shared only on the same hardware; a by-construction check's hash does not (numpy, no device).
    """
    rh = trial.claim.rule_hash
    provenance = provenance or Provenance.read(cfg.results_dir, allow_dirty=cfg.allow_dirty)
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
            _write_skipped_row(trial, unavailable, cfg, provenance)
        return f"skipped ({unavailable})"
    # Only trials that started after this rule was fixed count for it (pre-registration).
    shareable = [r for r in same_config if not r.get("shared_from")
                 and r.get("claim_id") is not None and r.get("status") != "skipped"
                 and str(r.get("started_at", "")) > registered_at]
    if shareable:
        source = min(shareable, key=lambda r: r["run_id"])
        write_trial(cfg.results_dir,
                    TrialRow.shared(source, _tag(trial), trial.seed, trial.config_hash))
        return f"shared (trial {source['run_id']} of claim {source['claim_id']})"
    if trial.cfg is None:
        _write_check_row(trial, cfg, provenance)
        return "done"
    try:
        if trial.measured is not None:
            MEASURED[trial.measured].run(trial.cfg, _tag(trial), provenance)
        else:
            train_task(trial.cfg, claim=_tag(trial), provenance=provenance)
    except UNAVAILABLE as err:
        reason = reason_of(err)
        if not any(r.get("skip_reason") == reason for r in existing):
            _write_skipped_row(trial, reason, cfg, provenance)
        return f"skipped ({reason})"
    return "done"


def _tag(trial: PlannedTrial) -> ClaimTag:
    return ClaimTag(trial.claim.id, trial.claim.rule_hash, trial.arm)


def _write_skipped_row(trial: PlannedTrial, reason: str, cfg: RunConfig,
                       provenance: Provenance) -> None:
    run_cfg = trial.cfg or replace(cfg, seed=trial.seed)
    row = TrialRow.skipped(run_cfg, reason, provenance, chash=trial.config_hash,
                           claim=_tag(trial), check=trial.claim.check if trial.cfg is None
                           else None)
    write_trial(cfg.results_dir, row.as_dict())


def _write_check_row(trial: PlannedTrial, cfg: RunConfig, provenance: Provenance) -> None:
    started = utc_now()
    result = CHECKS[trial.claim.check](trial.seed)
    metrics = {"value": result.value, "expected": result.expected,
               "abs_error": result.abs_error, "tolerance": trial.claim.tolerance}
    row = TrialRow.check(cfg, provenance, check=trial.claim.check, seed=trial.seed,
                         chash=trial.config_hash, claim=_tag(trial), started=started,
                         metrics=metrics, detail=result.detail)
    write_trial(cfg.results_dir, row.as_dict())
