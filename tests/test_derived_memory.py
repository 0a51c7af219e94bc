"""The derived trainer's memory on torch: what its passes hold and release (the set-up's
noise-scale probe, the training step's backward, the update)."""

from __future__ import annotations

import weakref

import pytest
import torch
from support import compose_config

from runner.config.load import to_run_config
from runner.data import collate, load_splits
from runner.derived import torch_ops
from runner.derived.spec import AdapterSpec
from runner.derived.step import reading
from runner.derived.torch_ops import (
    LOSS_CHUNK_ROWS,
    TorchOps,
    candidate_linears,
    per_example_s_grads,
)
from runner.models.loading import load_model
from runner.tasks.train import resolve_data_path


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _tiny():
    """(TorchOps with adapters attached at S = 0, a batch of 4 training examples)."""
    cfg = to_run_config(compose_config(["model=tiny_llama", "data.max_examples=40"]))
    loaded = load_model(cfg.model)
    splits = load_splits(resolve_data_path(cfg.data.path), loaded.tokenizer,
                         max_seq_len=cfg.data.max_seq_len, val_fraction=cfg.data.val_fraction,
                         retention_path=None, max_examples=cfg.data.max_examples)
    ops = TorchOps(loaded.model)
    specs = {name: AdapterSpec(name=name, rank=3, dropout=0.1, sigma_k=1.0, decay=0.1,
                               first_index=1, scale=0.5)
             for name in candidate_linears(loaded.model)}
    ops.attach(specs, "random", seed=0, rule=reading("derived"))
    return ops, collate(list(splits.train[:4]), pad_id=loaded.tokenizer.pad_token_id)


def _watch_backward(ops):
    """(what the backward saw, the hook handles): whether any of the output layer's logits were
    still alive, whether the first adapter's U and V required gradients when the gradient of
    the first adapter's S was computed, and the most token rows the output layer took at once."""
    seen, logits = {"head_rows": 0}, []
    _, u, s, v = next(ops.adapters.triples())

    def keep_ref(module, args, output):
        logits.append(weakref.ref(output))
        seen["head_rows"] = max(seen["head_rows"], output.reshape(-1, output.shape[-1]).shape[0])

    def at_backward(grad):
        seen.update(logits_alive=any(ref() is not None for ref in logits),
                    frames_need_grad=u.requires_grad or v.requires_grad)
        return grad

    return seen, [ops.model.get_output_embeddings().register_forward_hook(keep_ref),
                  s.register_hook(at_backward)]


def test_noise_probe_frees_logits_and_keeps_no_frame_gradients(tiny) -> None:
    """The probe's backward runs without the (b, T, vocab) logits and without U, V
    gradients (at S = 0 they are zero and unused); U and V require gradients again after."""
    ops, batch = tiny
    seen, handles = _watch_backward(ops)
    try:
        grads, _ = per_example_s_grads(ops.model, ops.adapters, batch)
    finally:
        for h in handles:
            h.remove()
    assert seen == {"logits_alive": False, "frames_need_grad": False,
                    "head_rows": LOSS_CHUNK_ROWS}
    assert grads.shape[0] == 4 and grads.abs().max() > 0
    assert all(u.requires_grad and v.requires_grad and u.grad is None and v.grad is None
               for _, u, _, v in ops.adapters.triples())


def test_training_backward_runs_without_the_logits(tiny) -> None:
    ops, batch = tiny
    seen, handles = _watch_backward(ops)
    try:
        loss, grads = ops.forward_backward(batch, 2, 4, step=0)
    finally:
        for h in handles:
            h.remove()
    assert seen == {"logits_alive": False, "frames_need_grad": True,
                    "head_rows": LOSS_CHUNK_ROWS}
    assert loss > 0 and len(grads) == len(ops.params())


def test_update_holds_the_direction_only_when_asked(tiny) -> None:
    """The step's direction is the size of the adapters: only the certificate reads it."""
    ops, batch = tiny
    rule = reading("derived")
    before = {n: u.detach().clone() for n, u, _, _ in ops.adapters.triples()}
    ops.forward_backward(batch, 4, 4, step=0)
    direction, orth, _, telemetry = ops.update(None, 1e-3, rule, keep_direction=False)
    assert direction is None and orth < 1e-5 and len(telemetry) == len(before)
    ops.forward_backward(batch, 4, 4, step=1)
    frames = {n: (u.detach().clone(), s.detach().clone(), v.detach().clone())
              for n, u, s, v in ops.adapters.triples()}
    direction, *_ = ops.update(None, 1e-3, rule, keep_direction=True)
    assert set(direction) == set(before)
    for name, *now in ops.adapters.triples():  # the kept direction is the step taken
        for x, x0, dx in zip(now, frames[name], direction[name], strict=True):
            torch.testing.assert_close(x0 + dx, x.detach(), rtol=0, atol=1e-6)
    assert any(dx.abs().max() > 0 for d in direction.values() for dx in d)


@pytest.mark.parametrize("probe", [False, True])
def test_chunked_answer_loss_is_the_whole_logits_loss(monkeypatch, probe: bool) -> None:
    """The output layer taken LOSS_CHUNK_ROWS token rows at a time gives the loss and every
    adapter gradient of the whole-logits path (up to float rounding), for the training
    step's weight (1 / answer tokens) and the probe's (1 / each example's answer tokens)."""
    ops, batch = _tiny()  # (fresh: the probe needs S = 0)
    monkeypatch.setattr(torch_ops, "LOSS_CHUNK_ROWS", 100)  # several chunks, the last partial
    assert batch.input_ids.numel() > 200 and batch.input_ids.numel() % 100

    def run():
        if probe:
            return per_example_s_grads(ops.model, ops.adapters, batch)[0], None
        loss, grads = ops.forward_backward(batch, 4, 4, step=0)
        return loss, [g.clone() for g in grads]

    ops.adapters.eval()  # no dropout: the two paths see the same inputs
    chunked = run()
    monkeypatch.setattr(torch_ops, "PLAIN_HEAD_MODELS", frozenset())
    whole = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-7)
    if not probe:
        for a, b in zip(chunked[1], whole[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
