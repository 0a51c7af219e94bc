"""MLX implementation of Llama-family and LFM2 causal LMs with factored LoRA adapters.

Same contract as :mod:`runner.models.backends.jax_llama`: every adapted Linear computes
``y = x Wᵀ + b + c · ((x V) · S) Uᵀ`` (``U (out, r)``, ``S (r,)``, ``V (in, r)``, scalar ``c``).

API::

    params = params_from_torch(model.state_dict(), model.config)   # MlxParams, float32
    out = logits(params, input_ids, attention_mask=None, adapters=None)        # mx.array (B, T, V)
    loss = masked_cross_entropy(out, labels)                                  # HF shift, -100 ignored
    loss, grads = loss_and_grads(params, adapters, batch)   # grads[name] = (dU, dS, dV)

The model is written directly against ``mlx.core`` (no mlx-lm dependency) so the
adapter branch can sit on any Linear, including ``lm_head``.  Positions are
``arange(T)`` as in HF when no ``position_ids`` are given; fully masked attention
rows (left padding) produce a zero attention output, as torch SDPA does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._spec import (
    IGNORE_INDEX,
    ModelSpec,
    final_norm_key,
    lm_head_key,
    spec_from_config,
    split_adapters,
    state_dict_to_numpy,
)
from .mlx_blas import use_torch_blas

use_torch_blas()  # before MLX loads: its Linux CPU BLAS is the reference one (see mlx_blas)

import mlx.core as mx  # noqa: E402

__all__ = [
    "MlxParams",
    "params_from_torch",
    "logits",
    "masked_cross_entropy",
    "loss_and_grads",
    "default_labels",
]


class MlxParams:
    """Weights (dict of ``mx.array``, HF names) plus the static :class:`ModelSpec`."""

    def __init__(self, weights: dict[str, mx.array], spec: ModelSpec):
        self.weights = weights
        self.spec = spec

    def __getitem__(self, key: str) -> mx.array:
        return self.weights[key]

    def __repr__(self) -> str:
        return f"MlxParams({self.spec.arch}, {len(self.weights)} tensors)"


def params_from_torch(state_dict: Mapping[str, Any], config: Any) -> MlxParams:
    """Convert a HF ``LlamaForCausalLM``/``Lfm2ForCausalLM`` state dict (+ its config)."""
    spec = spec_from_config(config)
    w = {k: mx.array(v) for k, v in state_dict_to_numpy(state_dict, spec).items()}
    mx.eval(w)
    return MlxParams(w, spec)


# ----------------------------------------------------------------------------- building blocks


def _linear(w: Mapping[str, mx.array], name: str, x, usv, scales):
    y = x @ w[name + ".weight"].T
    b = w.get(name + ".bias")
    if b is not None:
        y = y + b
    if name in usv:
        u, s, v = usv[name]
        c, xa = _adapter_input(x, scales[name])
        y = y + c * (((xa @ v) * s) @ u.T)
    return y


def _adapter_input(x, scale):
    """``(c, x)``, or with adapter dropout ``scale = (c, keep, key)``: ``(c, mask * x / keep)``,
    mask ~ Bernoulli(keep) from the PRNG ``key`` (inverted dropout on the adapter branch's
    input only, as the torch derived trainer's hook does)."""
    if not isinstance(scale, tuple):
        return scale, x
    c, keep, key = scale
    mask = mx.random.bernoulli(keep, x.shape, key=key)
    return c, mx.where(mask, x / keep, mx.zeros_like(x))


def _rms_norm(x, weight, eps):
    var = mx.mean(x * x, axis=-1, keepdims=True)
    return weight * (x * mx.rsqrt(var + eps))


def _rope_cos_sin(spec: ModelSpec, position_ids):
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = position_ids.astype(mx.float32)[..., None] * mx.array(inv_freq.astype(np.float32))
    emb = mx.concatenate([freqs, freqs], axis=-1)  # (B|1, T, D)
    return mx.cos(emb), mx.sin(emb)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return mx.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):  # x (B, H, T, D); cos/sin (B|1, T, D)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def _attention(spec, w, prefix, x, cos, sin, mask, usv, scales, qk_norm: bool, o_name: str):
    B, T, _ = x.shape
    D, H, Hkv, G = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.kv_groups
    q = _linear(w, f"{prefix}.q_proj", x, usv, scales).reshape(B, T, H, D)
    k = _linear(w, f"{prefix}.k_proj", x, usv, scales).reshape(B, T, Hkv, D)
    v = _linear(w, f"{prefix}.v_proj", x, usv, scales).reshape(B, T, Hkv, D)
    if qk_norm:
        q = _rms_norm(q, w[f"{prefix}.q_layernorm.weight"], spec.norm_eps)
        k = _rms_norm(k, w[f"{prefix}.k_layernorm.weight"], spec.norm_eps)
    q = _apply_rope(q.transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, D)
    k = _apply_rope(k.transpose(0, 2, 1, 3), cos, sin)  # (B, Hkv, T, D)
    v = v.transpose(0, 2, 1, 3)
    q = q.reshape(B, Hkv, G, T, D)  # head h = kv * G + g (HF repeat_kv order)
    k, v = k[:, :, None], v[:, :, None]
    scores = (q * (D**-0.5)) @ k.swapaxes(-1, -2)  # (B, Hkv, G, T, T)
    m = mask[:, None, None]  # (B, 1, 1, T, T) bool
    scores = mx.where(m, scores, mx.array(np.finfo(np.float32).min, dtype=mx.float32))
    probs = mx.softmax(scores, axis=-1) * m  # zero fully masked rows like torch SDPA
    o = (probs @ v).reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return _linear(w, f"{prefix}.{o_name}", o, usv, scales)


