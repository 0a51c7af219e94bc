"""The Llama and LFM2 forward with factored adapters, written once against the array API.

Every adapted Linear computes ``y = x Wᵀ + b + c · ((x V) · S) Uᵀ`` with ``U (out, r)``,
``S (r,)`` (or ``(B, 1, r)``, per-example), ``V (in, r)`` and a per-module scale ``c``; this
matches the torch backend. Weights are a dict of backend arrays keyed by the HF names
(:mod:`._spec`); adapters are ``usv = {name: (U, S, V)}`` and ``scales = {name: c}``, where
``c`` may be ``(c, keep, key)`` for inverted dropout on the adapter branch's input.

The JAX and MLX modules (:mod:`.jax_llama`, :mod:`.mlx_models`) hold what differs: the
:class:`ForwardOps` below (the array namespace from ``geometry._xp.namespace`` and the few
operations the array API lacks or that a backend computes its own way), the conversion of
weights and inputs, and how the decoder layers run (JAX: one ``lax.scan`` over stacked Llama
layers, passed to :func:`forward` as ``layers``; MLX: eagerly, layer by layer).

Attention works in the ``(B, H, T, D)`` layout; grouped-query heads are ``(B, Hkv, G, T, D)``
with head ``h = kv * G + g`` (HF ``repeat_kv`` order). Positions are ``arange(T)`` when no
``position_ids`` are given. Fully masked attention rows (left padding) give a zero attention
output, as torch SDPA's safe softmax (HF's default) does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._spec import IGNORE_INDEX, ModelSpec, final_norm_key, lm_head_key, split_adapters


@dataclass(frozen=True)
class ForwardOps:
    """One backend's operations for the forward: ``xp`` its array-API namespace
    (``geometry._xp.namespace``); ``rsqrt``, ``sigmoid``, ``softmax(x, axis)``,
    ``logsumexp(x, axis)`` (not in the array API, or computed by the backend's own kernel);
    ``bernoulli(key, p, shape)`` a boolean mask from the backend's PRNG; ``float32(x)`` and
    ``int32(x)`` a host or backend value as a backend array of that dtype."""

    xp: Any
    rsqrt: Callable
    sigmoid: Callable
    softmax: Callable
    logsumexp: Callable
    bernoulli: Callable
    float32: Callable
    int32: Callable


# ----------------------------------------------------------------------------- building blocks


def adapter_input(ops: ForwardOps, x, scale):
    """``(c, x)``, or with adapter dropout ``scale = (c, keep, key)``: ``(c, mask * x / keep)``,
    mask ~ Bernoulli(keep) from the PRNG ``key`` (inverted dropout on the adapter branch's
    input only, as the torch derived trainer's hook does)."""
    if not isinstance(scale, tuple):
        return scale, x
    c, keep, key = scale
    mask = ops.bernoulli(key, keep, x.shape)
    return c, ops.xp.where(mask, x / keep, 0.0)


def add_adapter(ops: ForwardOps, y, x, name: str, usv, scales):
    """``y`` plus the adapter branch ``c · ((x V) · S) Uᵀ`` of module ``name``, if it has one."""
    if name not in usv:
        return y
    u, s, v = usv[name]
    c, xa = adapter_input(ops, x, scales[name])
    return y + c * (((xa @ v) * s) @ u.T)


def linear(ops: ForwardOps, w: Mapping, name: str, x, usv, scales):
    y = x @ w[name + ".weight"].T
    b = w.get(name + ".bias")
    if b is not None:
        y = y + b
    return add_adapter(ops, y, x, name, usv, scales)


def rms_norm(ops: ForwardOps, x, weight, eps: float):
    var = ops.xp.mean(x * x, axis=-1, keepdims=True)
    return weight * (x * ops.rsqrt(var + eps))


def rope_cos_sin(ops: ForwardOps, spec: ModelSpec, position_ids):
    """``cos, sin`` of the rotary angles, each ``(B|1, T, D)``."""
    xp, d = ops.xp, spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = position_ids.astype(xp.float32)[..., None] * xp.asarray(inv_freq.astype(np.float32))
    emb = xp.concat([freqs, freqs], axis=-1)
    return xp.cos(emb), xp.sin(emb)


def rotate_half(ops: ForwardOps, x):
    h = x.shape[-1] // 2
    return ops.xp.concat([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(ops: ForwardOps, x, cos, sin):  # x (B, H, T, D); cos/sin (B|1, T, D)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(ops, x) * sin


def attention(ops: ForwardOps, spec: ModelSpec, w, prefix: str, x, cos, sin, mask, usv, scales,
              qk_norm: bool, o_name: str):
    """Grouped-query self-attention; ``mask (B|1, T, T)`` True where a query may attend."""
    xp = ops.xp
    B, T, _ = x.shape
    D, H, Hkv, G = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.kv_groups
    q = linear(ops, w, f"{prefix}.q_proj", x, usv, scales).reshape(B, T, H, D)
    k = linear(ops, w, f"{prefix}.k_proj", x, usv, scales).reshape(B, T, Hkv, D)
    v = linear(ops, w, f"{prefix}.v_proj", x, usv, scales).reshape(B, T, Hkv, D)
    if qk_norm:
        q = rms_norm(ops, q, w[f"{prefix}.q_layernorm.weight"], spec.norm_eps)
        k = rms_norm(ops, k, w[f"{prefix}.k_layernorm.weight"], spec.norm_eps)
    q = apply_rope(ops, q.transpose(0, 2, 1, 3), cos, sin)  # (B, H, T, D)
    k = apply_rope(ops, k.transpose(0, 2, 1, 3), cos, sin)  # (B, Hkv, T, D)
    v = v.transpose(0, 2, 1, 3)
    q = q.reshape(B, Hkv, G, T, D)  # head h = kv * G + g (HF repeat_kv order)
    k, v = k[:, :, None], v[:, :, None]
    scores = (q * (D**-0.5)) @ xp.matrix_transpose(k)  # (B, Hkv, G, T, T)
    m = mask[:, None, None]
    scores = xp.where(m, scores, float(np.finfo(np.float32).min))
    probs = ops.softmax(scores, axis=-1) * m  # zero fully masked rows like torch SDPA
    o = (probs @ v).reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return linear(ops, w, f"{prefix}.{o_name}", o, usv, scales)


def short_conv(ops: ForwardOps, spec: ModelSpec, w, prefix: str, x, pad_mask, usv, scales):
    """LFM2's gated causal depthwise convolution of kernel ``spec.conv_kernel``."""
    xp = ops.xp
    B, T, Hd, K = x.shape[0], x.shape[1], spec.hidden_size, spec.conv_kernel
    if pad_mask is not None:  # HF apply_mask_to_padding_states
        x = x * pad_mask[:, :, None].astype(x.dtype)
    bcx = linear(ops, w, f"{prefix}.in_proj", x, usv, scales)
    b, c, xx = bcx[..., :Hd], bcx[..., Hd : 2 * Hd], bcx[..., 2 * Hd :]
    bx = b * xx  # (B, T, H)
    cw = w[f"{prefix}.conv.weight"]  # (H, K)
    xp_ = xp.concat([xp.zeros((B, K - 1, Hd), dtype=bx.dtype), bx], axis=1)  # causal left pad
    conv = xp_[:, 0:T, :] * cw[:, 0]
    for j in range(1, K):
        conv = conv + xp_[:, j : j + T, :] * cw[:, j]
    cb = w.get(f"{prefix}.conv.bias")
    if cb is not None:
        conv = conv + cb
    return linear(ops, w, f"{prefix}.out_proj", c * conv, usv, scales)


def mlp(ops: ForwardOps, w, prefix: str, x, usv, scales, names: tuple[str, str, str]):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    gate, up, down = names
    g = linear(ops, w, f"{prefix}.{gate}", x, usv, scales)
    u = linear(ops, w, f"{prefix}.{up}", x, usv, scales)
    return linear(ops, w, f"{prefix}.{down}", (g * ops.sigmoid(g)) * u, usv, scales)


def llama_layer(ops: ForwardOps, spec: ModelSpec, w, pre: str, h, cos, sin, mask, usv, scales):
    """One Llama decoder layer: the weights ``{pre}.*`` of ``w``, adapters keyed ``{pre}.*``."""
    eps = spec.norm_eps
    a = rms_norm(ops, h, w[f"{pre}.input_layernorm.weight"], eps)
    h = h + attention(ops, spec, w, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, False,
                      "o_proj")
    m = rms_norm(ops, h, w[f"{pre}.post_attention_layernorm.weight"], eps)
    return h + mlp(ops, w, f"{pre}.mlp", m, usv, scales, ("gate_proj", "up_proj", "down_proj"))


def lfm2_layer(ops: ForwardOps, spec: ModelSpec, w, pre: str, layer_type: str, h, cos, sin,
               mask, pad_mask, usv, scales):
    """One LFM2 decoder layer: a short convolution or attention, then the feed-forward."""
    eps = spec.norm_eps
    a = rms_norm(ops, h, w[f"{pre}.operator_norm.weight"], eps)
    if layer_type == "conv":
        h = h + short_conv(ops, spec, w, f"{pre}.conv", a, pad_mask, usv, scales)
    else:
        h = h + attention(ops, spec, w, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, True,
                          "out_proj")
    m = rms_norm(ops, h, w[f"{pre}.ffn_norm.weight"], eps)
    return h + mlp(ops, w, f"{pre}.feed_forward", m, usv, scales, ("w1", "w3", "w2"))


def decoder_layers(ops: ForwardOps, spec: ModelSpec, w, h, cos, sin, mask, pad_mask, usv, scales,
                   hidden=None):
    """Every decoder layer in turn; appends each layer's input to ``hidden`` (a list)."""
    for i, layer_type in enumerate(spec.layer_types):
        pre = f"model.layers.{i}"
        if hidden is not None:
            hidden.append(h)
        if spec.arch == "llama":
            h = llama_layer(ops, spec, w, pre, h, cos, sin, mask, usv, scales)
        else:
            h = lfm2_layer(ops, spec, w, pre, layer_type, h, cos, sin, mask, pad_mask, usv, scales)
    return h


def forward(ops: ForwardOps, spec: ModelSpec, w, input_ids, attention_mask, usv, scales,
            position_ids=None, hidden=None, layers=None):
    """Logits ``(B, T, vocab)``; with a list ``hidden``, also appends each decoder block's input
    and the last block's output (``hidden[i]`` -> block i -> ``hidden[i + 1]``).

    ``layers(h, cos, sin, mask, hidden) -> h``, where given, runs the decoder layers in place
    of :func:`decoder_layers` (JAX's scan over stacked layers)."""
    xp = ops.xp
    T = input_ids.shape[1]
    h = xp.take(w["model.embed_tokens.weight"], input_ids, axis=0)  # (B, T, H)
    if position_ids is None:
        position_ids = xp.arange(T)[None, :]
    cos, sin = rope_cos_sin(ops, spec, position_ids)
    t = xp.arange(T)
    mask = (t[:, None] >= t[None, :])[None]  # (1, T, T) causal
    pad_mask = None
    if attention_mask is not None:
        pad_mask = attention_mask.astype(xp.bool)
        mask = xp.logical_and(mask, pad_mask[:, None, :])  # (B, T, T)
    if layers is None:
        h = decoder_layers(ops, spec, w, h, cos, sin, mask, pad_mask, usv, scales, hidden)
    else:
        h = layers(h, cos, sin, mask, hidden)
    if hidden is not None:
        hidden.append(h)
    h = rms_norm(ops, h, w[final_norm_key(spec)], spec.norm_eps)
    return add_adapter(ops, h @ w[lm_head_key(w)].T, h, "lm_head", usv, scales)


# ----------------------------------------------------------------------------- loss and inputs


def token_nll(ops: ForwardOps, logits, labels):
    """(nll, valid): next-token cross-entropy per position (B, T-1) as HF computes it,
    ``logits[:, :-1]`` vs ``labels[:, 1:]``, 0 where the label is -100 (``labels`` a backend
    integer array)."""
    xp = ops.xp
    lg = logits[:, :-1, :].astype(xp.float32)
    lb = labels[:, 1:]
    valid = lb != IGNORE_INDEX
    safe = xp.where(valid, lb, 0)
    lse = ops.logsumexp(lg, axis=-1)
    tgt = xp.take_along_axis(lg, safe[..., None], axis=-1)[..., 0]
    return xp.where(valid, lse - tgt, 0.0), valid


def masked_cross_entropy(ops: ForwardOps, logits, labels):
    """Mean next-token CE over the positions whose label is not -100 (:func:`token_nll`)."""
    nll, valid = token_nll(ops, logits, labels)
    return nll.sum() / ops.xp.maximum(valid.sum(), 1).astype(ops.xp.float32)


def default_labels(input_ids, attention_mask=None):
    """Labels = input ids with padding positions set to -100 (numpy)."""
    lab = np.array(input_ids, dtype=np.int32, copy=True)
    if attention_mask is not None:
        lab[np.asarray(attention_mask) == 0] = IGNORE_INDEX
    return lab


def prep_adapters(ops: ForwardOps, adapters):
    """``{name: (U, S, V, c)}`` -> float32 ``usv``, ``scales`` on the backend."""
    usv, scales = split_adapters(adapters)
    usv = {k: tuple(ops.float32(t) for t in a) for k, a in usv.items()}
    scales = {k: ops.float32(c) for k, c in scales.items()}
    return usv, scales


def mask_or_ones(ops: ForwardOps, attention_mask, ids):
    """The attention mask as int32, all ones where none is given: padded and unpadded batches
    of one shape then share a compiled function."""
    if attention_mask is None:
        return ops.xp.ones(ids.shape, dtype=ops.xp.int32)
    return ops.int32(attention_mask)


def logits_inputs(ops: ForwardOps, input_ids, attention_mask, adapters, position_ids):
    """``(input_ids, attention_mask, usv, scales, position_ids or None)`` of a ``logits`` call on
    the backend, in :func:`forward`'s order."""
    usv, scales = prep_adapters(ops, adapters)
    ids = ops.int32(input_ids)
    pos = None if position_ids is None else ops.int32(position_ids)
    return ids, mask_or_ones(ops, attention_mask, ids), usv, scales, pos


def batch_inputs(ops: ForwardOps, batch: Mapping[str, Any]):
    """``(input_ids, attention_mask, labels, position_ids or None)`` of a ``loss_and_grads``
    batch as int32 backend arrays; labels default to :func:`default_labels`."""
    am = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(batch["input_ids"], am)
    ids = ops.int32(batch["input_ids"])
    pos = batch.get("position_ids")
    return (ids, mask_or_ones(ops, am, ids), ops.int32(labels),
            None if pos is None else ops.int32(pos))
