"""trainer=derived on the MLX and JAX backends (runner/backends/derived_backend.py) against the
torch derived trainer (runner/tasks/derived.py, runner/trainers/derived.py), and the MLX
array-namespace adapter that lets geometry/ run on mlx arrays (geometry/_mlx.py).

Parity, in float32 on tiny random models:
(a) every derived hyperparameter computed from backend arrays equals torch's to relative 1e-4;
(b) the first 10 training losses of a derived run equal the torch run's on the same batches.

Dropout in (b): the derived adapter dropout draws its masks from each framework's own PRNG, so
no two backends can share them; (b) therefore sets every adapter's dropout to 0 in both runs
(set-up, noise probe and steps), which makes each run a deterministic function of the same
weights and batches. The backend's dropout path is checked on its own
(``test_adapter_dropout_masks``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console
from support import ROOT, compose_config

from runner.config import to_run_config
from runner.data import batches, load_splits
from runner.models import load_model
from runner.tasks import derived as torch_derived
from runner.tasks.train import resolve_data_path

db = pytest.importorskip("runner.backends.derived_backend")

BACKENDS = ["mlx", "jax"]
MODELS = ["tiny_llama", "tiny_lfm2"]
_IMPORT = {"jax": "jax", "mlx": "mlx.core"}
QUIET = Console(stderr=True, quiet=True)

# (a) Derived values: relative 1e-4. MLX spectra are float64 (CPU stream), as torch's, and differ
# only by the float32 Gram product; JAX runs without x64, so its eigvalsh is float32: singular
# value s_i then carries an absolute error ~ eps32 * s_1^2 / s_i, far below 1e-4 * s_i for the
# values the rules read (s_1, s_k at the effective rank, the entropy-weighted spectrum).
DERIVED_RTOL = 1e-4
# (b) Losses: step t's loss depends on t-1 updates, each computed from float32 gradients that
# torch and the backend accumulate in different orders (~1e-6 relative per gradient), and the
# update feeds the next loss; so the allowed gap grows linearly with the step: 1e-5 * t on an
# O(5) loss (the measured gaps are below 2e-6; see the test).
LOSS_ATOL_PER_STEP = 1e-5
STEPS = 10


def _needs(backend: str) -> None:
    pytest.importorskip(_IMPORT[backend])


@functools.cache
def _fixture(model_name: str):
    """(cfg, loaded, splits, pad_id) of a small derived run on the quickstart data."""
    cfg = to_run_config(compose_config([
        "+experiment=quickstart", "task=train", "trainer=derived", f"model={model_name}",
        "data.max_examples=60", "hardware.threads=1"]))
    loaded = load_model(cfg.model)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    return cfg, loaded, splits, loaded.tokenizer.pad_token_id


def _no_dropout(specs: dict) -> dict:
    return {n: dataclasses.replace(s, dropout=0.0) for n, s in specs.items()}


@functools.cache
def _torch_run(model_name: str, dropout: bool, steps: int = STEPS):
    """The torch derived set-up, and the losses of its first ``steps`` steps (a fresh model)."""
    cfg, _, splits, pad = _fixture(model_name)
    loaded = load_model(cfg.model)  # the set-up hooks adapters onto the model: use a fresh one
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        if not dropout:
            specs = torch_derived._adapter_specs
            mp.setattr(torch_derived, "_adapter_specs", lambda d, s: _no_dropout(specs(d, s)))
        setup = torch_derived.setup_derived(cfg, loaded, splits, pad, QUIET)
    losses = [setup.trainer.step(b).loss for b in _batches(splits, setup.trainer.batch_size,
                                                            cfg.seed, pad, steps)]
    setup.trainer.adapters.remove()
    return setup, losses


def _backend_setup(backend: str, model_name: str, dropout: bool):
    cfg, loaded, splits, pad = _fixture(model_name)
    ops = db.make_ops(backend, loaded.model)
    with pytest.MonkeyPatch.context() as mp:
        if not dropout:
            attach = db.attach

            def attach_without_dropout(*args, **kwargs):
                adapters = attach(*args, **kwargs)
                adapters.specs = _no_dropout(adapters.specs)
                return adapters

            mp.setattr(db, "attach", attach_without_dropout)
        return db.setup_backend_derived(cfg, ops, splits, pad)


def _batches(splits, batch_size: int, seed: int, pad: int, steps: int = STEPS):
    """The first ``steps`` batches of the training loop's order (epochs by (seed, epoch))."""
    out, epoch = [], 0
    while len(out) < steps:
        out += list(batches(splits.train, batch_size, seed=seed, epoch=epoch, pad_id=pad))
        epoch += 1
    return out[:steps]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _numbers(value):
    """The numbers inside a record's value (scalars, tuples, tuples of tuples)."""
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _numbers(v)]
    return [value]