def _short_conv(spec, w, prefix, x, pad_mask, usv, scales):
    Hd, K, T = spec.hidden_size, spec.conv_kernel, x.shape[1]
    x = x * pad_mask[:, :, None].astype(x.dtype)  # HF apply_mask_to_padding_states
    bcx = _linear(w, f"{prefix}.in_proj", x, usv, scales)
    b, c, xx = bcx[..., :Hd], bcx[..., Hd : 2 * Hd], bcx[..., 2 * Hd :]
    bx = b * xx  # (B, T, H)
    cw = w[f"{prefix}.conv.weight"]  # (H, K)
    xp = mx.pad(bx, [(0, 0), (K - 1, 0), (0, 0)])
    conv = xp[:, 0:T, :] * cw[:, 0]
    for j in range(1, K):
        conv = conv + xp[:, j : j + T, :] * cw[:, j]
    cb = w.get(f"{prefix}.conv.bias")
    if cb is not None:
        conv = conv + cb
    return _linear(w, f"{prefix}.out_proj", c * conv, usv, scales)


def _mlp(w, prefix, x, usv, scales, names):
    gate, up, down = names
    g = _linear(w, f"{prefix}.{gate}", x, usv, scales)
    u = _linear(w, f"{prefix}.{up}", x, usv, scales)
    return _linear(w, f"{prefix}.{down}", (g * mx.sigmoid(g)) * u, usv, scales)


def _forward(spec: ModelSpec, w, input_ids, attention_mask, usv, scales, position_ids=None,
             hidden=None):
    """Logits; with a list ``hidden``, also appends each decoder block's input and the last
    block's output (``hidden[i]`` -> block i -> ``hidden[i + 1]``)."""
    B, T = input_ids.shape
    h = mx.take(w["model.embed_tokens.weight"], input_ids, axis=0)
    if position_ids is None:
        position_ids = mx.arange(T)[None, :]
    cos, sin = _rope_cos_sin(spec, position_ids)
    am = attention_mask.astype(mx.bool_)
    causal = mx.tril(mx.ones((T, T), dtype=mx.bool_))[None]
    mask = mx.logical_and(causal, am[:, None, :])  # (B, T, T)
    eps = spec.norm_eps
    for i, lt in enumerate(spec.layer_types):
        pre = f"model.layers.{i}"
        if hidden is not None:
            hidden.append(h)
        if spec.arch == "llama":
            a = _rms_norm(h, w[f"{pre}.input_layernorm.weight"], eps)
            h = h + _attention(spec, w, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, False, "o_proj")
            m = _rms_norm(h, w[f"{pre}.post_attention_layernorm.weight"], eps)
            h = h + _mlp(w, f"{pre}.mlp", m, usv, scales, ("gate_proj", "up_proj", "down_proj"))
        else:
            a = _rms_norm(h, w[f"{pre}.operator_norm.weight"], eps)
            if lt == "conv":
                h = h + _short_conv(spec, w, f"{pre}.conv", a, am, usv, scales)
            else:
                h = h + _attention(spec, w, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, True, "out_proj")
            m = _rms_norm(h, w[f"{pre}.ffn_norm.weight"], eps)
            h = h + _mlp(w, f"{pre}.feed_forward", m, usv, scales, ("w1", "w3", "w2"))
    if hidden is not None:
        hidden.append(h)
    h = _rms_norm(h, w[final_norm_key(spec)], eps)
    out = h @ w[lm_head_key(w)].T
    if "lm_head" in usv:
        u, s, v = usv["lm_head"]
        c, ha = _adapter_input(h, scales["lm_head"])
        out = out + c * (((ha @ v) * s) @ u.T)
    return out


