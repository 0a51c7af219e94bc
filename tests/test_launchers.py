"""Hydra launchers (DESIGN.md §7): joblib and Ray run a multirun end to end into one ledger;
the submitit Slurm config composes and every field reaches sbatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

TINY_TRAIN = ["task=train", "trainer=sgd", "model=tiny_llama", "data.max_seq_len=96",
              "data.max_examples=120", "budget.max_tokens=300", "budget.eval_every=2",
              "budget.eval_examples=4", "verify_adapter=false", "hardware.threads=1"]


def _trials(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "trials").glob("*.json"))]


def test_joblib_launcher_runs_a_multirun_into_one_ledger(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    results = tmp_path / "results"
    out = subprocess.run(
        [sys.executable, "-m", "runner", "-m", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", *TINY_TRAIN, "seed=0,1", f"results_dir={results}",
         f"runs_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    rows = _trials(results)
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert all(r["status"] == "ok" and r["metrics"]["tokens"] > 0 for r in rows)
    assert len({r["config_hash"] for r in rows}) == 2


@pytest.mark.slow
def test_ray_launcher_runs_a_multirun_on_a_local_cluster(tmp_path: Path, monkeypatch) -> None:
    """A local Ray runtime with 2 CPUs (Ray binds it to this node's IP, not 127.0.0.1), started
    and shut down here; the jobs run in Ray workers."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    from runner.app import main

    results = tmp_path / "results"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=78643200)
    try:
        main(["-m", "hydra/launcher=ray_local", *TINY_TRAIN, "seed=0,1",
              f"results_dir={results}", f"runs_dir={tmp_path / 'runs'}",
              f"hydra.sweep.dir={tmp_path / 'multirun'}"])
        assert ray.cluster_resources().get("CPU") == 2.0
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    rows = _trials(results)
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert all(r["status"] == "ok" and r["metrics"]["tokens"] > 0 for r in rows)
    sweep = (tmp_path / "multirun" / "multirun.yaml").read_text()
    assert "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher" in sweep
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir()) == ["0", "1"]


def _slurm_launcher(overrides: list[str] = ()):
    from omegaconf import OmegaConf

    cfg = compose_config_with_hydra(["hydra/launcher=slurm", *overrides])
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def compose_config_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.config.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_submitit_slurm_config_composes_and_every_field_reaches_sbatch(
        tmp_path: Path, monkeypatch) -> None:
    """Compose hydra/launcher=slurm, then hand its fields to submitit's Slurm executor exactly
    as hydra-submitit-launcher's `launch` does, and render the sbatch script (a stub `srun` on
    PATH stands in for the cluster: submitit only checks that it exists)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from omegaconf import OmegaConf

    params = _slurm_launcher(["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                              f"hydra.sweep.dir={tmp_path / 'multirun'}",
                              "+hydra.launcher.additional_parameters.mail-type=END"])
    assert params.pop("_target_") == (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert set(params) == set(OmegaConf.structured(SlurmQueueConf).keys()) - {"_target_"}
    assert params["submitit_folder"] == f"{tmp_path / 'multirun'}/.submitit/%j"
    assert (params["timeout_min"], params["cpus_per_task"], params["mem_gb"]) == (120, 2, 16)

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    sbatch = executor._executor._make_submission_file_text("python -m runner", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --mem=16GB",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "#SBATCH --mail-type=END"):
        assert line in sbatch, line


@pytest.mark.parametrize("override, key", [
    ("hydra.launcher.cpus_per_task=two", "cpus_per_task"),
    ("hydra.launcher.partitionn=gpu", "partitionn"),
])
def test_submitit_slurm_config_rejects_bad_fields(override: str, key: str) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with pytest.raises(Exception, match=key):
        _slurm_launcher([override])


def test_launcher_options_compose_with_an_experiment() -> None:
    for launcher in ("joblib", "ray", "ray_local", "slurm", "submitit_local"):
        pytest.importorskip({"joblib": "hydra_plugins.hydra_joblib_launcher",
                             "ray": "hydra_plugins.hydra_ray_launcher",
                             "ray_local": "hydra_plugins.hydra_ray_launcher"}.get(
                                 launcher, "hydra_plugins.hydra_submitit_launcher"))
        cfg = compose_config_with_hydra([f"hydra/launcher={launcher}", "+experiment=quickstart"])
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
        assert cfg.experiment == "quickstart"
