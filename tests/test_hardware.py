"""The hardware group: every option composes, hashes apart, is detected or refused with one
line; in a sweep, absent hardware gives SKIPPED rows and the sweep goes on; verdicts per
hardware."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, compose_config

from runner.config.load import to_run_config
from runner.config.schema import RunConfig
from runner.errors import HardwareUnavailable
from runner.hardware import setup_hardware
from runner.tasks.train import config_hash

HARDWARE = ("cpu", "cuda", "mps", "mlx", "jax_cpu", "jax_gpu")
TINY = ["model=tiny_llama", "data.max_seq_len=96", "data.max_examples=120",
        "budget.max_tokens=400", "budget.eval_every=2", "budget.eval_examples=4",
        "verify_adapter=false", "hardware.threads=1"]
ROW_HARDWARE_KEYS = ("hardware", "backend", "device", "dtype", "threads")


def _cfg(*overrides: str) -> RunConfig:
    return to_run_config(compose_config(list(overrides)))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _jax_gpu() -> bool:
    try:
        import jax

        return bool(jax.devices("gpu"))
    except Exception:
        return False


def _mlx_device() -> str | None:
    try:
        import mlx.core as mx
    except ImportError:
        return None
    return "gpu" if mx.metal.is_available() else "cpu"


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "trials").glob("*.json"))]


# ---------------------------------------------------------------------------------------------
# Configs and detection


def test_every_hardware_option_composes_and_has_its_own_config_hash() -> None:
    cfgs = {hw: _cfg(f"hardware={hw}") for hw in HARDWARE}
    expected = {"cpu": ("torch", "cpu"), "cuda": ("torch", "cuda"), "mps": ("torch", "mps"),
                "mlx": ("mlx", "auto"), "jax_cpu": ("jax", "cpu"), "jax_gpu": ("jax", "gpu")}
    for hw, cfg in cfgs.items():
        assert (cfg.hardware.name, cfg.hardware.backend.value, cfg.hardware.device) == (
            hw, *expected[hw])
    hashes = {config_hash(c) for c in cfgs.values()}
    assert len(hashes) == len(HARDWARE)
    base = config_hash(cfgs["cpu"])
    assert config_hash(_cfg("hardware=cpu", "hardware.threads=7")) == base  # not in the hash
    for key, value in (("backend", "jax"), ("device", "cuda:1"), ("dtype", "bfloat16")):
        assert config_hash(_cfg("hardware=cpu", f"hardware.{key}={value}")) != base, key


def test_setup_hardware_detects_each_backend_or_refuses_with_one_line() -> None:
    cpu = setup_hardware(_cfg("hardware=cpu", "hardware.threads=1").hardware)
    assert cpu.as_row() == {"hardware": "cpu", "backend": "torch", "device": "cpu",
                            "dtype": "float32", "threads": 1}
    for hw, present, message in (
            ("cuda", _cuda(), "hardware=cuda: no CUDA device on this machine"),
            ("jax_gpu", _jax_gpu(), "hardware=jax_gpu: JAX has no gpu device on this machine")):
        if present:
            assert setup_hardware(_cfg(f"hardware={hw}").hardware).name == hw
        else:
            with pytest.raises(HardwareUnavailable) as err:
                setup_hardware(_cfg(f"hardware={hw}").hardware)
            assert str(err.value) == message
    if not _cuda():  # a device set apart from its group is named as such
        with pytest.raises(HardwareUnavailable) as err:
            setup_hardware(_cfg("hardware=cpu", "hardware.device=cuda:0").hardware)
        assert str(err.value) == "hardware.device=cuda:0: no CUDA device on this machine"
    jax_cpu = setup_hardware(_cfg("hardware=jax_cpu").hardware)
    assert (jax_cpu.backend, jax_cpu.device, jax_cpu.torch_device) == ("jax", "cpu", "cpu")
    with pytest.raises(HardwareUnavailable, match="task=model_info runs on backend torch only"):
        setup_hardware(_cfg("hardware=jax_cpu").hardware, backends=("torch",),
                       task="model_info")


def test_mlx_records_the_device_that_runs() -> None:
    mx = pytest.importorskip("mlx.core")
    hw = setup_hardware(_cfg("hardware=mlx").hardware)
    assert hw.device == ("gpu" if mx.metal.is_available() else "cpu")
    assert hw.torch_device == "cpu" and hw.threads >= 1
    if not mx.metal.is_available():
        with pytest.raises(HardwareUnavailable, match="no Metal GPU for MLX"):
            setup_hardware(_cfg("hardware=mlx", "hardware.device=gpu").hardware)


# ---------------------------------------------------------------------------------------------
# Outside a sweep: one line, exit 2; inside: SKIPPED rows, the sweep goes on


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("task", ["train", "claims"])
def test_absent_hardware_outside_a_sweep_is_one_line_and_exit_2(tmp_path: Path, task) -> None:
    out = _run([f"task={task}", "hardware=cuda", "claims=[derived_beats_sgd]", *TINY,
                f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}"])
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: hardware=cuda: no CUDA device on this machine"]
    assert not (tmp_path / "results" / "trials").exists()  # nothing written


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA device")
def test_train_sweep_writes_skipped_rows_for_absent_hardware(tmp_path: Path) -> None:
    """cpu trains; cuda is absent; jax_cpu and mlx are present but cannot run a torch-only
    baseline."""
    mlx = _mlx_device()
    hardware = ["cpu", "cuda", "jax_cpu", *(["mlx"] if mlx else [])]
    results = tmp_path / "results"
    out = _run(["-m", "task=train", "trainer=sgd", f"hardware={','.join(hardware)}", *TINY,
                f"results_dir={results}", f"runs_dir={tmp_path / 'runs'}",
                f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["hardware"]: r for r in _rows(results)}
    assert sorted(rows) == sorted(hardware)
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["metrics"]["tokens"] > 0
    assert rows["cuda"]["status"] == "skipped"
    assert rows["cuda"]["skip_reason"] == (
        "HardwareUnavailable: hardware=cuda: no CUDA device on this machine")
    assert rows["jax_cpu"]["status"] == "skipped"
    assert "trainer=sgd runs on torch only" in rows["jax_cpu"]["skip_reason"]
    for r in rows.values():
        assert all(r.get(k) is not None for k in ROW_HARDWARE_KEYS), r["hardware"]
    assert (rows["cuda"]["backend"], rows["cuda"]["device"]) == ("torch", "cuda")
    assert (rows["jax_cpu"]["backend"], rows["jax_cpu"]["device"]) == ("jax", "cpu")
    if mlx:
        assert rows["mlx"]["status"] == "skipped"
        assert (rows["mlx"]["backend"], rows["mlx"]["device"]) == ("mlx", mlx)  # not "auto"
    assert len({r["config_hash"] for r in rows.values()}) == len(hardware)


@pytest.mark.skipif(_cuda() or _jax_gpu(), reason="this machine has a GPU")
def _registered(results: Path, claim_id: str):
    """The rule a claims job registered for `claim_id` (with the experiment's setting)."""
    from runner.claims.schema import claim_from_record

    (path,) = (results / "rules").glob(f"{claim_id}-*.json")
    return claim_from_record(json.loads(path.read_text()), str(path))


def test_claims_sweep_skips_every_planned_trial_on_absent_hardware(tmp_path: Path) -> None:
    from runner.claims import VerdictWord, decide_on

    results = tmp_path / "results"
    claim_ids = ["derived_beats_sgd", "procrustes_cka_in_sample"]
    out = _run(["-m", "task=claims", "allow_dirty=true", f"claims=[{','.join(claim_ids)}]",
                "hardware=cuda,jax_gpu", *TINY, f"results_dir={results}",
                f"runs_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    claims = [_registered(results, c) for c in claim_ids]  # rules carry the setting
    planned = sum(c.trials * max(len(c.arms), 1) for c in claims)
    rows = _rows(results)
    for hw in ("cuda", "jax_gpu"):
        mine = [r for r in rows if r["hardware"] == hw]
        assert len(mine) == planned and all(r["status"] == "skipped" for r in mine)
        assert all(r["skip_reason"].startswith(f"HardwareUnavailable: hardware={hw}: ")
                   for r in mine)
        assert all(r.get(k) is not None for r in mine for k in ROW_HARDWARE_KEYS)
        assert decide_on(claims[0], rows, hw).verdict is VerdictWord.SKIPPED
    assert decide_on(claims[1], rows, "cuda").verdict is VerdictWord.SKIPPED  # checks too


# ---------------------------------------------------------------------------------------------
# Claims on several hardware: trials are never shared, verdicts are per hardware


def test_claim_trials_are_not_reused_across_hardware(tmp_path: Path, capsys) -> None:
    from test_claims import COUNTER, write_claim

    from runner.claims import VerdictWord, decide_all
    from runner.ledger import read_trials
    from runner.tasks.claims import run_claims

    write_claim(tmp_path, {**COUNTER, "trials": 2})
    ledger = ["allow_dirty=true", f"results_dir={tmp_path / 'results'}",
              f"runs_dir={tmp_path / 'runs'}"]
    (on_cpu,) = run_claims(_cfg(*TINY, *ledger), ["n"], claim_dir=tmp_path)
    assert on_cpu.verdict is not VerdictWord.SKIPPED and on_cpu.n == 2
    (on_jax,) = run_claims(_cfg(*TINY, *ledger, "hardware=jax_cpu"), ["n"], claim_dir=tmp_path)
    out = capsys.readouterr().out
    assert "reused" not in out and "shared" not in out
    assert on_jax.verdict is VerdictWord.SKIPPED and on_jax.hardware == "jax_cpu"
    rows = read_trials(tmp_path / "results")
    assert sorted(r["hardware"] for r in rows) == ["cpu", "cpu", "jax_cpu", "jax_cpu"]
    verdicts = decide_all(_registered(tmp_path / "results", "n"), rows)
    assert [(v.hardware, v.verdict) for v in verdicts] == [
        ("cpu", on_cpu.verdict), ("jax_cpu", VerdictWord.SKIPPED)]
    assert set(verdicts[0].trial_ids).isdisjoint(verdicts[1].trial_ids)


def _two_hardware_ledger(tmp_path: Path, mlx_value: float | None) -> tuple[Path, Path]:
    """Paired claim p: on cpu the subject clearly wins; on mlx it clearly loses (or no mlx)."""
    from test_claims import BASE, PAIRED, paired_rows, write_claim

    from runner.claims import load_claim
    from runner.ledger import write_trial
    from runner.tasks.claims import register_rule

    claim_dir, results = tmp_path / "claims", tmp_path / "results"
    claim_dir.mkdir()
    c = load_claim(write_claim(claim_dir, PAIRED))
    register_rule(results, c)
    rows = [{**r, "hardware": "cpu"} for r in paired_rows(c, [b - 0.2 for b in BASE], BASE)]
    if mlx_value is not None:
        rows += [{**r, "hardware": "mlx"}
                 for r in paired_rows(c, [b + mlx_value for b in BASE], BASE)]
    for r in rows:
        write_trial(results, r)
    return results, claim_dir


def test_claims_page_shows_verdicts_per_hardware_where_they_differ(tmp_path: Path) -> None:
    from runner.report import build_claims

    results, claim_dir = _two_hardware_ledger(tmp_path, mlx_value=0.2)
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    build_claims(results, docs, readme, claim_dir=claim_dir)
    page = (docs / "claims.md").read_text()
    assert "| claim | experiment | hardware | verdict |" in page
    assert "| [p](#p) | unit | cpu | **VALIDATED** |" in page
    assert "| [p](#p) | unit | mlx | **DISPROVEN** |" in page
    assert "## Verdicts by hardware" in page
    assert "| claim | experiment | cpu | mlx | agree |" in page
    assert "| [p](#p) | unit | **VALIDATED** | **DISPROVEN** | **no** |" in page
    assert "**VALIDATED** in `unit` on `cpu`" in page
    assert "| unit | cpu | **VALIDATED** |" in readme.read_text()
    experiment = (docs / "experiments" / "unit.md").read_text()
    assert "| a @ cpu |" in experiment and "| b @ mlx |" in experiment


def test_single_hardware_claims_page_has_no_hardware_columns(tmp_path: Path) -> None:
    from runner.report import build_claims

    results, claim_dir = _two_hardware_ledger(tmp_path, mlx_value=None)
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    build_claims(results, docs, readme, tmp_path / "claims.json", claim_dir=claim_dir)
    page = (docs / "claims.md").read_text()
    assert "| claim | experiment | verdict |" in page and "hardware |" not in page
    assert "## Verdicts by hardware" not in page and " on `cpu`" not in page
    assert "| [p](#p) | unit | **VALIDATED** |" in page
    (entry,) = json.loads((tmp_path / "claims.json").read_text())
    assert entry["verdict"]["verdict"] == "VALIDATED" and "hardware" not in entry["verdict"]


def test_quickstart_sweep_over_present_backends_gives_one_verdict_per_hardware(
        tmp_path: Path) -> None:
    """`-m +experiment=quickstart hardware=cpu,mlx,jax_cpu` (two claims, small budget): the
    derived arm trains on every backend, the SGD arm only on torch; docs/claims.md decides each
    claim per hardware and says where the verdicts differ."""
    from runner.report import build_all

    results = tmp_path / "results"
    proc = _run(["-m", "+experiment=quickstart", "allow_dirty=true", "hardware=cpu,mlx,jax_cpu",
                 "claims=[derived_beats_sgd,mass_within_weyl_bound]", "data.max_examples=120",
                 "claim_overrides.trials=3", "claim_overrides.budget.max_tokens=400",
                 "claim_overrides.budget.eval_every=4", "budget.eval_examples=8",
                 f"results_dir={results}", f"runs_dir={tmp_path / 'runs'}",
                 f"hydra.sweep.dir={tmp_path / 'multirun'}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(results)
    trained = {(r["hardware"], r["arm"]) for r in rows if r["status"] == "ok"}
    skipped = {(r["hardware"], r["arm"]) for r in rows if r["status"] == "skipped"}
    assert {("cpu", "derived"), ("mlx", "derived"), ("jax_cpu", "derived"),
            ("cpu", "sgd")} <= trained
    assert skipped == {("mlx", "sgd"), ("jax_cpu", "sgd")}  # the baseline is torch code
    assert all(r["backend"] == {"cpu": "torch", "mlx": "mlx", "jax_cpu": "jax"}[r["hardware"]]
               for r in rows)
    build_all(results, tmp_path / "docs", tmp_path / "README.md")
    page = (tmp_path / "docs" / "claims.md").read_text()
    assert "## Verdicts by hardware" in page and "| claim | experiment | cpu | jax_cpu | mlx |" \
        in page
    by_hw = {}
    for line in page.split("## Verdicts by hardware")[1].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| [") and len(cells) == 6:
            by_hw[cells[0].split("]")[0][1:]] = cells[2:]  # cpu, jax_cpu, mlx, agree
    sgd, weyl = by_hw["derived_beats_sgd"], by_hw["mass_within_weyl_bound"]
    assert sgd[0] != "**SKIPPED**" and sgd[1:3] == ["**SKIPPED**", "**SKIPPED**"]
    assert sgd[3] == "–"  # decided on one hardware only: nothing to compare
    assert "SKIPPED" not in " ".join(weyl[:3]) and weyl[3] in ("yes", "**no**")
