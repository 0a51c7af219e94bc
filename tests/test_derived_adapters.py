"""trainer=derived end to end on tiny Llama and LFM2: the exported PEFT adapter is the trained
U diag(S) V^T (PEFT as the oracle), merged == unmerged, S = 0 leaves the model unchanged,
U and V stay orthonormal, and a learning rate is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import ROOT, compose_config, logits_of, probe_ids

from runner.app import run_job
from runner.config.load import to_run_config
from runner.data import load_splits
from runner.derived import run as derived_task
from runner.derived.spec import AdapterSpec
from runner.derived.torch_ops import FactoredAdapters, candidate_linears
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path
from runner.training.loop import evaluate_loss

# One thread: on a shared CPU, torch's thread pool spinning against other processes makes
# these tiny runs many times slower.
FAST = ["+experiment=quickstart", "task=train", "hardware.threads=1", "trainer=derived",
        "budget.max_tokens=800", "budget.eval_every=4", "budget.eval_examples=8",
        "data.max_examples=60"]





@pytest.fixture(scope="module", params=["tiny_llama", "tiny_lfm2"])
def derived_run(request, tmp_path_factory):
    """One short derived run per model; the trainer's own (hooked) model is probed just before
    export, so PEFT's reload can be compared with what was trained."""
    tmp = tmp_path_factory.mktemp(f"derived-{request.param}")
    overrides = [*FAST, f"model={request.param}"]
    own: dict[str, torch.Tensor] = {}
    export_peft = derived_task.export_peft

    def probe_then_export(base_model, trainer, derived):
        trainer.eval_mode()
        own["logits"] = logits_of(base_model, probe_ids(base_model))
        own["s_max"] = max(float(s.detach().max()) for _, _, s, _ in trainer.adapters.triples())
        return export_peft(base_model, trainer, derived)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(derived_task, "export_peft", probe_then_export)
        row = run_job(compose_config([*overrides, f"results_dir={tmp}/results",
                                      f"runs_dir={tmp}/runs"]))
    return overrides, row, own


def test_certificate_recorded_where_training_ends(tmp_path) -> None:
    """No evaluation falls inside this run (eval_every beyond its steps): the trial still
    records the certificate of the weights it ends with, and its stop reason stays budget."""
    row = run_job(compose_config([*FAST, "model=tiny_llama", "budget.eval_every=10000",
                                  f"results_dir={tmp_path}/results", f"runs_dir={tmp_path}/runs"]))
    assert row["stop_reason"] == "budget"
    cert = row["certificate"]
    assert cert is not None and cert["step"] == row["metrics"]["steps"] > 0
    assert {c["name"] for c in cert["criteria"]} >= {
        "gradient_stationarity", "predicted_improvement", "generation_drift", "validation_stability"}


def _fresh_base(overrides: list[str]):
    return load_model(to_run_config(compose_config(overrides)).model)


def test_peft_reload_gives_the_trainers_logits(derived_run) -> None:
    from peft import PeftModel

    overrides, row, own = derived_run
    assert own["s_max"] > 0  # the adapter moved: the comparison is not between two base models
    base = _fresh_base(overrides).model
    reloaded = PeftModel.from_pretrained(base, row["adapter_path"]).eval()
    # Same float32 products in another order: hooks add c ((x V) * S) U^T, PEFT adds B (A x)
    # with B = c U diag(S) precomputed.
    torch.testing.assert_close(logits_of(reloaded, probe_ids(base)), own["logits"],
                               atol=1e-5, rtol=0)
    assert row["metrics"]["adapter_reload_max_abs_diff"] <= 1e-5


def test_merged_and_unmerged_agree(derived_run) -> None:
    from peft import PeftModel

    overrides, row, _ = derived_run
    base = _fresh_base(overrides).model
    reloaded = PeftModel.from_pretrained(base, row["adapter_path"]).eval()
    ids = probe_ids(base)
    unmerged = logits_of(reloaded, ids)
    merged = logits_of(reloaded.merge_and_unload(), ids)
    # Merging rounds W + B A to float32 once, then one matmul replaces two; the difference is
    # float32 rounding accumulated over the blocks and the vocabulary projection.
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)