def _prep_adapters(adapters):
    usv, scales = split_adapters(adapters)
    usv = {k: tuple(_f32(t) for t in a) for k, a in usv.items()}
    scales = {k: _f32(c) for k, c in scales.items()}
    return usv, scales


def _f32(x):
    if isinstance(x, mx.array):
        return x.astype(mx.float32) if x.dtype != mx.float32 else x
    return mx.array(np.asarray(x, dtype=np.float32))


def _i32(x):
    if isinstance(x, mx.array):
        return x.astype(mx.int32)
    return mx.array(np.asarray(x, dtype=np.int32))


def _mask_or_ones(attention_mask, ids):
    if attention_mask is None:
        return mx.ones(ids.shape, dtype=mx.int32)
    return _i32(attention_mask)


def logits(params: MlxParams, input_ids, attention_mask=None, adapters=None, position_ids=None):
    """Logits ``(B, T, vocab)`` in float32 (evaluated)."""
    usv, scales = _prep_adapters(adapters)
    ids = _i32(input_ids)
    am = _mask_or_ones(attention_mask, ids)
    pos = None if position_ids is None else _i32(position_ids)
    out = _forward(params.spec, params.weights, ids, am, usv, scales, pos)
    mx.eval(out)
    return out


def logsumexp(x, axis: int = -1):
    """``log(sum(exp(x)))`` over the last axis, summed in two levels.

    MLX's CPU reductions add sequentially, so a float32 sum of n terms carries an error up to
    ~n * eps: over SmolLM2's 49,152-token vocabulary ``mx.logsumexp`` is off by up to 7.5e-5
    (torch's: 7.5e-7), which moved the mean cross-entropy of a batch by 1.4e-4. Summing blocks
    of 256 and then the block sums bounds it by ~(256 + n / 256) * eps (measured 1.3e-6)."""
    if axis not in (-1, x.ndim - 1):
        raise NotImplementedError("logsumexp: last axis only")
    n, block = x.shape[-1], 256
    m = mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
    e = mx.exp(x - m)
    if n > block:
        pad = -n % block
        if pad:
            e = mx.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, pad)])
        s = e.reshape(*e.shape[:-1], -1, block).sum(axis=-1).sum(axis=-1)
    else:
        s = e.sum(axis=-1)
    return mx.log(s) + m[..., 0]


def masked_cross_entropy(logits_, labels):
    """Mean next-token CE as HF computes it: ``logits[:, :-1]`` vs ``labels[:, 1:]``, -100 ignored."""
    lg = logits_[:, :-1, :].astype(mx.float32)
    lb = _i32(labels)[:, 1:]
    valid = lb != IGNORE_INDEX
    safe = mx.where(valid, lb, 0)
    lse = logsumexp(lg, axis=-1)
    tgt = mx.take_along_axis(lg, safe[..., None], axis=-1)[..., 0]
    nll = mx.where(valid, lse - tgt, 0.0)
    return nll.sum() / mx.maximum(valid.sum(), 1).astype(mx.float32)


def default_labels(input_ids, attention_mask=None):
    """Labels = input ids with padding positions set to -100 (numpy)."""
    lab = np.array(input_ids, dtype=np.int32, copy=True)
    if attention_mask is not None:
        lab[np.asarray(attention_mask) == 0] = IGNORE_INDEX
    return lab


_GRAD_FNS: dict[ModelSpec, Any] = {}


def _grad_fn(spec: ModelSpec):
    fn = _GRAD_FNS.get(spec)
    if fn is None:

        def loss(usv, weights, scales, input_ids, attention_mask, labels):
            out = _forward(spec, weights, input_ids, attention_mask, usv, scales)
            return masked_cross_entropy(out, labels)

        fn = _GRAD_FNS[spec] = mx.value_and_grad(loss, argnums=0)
    return fn


def loss_and_grads(params: MlxParams, adapters, batch: Mapping[str, Any]):
    """``(loss, {name: (dU, dS, dV)})`` for the masked LM loss via ``mx.value_and_grad``."""
    usv, scales = _prep_adapters(adapters)
    ids = _i32(batch["input_ids"])
    am = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(batch["input_ids"], am)
    am = _mask_or_ones(am, ids)
    if batch.get("position_ids") is not None:
        raise NotImplementedError("position_ids in loss_and_grads (MLX)")
    loss, grads = _grad_fn(params.spec)(usv, params.weights, scales, ids, am, _i32(labels))
    mx.eval(loss, grads)
    return loss, grads