# ---------------------------------------------------------------------------------------------
# geometry/ on mlx arrays


def test_geometry_runs_on_mlx_arrays() -> None:
    """The derivation and step functions give numpy's numbers on mlx arrays (float64 spectra
    on MLX's CPU stream: agreement to ~1e-12; float32 step functions: to float32 rounding)."""
    mx = pytest.importorskip("mlx.core")
    import geometry
    from geometry._xp import namespace, work_dtype

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 32)).astype(np.float32) * np.linspace(2, 0.1, 32, dtype=np.float32)
    wm = mx.array(w)
    assert work_dtype(wm) == mx.float64
    assert type(namespace(wm)).__name__ == "MlxNamespace"
    np.testing.assert_allclose(np.array(geometry.gram_singular_values(wm)),
                               geometry.gram_singular_values(w), rtol=1e-10)
    np.testing.assert_allclose(np.array(geometry.singular_values(wm)),
                               geometry.singular_values(w), rtol=1e-10)
    s = geometry.gram_singular_values(w)
    sm = geometry.gram_singular_values(wm)
    for f in (geometry.effective_rank, geometry.stable_rank, geometry.spectral_decay):
        assert math.isclose(f(sm), f(s), rel_tol=1e-10)
    assert geometry.structural_rank(sm).k == geometry.structural_rank(s).k
    assert math.isclose(geometry.top_singular_value_power(wm), geometry.top_singular_value_power(w),
                        rel_tol=1e-10)

    a, b = geometry.analyze_layer("w", w), geometry.analyze_layer("w", wm)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, float):
            assert math.isclose(x, y, rel_tol=1e-5), field.name  # the Gram product is float32
        else:
            assert x == y, field.name

    x = np.linalg.qr(rng.standard_normal((40, 4)))[0].astype(np.float32)
    d = rng.standard_normal((40, 4)).astype(np.float32)
    y_np = geometry.cayley_retract(x, d, 0.1)
    y_mx = geometry.cayley_retract(mx.array(x), mx.array(d), 0.1)
    assert isinstance(y_mx, mx.array) and y_mx.dtype == mx.float32
    np.testing.assert_allclose(np.array(y_mx), y_np, atol=1e-6)
    assert geometry.orthogonality_error(y_mx) < 1e-5

    for loss, g in ((3.0, 2.0), (3.0, 200.0), (0.01, 0.5), (3.0, float("nan"))):
        ref = geometry.mass_step_size(loss, g, 0.1, 1.0, 1e-8)
        got = geometry.mass_step_size(mx.array(loss), mx.array(g), 0.1, 1.0, 1e-8)
        assert got.bound == ref.bound and math.isclose(float(got.step), ref.step, rel_tol=1e-6)