def test_model_unchanged_at_step_zero(derived_run) -> None:
    """S starts at 0, so the first evaluation (adapters attached) is the base model's, exactly."""
    overrides, row, _ = derived_run
    loaded = _fresh_base(overrides)
    cfg = to_run_config(compose_config(overrides))
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    base_val = evaluate_loss(loaded.model, splits.val[:cfg.budget.eval_examples],
                             cfg.budget.eval_batch_size, loaded.tokenizer.pad_token_id)
    assert row["metrics"]["val_loss_initial"] == base_val  # the hooks add exact zeros


def test_zero_s_adapters_leave_logits_bitwise_equal() -> None:
    loaded = _fresh_base(["model=tiny_lfm2"])
    model, ids = loaded.model, probe_ids(loaded.model)
    before = logits_of(model, ids)
    linears = candidate_linears(model)
    specs = {name: AdapterSpec(name=name, rank=2, dropout=0.1, sigma_k=1.0, decay=0.1,
                               first_index=0, scale=1.0) for name in linears}
    adapters = FactoredAdapters(linears, specs, "tail", seed=0)
    adapters.train()  # dropout on: x is perturbed, the zero update still adds nothing
    assert torch.equal(logits_of(model, ids), before)
    adapters.remove()


def test_frames_stay_orthonormal(derived_run) -> None:
    _, row, _ = derived_run
    assert row["metrics"]["max_orth_error"] < 1e-5  # float32 rounding of the Cayley retraction
    assert row["metrics"]["max_orth_error"] > 0  # it was measured
    # the set-up's timings: the weights' derivation is part of the whole set-up
    assert 0 < row["metrics"]["derive_seconds"] <= row["metrics"]["setup_seconds"]
    # Independently, from the exported file: A = V^T has orthonormal rows.
    tensors = load_file(Path(row["adapter_path"]) / "adapter_model.safetensors")
    for name, a in tensors.items():
        if "lora_A" in name:
            eye = torch.eye(a.shape[0], dtype=torch.float64)
            gram = a.double() @ a.double().T
            assert float((gram - eye).abs().max()) < 1e-5, name  # float32 frames


def test_derived_refuses_a_learning_rate() -> None:
    proc = subprocess.run([sys.executable, "-m", "runner", "+experiment=quickstart",
                           "trainer=derived", "trainer.lr=1e-3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.lr" in lines[0], proc.stderr


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_lfm2"])
def test_batched_noise_probe_matches_per_example_passes(model_name: str) -> None:
    """The noise-scale probe's per-example gradients from batched passes (the closed form at
    S = 0) equal autograd's gradients of one pass per example, the estimator's definition."""
    from runner.data import collate
    from runner.derived.torch_ops import per_example_s_grads

    cfg = to_run_config(compose_config([f"model={model_name}", "data.max_examples=40"]))
    loaded = load_model(cfg.model)
    model = loaded.model.requires_grad_(False)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    examples, pad = splits.train[:6], loaded.tokenizer.pad_token_id
    linears = candidate_linears(model)
    specs = {name: AdapterSpec(name=name, rank=3, dropout=0.0, sigma_k=1.0, decay=0.1,
                               first_index=1, scale=0.5 + 0.1 * i)
             for i, name in enumerate(linears)}
    adapters = FactoredAdapters(linears, specs, "random", seed=0)
    model.train()
    batched, _ = per_example_s_grads(model, adapters, collate(list(examples), pad_id=pad))

    reference = []
    for ex in examples:  # one backward of the example's mean answer-token loss (HF's loss)
        batch = collate([ex], pad_id=pad)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              labels=batch.labels).loss.backward()
        for _, u, _, v in adapters.triples():  # S = 0: U and V get exactly zero gradient
            assert not u.grad.any() and not v.grad.any()
        reference.append(torch.cat([s.grad.double() for _, _, s, _ in adapters.triples()]))
        adapters.zero_grad(set_to_none=True)
    reference = torch.stack(reference)
    assert batched.shape == reference.shape and reference.abs().max() > 0
    # float32 forward passes of a padded batch and of single rows round differently
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6 * reference.abs().max())
    adapters.remove()


