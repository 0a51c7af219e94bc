"""The real configs compose, and bad ones fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, compose_config

from runner.app import precheck
from runner.config.load import to_run_config
from runner.config.schema import LoraBaselineConfig, RunConfig
from runner.errors import ConfigError, UserError

EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
    for p in (ROOT / "conf" / "experiment").rglob("*.yaml")
)


def _experiment(experiment: str) -> list[str]:
    """The overrides that run an experiment; one whose weights are not embedded gets a path."""
    overrides = [f"+experiment={experiment}"]
    if compose_config(overrides).model.source == "pretrained":
        overrides.append("model.path=/some/where")
    return overrides


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = to_run_config(compose_config(_experiment(experiment)))
    assert isinstance(cfg, RunConfig)
    assert cfg.experiment == experiment.split("/")[-1]


@pytest.mark.parametrize("group", ["model", "data", "hardware", "trainer", "task", "tracking"])
def test_every_group_option_composes(group: str) -> None:
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        overrides = [f"{group}={path.stem}"]
        if group == "model" and (path.stem.startswith("lfm2_") or path.stem == "hf"):
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
        ("data.generation_examples=-3", "data.generation_examples: must be >= 1"),
        ("data.max_new_tokens=0", "data.max_new_tokens: must be >= 1"),
        ("data.max_examples=0", "data.max_examples: must be >= 1"),
        ("trainer=adamw trainer.lr=-1", "trainer.lr: must be > 0"),
        ("trainer=adamw trainer.r=0", "trainer.r: must be >= 1"),
        ("trainer=adamw trainer.optimizer=adam", "trainer.optimizer: must be one of adamw, sgd"),
        ("trainer=adamw trainer.lora_dropout=1.0", "trainer.lora_dropout: must be in [0, 1)"),
        ("trainer=adamw trainer.betas=[0.9]", "trainer.betas: must be two values in [0, 1)"),
        ("trainer=adamw_grid trainer.lr_grid=[1e-3,0]", "trainer.lr_grid: every learning rate"),
        ("trainer=sgd trainer.max_grad_norm=0", "trainer.max_grad_norm: must be > 0"),
        ("trainer=adamw trainer.target_modules=[]", "trainer.target_modules: must name at least"),
        ("budget.max_steps=0", "budget.max_steps: must be > 0"),
        ("budget.eval_batch_size=0", "budget.eval_batch_size: must be > 0"),
        ("trainer=derived_matched_mass trainer.noise_examples=1",
         "trainer.noise_examples: must be >= 2"),
        ("trainer=derived trainer.micro_batch=0", "trainer.micro_batch: must be > 0"),
        ("trainer=derived trainer.erank_variant=roy", "trainer.erank_variant: must be one of "
         "roy_vetterli, squared"),
        ("model=nope", "Could not find 'model/nope'"),
        ("model=lfm2_350m", "model.path: missing required value"),
    ],
)
def test_bad_config_names_the_key(override: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        precheck(override.split())
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_target_modules_the_model_lacks_are_named_with_the_ones_it_has() -> None:
    from runner.models.loading import load_model
    from runner.training.baseline import attach_lora

    for targets in ("[nope_proj]", "[q_proj,v_prj]"):  # none found; one of two misspelt
        cfg = to_run_config(compose_config(["model=tiny_llama", "trainer=adamw",
                                            f"trainer.target_modules={targets}"]))
        with pytest.raises(ConfigError) as info:
            attach_lora(load_model(cfg.model).model, cfg.trainer)
        missing = "nope_proj" if "nope" in targets else "v_prj"
        assert str(info.value).startswith(f"trainer.target_modules: {missing} not in ")
        assert "q_proj" in str(info.value) and "\n" not in str(info.value)
    cfg = to_run_config(compose_config(["model=tiny_llama", "trainer=adamw",
                                        "trainer.target_modules=[self_attn.q_proj]"]))
    attach_lora(load_model(cfg.model).model, cfg.trainer)  # a dotted suffix is a match


def test_claim_arms_and_budgets_are_range_checked_like_a_run() -> None:
    from runner.config.load import load_trainer_option

    with pytest.raises(ConfigError, match=r"^trainer=adamw: trainer.lr: must be > 0$"):
        load_trainer_option("adamw", {"lr": -1.0})
    with pytest.raises(ConfigError, match=r"^trainer=derived: trainer.noise_examples: must be"):
        load_trainer_option("derived", {"noise_examples": 1})
    assert load_trainer_option("adamw", {"lr": 0.1}).lr == 0.1

    from dataclasses import replace

    from runner.claims.loading import load_claim
    from runner.tasks.claims import plan_trials

    cfg = to_run_config(compose_config(["model=tiny_llama"]))
    claim = load_claim("derived_beats_sgd")
    assert plan_trials(cfg, claim)  # as committed
    with pytest.raises(ConfigError, match=r"^claim=derived_beats_sgd: budget.max_steps: must"):
        plan_trials(cfg, replace(claim, budget={**claim.budget, "max_steps": 0}))


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
    groups = help_out.stdout.split("== Config groups")[1].split("==")[1]
    listed = {line.split(":")[0].strip().lstrip("+") for line in groups.strip().splitlines()}
    assert listed == {"data", "experiment", "hardware", "model", "task", "tracking", "trainer",
                      "hydra/launcher"}
    assert "base_" not in groups  # schemas, not options a user picks
    claims = help_out.stdout.split("== Claims")[1]
    assert "claims=[id,...]" in claims and "derived_beats_sgd" in claims
    cfg_out = _run_cli("--cfg", "job", "+experiment=quickstart")
    assert cfg_out.returncode == 0 and "experiment: quickstart" in cfg_out.stdout


def test_one_trainer_registry_for_yaml_schema_dispatcher_and_bench() -> None:
    import yaml

    from runner.config.paths import TRAINER_DIR
    from runner.config.schema import TRAINER_SCHEMAS, TRAINERS
    from runner.tasks.bench import ARMS

    names = {yaml.safe_load(p.read_text())["name"] for p in TRAINER_DIR.glob("*.yaml")}
    assert names == set(TRAINERS) == set(TRAINER_SCHEMAS)
    assert {arm.trainer for arm in ARMS} <= set(TRAINERS)


def test_claim_is_not_a_group_and_says_how_to_test_one() -> None:
    with pytest.raises(ConfigError) as info:
        precheck(["claim=derived_beats_sgd"])
    assert str(info.value).startswith("claim=derived_beats_sgd: claims are not a config group; "
                                      "test claims with task=claims claims=[derived_beats_sgd]")
    to_run_config(compose_config(["task=claims", "claims=[derived_beats_sgd]"]))  # the way


@pytest.mark.parametrize("key", ["results_dir", "runs_dir", "task.output", "task.docs_dir"])
def test_output_folder_that_is_a_file_fails_before_any_work(tmp_path: Path, key: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"{key}={afile}: not a directory"):
        precheck([f"{key}={afile}"])
    with pytest.raises(ConfigError, match=f"{key}={afile / 'sub'}: not a directory \\({afile} is"):
        precheck([f"{key}={afile / 'sub'}"])


def test_cli_results_dir_file_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    afile = tmp_path / "results"
    afile.write_text("")
    proc = _run_cli("+experiment=quickstart", "task=train", f"results_dir={afile}",
                    f"runs_dir={tmp_path / 'runs'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: results_dir={afile}: not a directory; give a folder for the ledger"], proc.stderr
    assert afile.read_text() == "" and not (tmp_path / "runs").exists()


def test_adhoc_runs_keep_out_of_the_committed_ledger() -> None:
    assert to_run_config(compose_config([])).results_dir == "runs/ledger"
    assert to_run_config(compose_config(["runs_dir=/x/runs"])).results_dir == "/x/runs/ledger"
    assert to_run_config(compose_config(["results_dir=results"])).results_dir == "results"
    for experiment in EXPERIMENTS:  # committed experiments write the committed ledger,
        cfg = to_run_config(compose_config(_experiment(experiment)))
        # except `make run`'s, which keeps its own beside its runs (a fresh clone trains)
        assert cfg.results_dir == ("runs/thesis/ledger" if experiment == "thesis" else "results")


def test_results_dir_is_not_in_the_config_hash() -> None:
    from runner.trial import config_hash

    base = to_run_config(compose_config(["+experiment=quickstart"]))
    moved = to_run_config(compose_config(["+experiment=quickstart", "results_dir=elsewhere"]))
    assert config_hash(base) == config_hash(moved)


def test_own_data_is_recorded_under_its_file_name(tmp_path: Path) -> None:
    from runner.trial import data_id

    own = tmp_path / "my_corpus.jsonl"
    own.write_text('{"text": "x"}\n')
    assert data_id(to_run_config(compose_config([])).data) == "stdlib_docs"
    same = str(ROOT / "data" / "stdlib_docs" / "train.jsonl")  # the option's own file, spelt out
    assert data_id(to_run_config(compose_config([f"data.path={same}"])).data) == "stdlib_docs"
    assert data_id(to_run_config(compose_config([f"data.path={own}"])).data) == "my_corpus"
