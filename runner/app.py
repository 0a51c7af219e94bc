"""The Hydra entry point: `python -m runner [overrides]`.

1. `main` first composes the config for every job the command line describes (each point of a
   `-m` sweep too) and converts it to the typed `RunConfig`. A typo, a wrong type or a missing
   value stops here with one line naming the key -- before any model is loaded.
   An output folder that cannot be one (`results_dir=<a file>`) fails here too.
2. Hydra then runs the job(s) as usual (`--cfg job`, multirun and launchers work as Hydra users
   expect); `run_job` converts the config once and dispatches to the task.

`--help` is ours (`app_help`): the options of each config group a user picks, the claim ids
(conf/claim/ holds rules for task=claims, not a group: `claim=<id>` is refused with the command
that tests it) and the composed config; `--hydra-help` is Hydra's.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runner.config.load import config_error_line, to_run_config
from runner.config.paths import CONF_DIR
from runner.config.schema import TaskName, register_configs
from runner.errors import ConfigError, HardwareUnavailable, UserError
from runner.hardware import in_sweep

register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_job(cfg)
    except UserError as err:
        _fail(str(err), err.exit_code)


# task -> "module:function"; imported on use, so a task's heavy imports load only when it runs.
TASKS = {
    TaskName.train: "runner.tasks.train:train_task",
    TaskName.model_info: "runner.tasks.model_info:model_info_task",
    TaskName.lora_svd: "runner.tasks.lora_svd:lora_svd_task",
    TaskName.validate_derived: "runner.tasks.claims:validate_derived_task",
    TaskName.claims: "runner.tasks.claims:claims_task",
    TaskName.bench: "runner.tasks.bench:bench_task",
    TaskName.dimension_profile: "runner.tasks.dimension_profile:dimension_profile_task",
    TaskName.export: "runner.tasks.export:export_task",
}


def run_job(cfg: DictConfig) -> object:
    """Convert the composed config once and run its task."""
    run_cfg = to_run_config(cfg)
    check_output_dirs(run_cfg)
    target = TASKS.get(run_cfg.task.name)
    if target is None:
        raise UserError(f"task={run_cfg.task.name.value}: not implemented")
    module, function = target.split(":")
    try:
        return getattr(importlib.import_module(module), function)(run_cfg)
    except HardwareUnavailable as err:
        # In a sweep, a train job on absent hardware (or a trainer its backend cannot run) is a
        # SKIPPED row, and the sweep goes on; task=claims handles it itself, per trial.
        if run_cfg.task.name is TaskName.train and in_sweep():
            from runner.sweep import skip_train

            return skip_train(run_cfg, err)
        raise


WHAT_GOES_IN = {"runs_dir": "the adapters and checkpoints", "results_dir": "the ledger",
                "task.output": "the export", "task.docs_dir": "the pages"}


def check_output_dirs(run_cfg) -> None:
    """Fail before any work if a folder the job writes (the ledger, the runs, an export, pages)
    cannot be a writable directory. (The ad-hoc ledger lies under runs_dir.)"""
    paths = {"runs_dir": run_cfg.runs_dir, "results_dir": run_cfg.results_dir,
             "task.output": run_cfg.task.output, "task.docs_dir": run_cfg.task.docs_dir}
    for key, value in paths.items():
        if value is None:
            continue
        path = Path(value)
        existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
        if not existing.is_dir():
            what = "" if existing == path else f" ({existing} is a file)"
            raise ConfigError(f"{key}={path}: not a directory{what}; give a folder for "
                              + WHAT_GOES_IN[key])
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: {existing} is not writable")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in args):
        print(app_help([a for a in args if a not in ("--help", "-h", "-m", "--multirun")]))
        return
    if _is_plain_job(args):
        try:
            precheck(args)
        except UserError as err:
            _fail(str(err), err.exit_code)
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _is_plain_job(args: list[str]) -> bool:
    """True unless Hydra is asked for something other than running jobs (--help, --cfg, ...)."""
    return not any(a.startswith("-") and a not in ("-m", "--multirun") for a in args)


def precheck(args: list[str]) -> None:
    """Compose and type-check every job of the command line; raise ConfigError on the first bad one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if a not in ("-m", "--multirun")]
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    _refuse_claim_group(job_overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(job_overrides)
    except Exception as err:  # Hydra's grammar errors
        raise ConfigError(config_error_line(err)) from None

    # Expand sweeps (a=1,2 b=x,y) into their cartesian product of plain overrides.
    choices = []
    for ov in parsed:
        if ov.is_sweep_override():
            values = list(ov.sweep_string_iterator())
            choices.append([f"{ov.get_key_element()}={v}" for v in values])
        else:
            choices.append([ov.input_line])
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for combo in itertools.product(*choices) if choices else [()]:
            try:
                cfg = compose(config_name="config", overrides=list(combo))
            except Exception as err:
                raise ConfigError(config_error_line(err)) from None
            check_output_dirs(to_run_config(cfg))
    GlobalHydra.instance().clear()


def _refuse_claim_group(overrides: list[str]) -> None:
    """conf/claim/ holds pre-registered rules that task=claims reads, not a config group."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "claim":
            ids = value.strip("[]") or "<id>"
            raise ConfigError(f"claim={value}: claims are not a config group; test claims with "
                              f"task=claims claims=[{ids}] (ids: {', '.join(claim_ids())})")


def claim_ids() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "claim").glob("*.yaml"))


# Hydra lists every folder under conf/ as a group, and the schemas stored for type checks
# (base_*) as options; the help lists what a user may choose, with conf/claim/ (rules that
# task=claims reads, not a group) under its own heading.
NOT_GROUPS = ("claim", "hydra")
HYDRA_GROUPS = ("hydra/launcher",)


def app_help(overrides: list[str]) -> str:
    """`python -m runner --help [overrides]`: the config groups, the claims and the config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            loader = GlobalHydra.instance().config_loader()
            names = [g for g in loader.list_groups("") if g not in NOT_GROUPS]
            groups = []
            for group in sorted(names) + list(HYDRA_GROUPS):
                options = [o for o in loader.get_group_options(group) if not o.startswith("base_")]
                prefix = "+" if group == "experiment" else ""  # no default: added, not replaced
                groups.append(f"  {prefix}{group}: {', '.join(sorted(options))}")
            try:
                config = OmegaConf.to_yaml(compose(config_name="config", overrides=overrides))
            except Exception as err:  # a bad override: say which, as a job would
                config = f"(cannot compose: {config_error_line(err)})\n"
    finally:
        GlobalHydra.instance().clear()
    return "\n".join([
        "ModelCypher: python -m runner [+experiment=NAME] [group=option ...] [key=value ...]",
        "", "== Config groups (group=option) ==", *groups,
        "", "== Claims (pre-registered rules; task=claims claims=[id,...]) ==",
        "  " + ", ".join(claim_ids()),
        "", "== Config (override any key: foo.bar=value) ==", config.rstrip(),
        "", "Hydra's own options: python -m runner --hydra-help",
    ])