def test_geometry_does_not_import_mlx_for_other_arrays() -> None:
    pytest.importorskip("mlx.core")
    code = ("import sys, numpy as np, geometry\n"
            "geometry.analyze_layer('w', np.random.default_rng(0).standard_normal((8, 6)))\n"
            "assert 'mlx' not in sys.modules, 'mlx imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# (a) derived hyperparameters


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_derived_values_match_torch(backend: str, model_name: str) -> None:
    """Every per-layer value, the global sigma values, all 15 records (after calibration:
    residual scales, noise-scale batch size, MASS ceiling) from backend arrays equal torch's."""
    _needs(backend)
    ref, _ = _torch_run(model_name, dropout=False)
    got = _backend_setup(backend, model_name, dropout=False)
    worst = 0.0

    def same(a, b, what):
        nonlocal worst
        if isinstance(a, bool) or isinstance(a, (int, str)) or a is None:
            assert a == b, (what, a, b)
        else:
            worst = max(worst, _rel(float(a), float(b)))
            assert _rel(float(a), float(b)) <= DERIVED_RTOL, (what, a, b)

    assert [g.name for g in got.derived.layers] == [g.name for g in ref.derived.layers]
    for ga, gb in zip(ref.derived.layers, got.derived.layers):
        for field in dataclasses.fields(ga):
            if field.name == "gap":  # a difference of neighbours: relative to sigma_max
                assert abs(ga.gap - gb.gap) <= DERIVED_RTOL * ga.sigma_max, ga.name
                continue
            a, b = getattr(ga, field.name), getattr(gb, field.name)
            for i, (x, y) in enumerate(zip(_numbers(a), _numbers(b), strict=True)):
                same(x, y, f"{ga.name}.{field.name}[{i}]")
    same(ref.derived.sigma_k_min, got.derived.sigma_k_min, "sigma_k_min")
    same(ref.derived.sigma_max, got.derived.sigma_max, "sigma_max")
    assert sorted(ref.derived.records) == sorted(got.derived.records) == list(range(1, 16))
    for k, rec in ref.derived.records.items():
        other = got.derived.records[k]
        assert rec.name == other.name and rec.formula == other.formula, k
        for i, (x, y) in enumerate(zip(_numbers(rec.value), _numbers(other.value), strict=True)):
            same(x, y, f"record {k}[{i}]")
    assert got.trainer.batch_size == ref.trainer.batch_size
    assert _rel(got.noise.b_simple, ref.noise.b_simple) <= DERIVED_RTOL
    print(f"{backend} {model_name}: max relative difference of derived values {worst:.2e}")


# ---------------------------------------------------------------------------------------------
# (b) the first training losses


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_losses_match_torch(backend: str, model_name: str) -> None:
    _needs(backend)
    ref, ref_losses = _torch_run(model_name, dropout=False)
    got = _backend_setup(backend, model_name, dropout=False)
    cfg, _, splits, pad = _fixture(model_name)
    assert got.trainer.batch_size == ref.trainer.batch_size
    logs = [got.trainer.step(b) for b in _batches(splits, got.trainer.batch_size, cfg.seed, pad)]
    losses = [log.loss for log in logs]
    gaps = [abs(a - b) for a, b in zip(losses, ref_losses, strict=True)]
    print(f"{backend} {model_name}: |loss - torch| per step {[f'{g:.1e}' for g in gaps]}")
    for t, gap in enumerate(gaps, start=1):
        assert gap <= LOSS_ATOL_PER_STEP * t, (t, losses, ref_losses)
    # the run moved: S left 0 and the losses changed, so the comparison covers real updates
    assert max(float(np.array(s).max()) for s in got.trainer.adapters.S.values()) > 0
    assert len(set(np.round(losses, 6))) > 1
    # the torch trainer's telemetry keys
    assert set(logs[-1].extra) == {"grad_norm", "step_size", "bound", "update_norm",
                                   "weyl_bound", "orth_error", "adapter_norm_ratio"}
    assert max(log.extra["orth_error"] for log in logs) < 1e-4


# ---------------------------------------------------------------------------------------------
# the backend's own pieces


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_dropout_masks(backend: str) -> None:
    """Inverted dropout on the adapter input: kept entries are x / keep, the kept fraction is
    Bernoulli(keep) within 5 sigma, the same key gives the same mask, another key another."""
    _needs(backend)
    from runner.backends import get_backend

    be = get_backend(backend)
    keep, n = 0.75, 64 * 64
    if backend == "jax":
        import jax

        x = jax.numpy.full((64, 64), 2.0)
        key, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    else:
        import mlx.core as mx

        x = mx.full((64, 64), 2.0)
        key, other = mx.random.key(0), mx.random.key(1)
    c, xa = be._adapter_input(x, (0.5, keep, key))
    xa = np.array(xa)
    assert c == 0.5
    kept = np.unique(xa[xa != 0])  # one value, 2 / keep in x's dtype (float32, or float64
    assert kept.size == 1 and np.isclose(kept[0], 2.0 / keep, rtol=1e-6)  # when jax runs x64)
    frac = float((xa != 0).mean())
    assert abs(frac - keep) <= 5 * math.sqrt(keep * (1 - keep) / n)
    np.testing.assert_array_equal(np.array(be._adapter_input(x, (0.5, keep, key))[1]), xa)
    assert (np.array(be._adapter_input(x, (0.5, keep, other))[1]) != xa).any()
    assert be._adapter_input(x, 0.5)[1] is x


@pytest.mark.parametrize("backend", BACKENDS)
def test_baseline_trainer_on_backend_is_unavailable(backend: str) -> None:
    from runner.errors import HardwareUnavailable
    from runner.tasks.train import run_trainer

    cfg = to_run_config(compose_config(["task=train", "trainer=sgd", f"hardware.backend={backend}"]))
    with pytest.raises(HardwareUnavailable, match="trainer=sgd runs on torch only; hardware=cpu"):
        run_trainer(cfg, None, None, 0, QUIET)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_run_exports_a_peft_adapter(backend: str, tmp_path) -> None:
    """run_trainer with hardware.backend=<backend> trains with dropout on, stops on the token
    budget, and the saved PEFT adapter reloads to the backend's own adapted logits."""
    _needs(backend)
    from peft import PeftModel

    from runner.backends import get_backend
    from runner.tasks.train import run_trainer

    cfg = to_run_config(compose_config([
        "+experiment=quickstart", "task=train", "trainer=derived", "model=tiny_llama",
        "data.max_examples=60", "hardware.threads=1", f"hardware.backend={backend}",
        "budget.max_tokens=600", "budget.eval_every=4", "budget.eval_examples=8"]))
    _, _, splits, pad = _fixture("tiny_llama")
    loaded = load_model(cfg.model)
    captured = {}
    export = db.export_peft

    def capture(model, trainer, derived):
        captured["usv"] = {n: (np.array(trainer.adapters.U[n]), np.array(trainer.adapters.S[n]),
                               np.array(trainer.adapters.V[n]), trainer.adapters.specs[n].scale)
                           for n in trainer.adapters.specs}
        captured["dropout"] = max(s.dropout for s in trainer.adapters.specs.values())
        return export(model, trainer, derived)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(db, "export_peft", capture)
        outcome = run_trainer(cfg, loaded, splits, pad, QUIET)
    result = outcome.result
    assert captured["dropout"] > 0  # the derived dropout was applied in training
    assert result.stop_reason == "budget" and result.tokens >= 600
    assert [e.step for e in result.evals][:2] == [0, 4] and result.evals[-1].step == result.steps
    assert all(math.isfinite(e.val_loss) for e in result.evals)
    assert outcome.derived["derived"]["8"]["value"] == outcome.hyperparameters["batch_size"]
    assert max(float(u[1].max()) for u in captured["usv"].values()) > 0

    outcome.model.save_pretrained(tmp_path / "adapter")
    be = get_backend(backend)
    base = load_model(cfg.model).model
    params = be.params_from_torch(base.state_dict(), base.config)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = np.random.default_rng(0).integers(3, 256, size=(2, 20))
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.array(be.logits(params, ids, adapters=captured["usv"]))
    plain = np.array(be.logits(params, ids))
    assert np.abs(ours - plain).max() > 1e-4  # the adapters changed the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_train_task_on_mlx_writes_a_trial(tmp_path) -> None:
    """The whole task=train path (ledger row, PEFT save, PEFT reload check) with the MLX
    derived trainer; setup_hardware is replaced by one that accepts the mlx backend."""
    _needs("mlx")
    from runner.app import run_job
    from runner.hardware import HardwareInfo
    from runner.tasks import train as train_task

    def mlx_hardware(hcfg):
        return HardwareInfo(hcfg.name, "mlx", "cpu", "float32", 1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_task, "setup_hardware", mlx_hardware)
        row = run_job(compose_config([
            "+experiment=quickstart", "task=train", "trainer=derived", "hardware.threads=1",
            "hardware.backend=mlx", "budget.max_tokens=400", "budget.eval_every=4",
            "budget.eval_examples=8", "data.max_examples=60",
            f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]))
    assert row["backend"] == "mlx" and row["stop_reason"] == "budget"
    assert row["metrics"]["adapter_reload_max_abs_diff"] < 1e-4
    assert row["hyperparameters"]["backend"] == "mlx"
    assert {"grad_norm", "step_size", "bound", "orth_error"} <= set(row["curves"]["steps"][0])
    assert row["metrics"]["val_loss_final"] != row["metrics"]["val_loss_initial"]