@pytest.mark.parametrize("p", [1e-4, 0.05, 0.23])
def test_dropout_mask_drops_at_the_realized_rate(p: float) -> None:
    from runner.derived.torch_dropout import DROPOUT_LEVELS, dropout_threshold, keep_mask

    threshold, realized = dropout_threshold(p)
    assert abs(realized - p) <= 0.5 / DROPOUT_LEVELS
    torch.manual_seed(0)
    x = torch.empty(7, 301, 997)  # an element count that is not a multiple of 3
    drops = sum(int((~keep_mask(x, threshold)).sum()) for _ in range(5))
    n = 5 * x.numel()
    # tolerance: 5 binomial standard deviations
    assert abs(drops / n - realized) <= 5 * (realized * (1 - realized) / n) ** 0.5


@pytest.mark.parametrize("v_grad", [True, False])
def test_masked_projection_is_autograds_masked_matmul_bitwise(v_grad: bool) -> None:
    """The dense dropout projection saves x and the mask instead of the masked copy; its
    values and gradients are bitwise those of autograd through (x * keep) @ v."""
    from runner.derived.torch_dropout import _MaskedProjection

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 128, 576, generator=gen)
    v0 = torch.randn(576, 24, generator=gen)
    keep = torch.rand(4, 128, 576, generator=gen) > 0.1
    grad = torch.randn(4, 128, 24, generator=gen)
    ours = (x0.clone().requires_grad_(), v0.clone().requires_grad_(v_grad))
    ref = (x0.clone().requires_grad_(), v0.clone().requires_grad_(v_grad))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        a = _MaskedProjection.apply(ours[0], keep, ours[1])
    # x is kept for dV only (a frozen V: the probe), never a masked float copy
    assert [t.dtype for t in saved if t.shape == x0.shape] == ([torch.float32] * v_grad
                                                               + [torch.bool])
    b = (ref[0] * keep.to(ref[0].dtype)) @ ref[1]
    assert torch.equal(a, b)
    a.backward(grad)
    b.backward(grad)
    assert torch.equal(ours[0].grad, ref[0].grad)
    assert (ours[1].grad is None) == (not v_grad)
    if v_grad:
        assert torch.equal(ours[1].grad, ref[1].grad)


@pytest.mark.parametrize("p", [1e-4, 0.01, 0.3])
def test_dropped_positions_are_a_bernoulli_process(p: float) -> None:
    from runner.derived.torch_dropout import dropped_positions

    torch.manual_seed(0)
    n, trials = 200_003, 20
    draws = [dropped_positions(n, p) for _ in range(trials)]
    for pos in draws:
        assert pos.dtype == torch.int64
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or 0 <= int(pos[0]) <= int(pos[-1]) < n)
    count = sum(d.numel() for d in draws)
    # tolerance: 5 binomial standard deviations on the total count, and on the first half
    sd = (trials * n * p * (1 - p)) ** 0.5
    assert abs(count - trials * n * p) <= 5 * sd
    first_half = sum(int((d < n // 2).sum()) for d in draws)
    assert abs(first_half - count / 2) <= 5 * (count / 4) ** 0.5
    assert dropped_positions(n, 0.0).numel() == 0


def test_sparse_dropout_projection_matches_the_dense_mask() -> None:
    from runner.derived.torch_dropout import _DroppedProjection

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    keep = torch.rand(37, 11, generator=gen) > 0.3
    rows, cols = (~keep).nonzero(as_tuple=True)
    g = torch.randn(37, 5, dtype=torch.float64, generator=gen)
    sparse = _DroppedProjection.apply(x, v, rows, cols)
    sparse.backward(g)
    dx, dv = x.grad.clone(), v.grad.clone()
    x.grad = v.grad = None
    dense = (x * keep) @ v
    dense.backward(g)
    # tolerance: float64 rounding of a 11-term sum and its corrections
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(dx, x.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(dv, v.grad, rtol=0, atol=1e-12)
