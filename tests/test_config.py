"""The real configs compose, and bad ones fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, compose_config

from runner.app import precheck
from runner.config import to_run_config
from runner.errors import ConfigError, UserError
from runner.schema import LoraBaselineConfig, RunConfig

EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
    for p in (ROOT / "conf" / "experiment").rglob("*.yaml")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = to_run_config(compose_config([f"+experiment={experiment}"]))
    assert isinstance(cfg, RunConfig)
    assert cfg.experiment == experiment.split("/")[-1]


@pytest.mark.parametrize("group", ["model", "data", "hardware", "trainer", "task", "tracking"])
def test_every_group_option_composes(group: str) -> None:
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        overrides = [f"{group}={path.stem}"]
        if group == "model" and path.stem.startswith("lfm2_"):
            overrides.append("model.path=/some/where")
        if group == "task" and path.stem == "claims":
            overrides.append("claims=[derived_beats_sgd]")
        to_run_config(compose_config(overrides))


def test_defaults_are_typed() -> None:
    cfg = to_run_config(compose_config([]))
    assert isinstance(cfg.trainer, LoraBaselineConfig)
    assert cfg.trainer.r == 8 and cfg.trainer.lora_alpha == 16
    assert list(cfg.trainer.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.nonexistent=1", "trainer.nonexistent: Key 'nonexistent' not in 'LoraBaselineConfig'"),
        ("seed=abc", "seed: Value 'abc' of type 'str' could not be converted to Integer"),
        ("hardware.dtype=float64", "hardware.dtype: Invalid value 'float64'"),
        ("data.val_fraction=1.5", "data.val_fraction: must be in (0, 1)"),
        ("model=nope", "Could not find 'model/nope'"),
        ("model=lfm2_350m", "model.path: missing required value"),
    ],
)
def test_bad_config_names_the_key(override: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        precheck([override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_sweep_is_checked_point_by_point() -> None:
    with pytest.raises(ConfigError, match="trainer.lr: Value 'x'"):
        precheck(["-m", "+experiment=quickstart", "seed=0,1", "trainer.lr=0.1,x"])


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_typo_fails_with_one_line() -> None:
    proc = _run_cli("+experiment=quickstart", "trainer.nonexistent=1")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.nonexistent" in lines[0], proc.stderr


def test_cli_missing_data_fails_with_one_line(tmp_path: Path) -> None:
    proc = _run_cli("+experiment=quickstart", "data.path=missing.jsonl",
                    f"results_dir={tmp_path}", f"runs_dir={tmp_path}")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.jsonl" in lines[0], proc.stderr
    assert not (tmp_path / "trials").exists()


def test_cli_help_and_cfg_job() -> None:
    help_out = _run_cli("--help")
    assert help_out.returncode == 0 and "experiment: " in help_out.stdout
    cfg_out = _run_cli("--cfg", "job", "+experiment=quickstart")
    assert cfg_out.returncode == 0 and "experiment: quickstart" in cfg_out.stdout


def test_one_trainer_registry_for_yaml_schema_dispatcher_and_bench() -> None:
    import yaml

    from runner.paths import TRAINER_DIR
    from runner.schema import TRAINER_SCHEMAS, TRAINERS
    from runner.tasks.bench import ARMS

    names = {yaml.safe_load(p.read_text())["name"] for p in TRAINER_DIR.glob("*.yaml")}
    assert names == set(TRAINERS) == set(TRAINER_SCHEMAS)
    assert {arm.trainer for arm in ARMS} <= set(TRAINERS)
