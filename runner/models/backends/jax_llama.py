"""Functional JAX implementation of the Llama family (and LFM2) with factored LoRA adapters.

Every adapted Linear computes ``y = x Wᵀ + b + c · ((x V) · S) Uᵀ`` with ``U (out, r)``,
``S (r,)``, ``V (in, r)`` and a per-module scalar ``c``; this matches the torch backend.

API::

    params = params_from_torch(model.state_dict(), model.config)   # JaxParams pytree, float32
    out = logits(params, input_ids, attention_mask=None, adapters=None)        # (B, T, V)
    loss = masked_cross_entropy(out, labels)                                  # HF shift, -100 ignored
    loss, grads = loss_and_grads(params, adapters, batch)   # grads[name] = (dU, dS, dV)

``adapters`` maps full module names (``model.layers.0.self_attn.q_proj``, ``lm_head``)
to ``(U, S, V, c)``.  ``batch`` is a mapping with ``input_ids`` and optionally
``attention_mask`` and ``labels`` (default: ``input_ids`` with padding set to -100).
Positions are ``arange(T)`` as in HF when no ``position_ids`` are given.

Compilation scales with one decoder layer, not with the model. XLA compiles every fusion of a
jitted program into its own CPU kernel (~50 ms each here), so a program's compile time grows
with its operation count. A Llama model's decoder layers all have the same structure, so the
forward is a ``jax.lax.scan`` over weights stacked by layer (``JaxParams.stacked``, built once
by ``params_from_torch``): the layer body compiles once, forward and backward, whatever the
depth. The adapters enter the scan the same way (:func:`stack_layer_adapters`): per module kind
(``self_attn.q_proj``, ...) U, S, V zero-padded to the kind's largest rank and stacked over the
layers; a layer without an adapter of that kind gets a zero adapter with c = 0. Zero columns
change nothing: ``((x V) * S) Uᵀ`` gains exact zeros, and their gradients are zero. A caller
that keeps its adapters stacked (the derived trainer) passes them as ``_forward(...,
stacked=...)``, so its programs hold no per-adapter operation at all; with one (U, S, V) per
module, SmolLM2-135M's 210 adapters made the loss gradient compile in 34 s. LFM2 mixes
convolution and attention layers, so it keeps the unrolled forward (its models here are small)
and takes stacked adapters apart (:func:`unstack_layer_adapters`). The stacked weights are a
second copy of the decoder's Linear and norm weights (the per-name ``weights`` stay, for the
derivation and the unrolled path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._spec import (
    IGNORE_INDEX,
    ModelSpec,
    final_norm_key,
    lm_head_key,
    module_names,
    spec_from_config,
    split_adapters,
    state_dict_to_numpy,
)

__all__ = [
    "JaxParams",
    "params_from_torch",
    "logits",
    "masked_cross_entropy",
    "loss_and_grads",
    "default_labels",
]


@jax.tree_util.register_pytree_node_class
class JaxParams:
    """Weights (dict of jnp arrays, HF names) plus the static :class:`ModelSpec`; for Llama also
    ``stacked``: each decoder-layer weight (``self_attn.q_proj.weight``, ...,
    ``input_layernorm.weight``) stacked over the layers, the scanned forward's input."""

    def __init__(self, weights: dict[str, jax.Array], spec: ModelSpec,
                 stacked: dict[str, jax.Array] | None = None):
        self.weights = weights
        self.spec = spec
        self.stacked = stacked

    def tree_flatten(self):
        return (self.weights, self.stacked), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(children[0], spec, children[1])

    def __getitem__(self, key: str) -> jax.Array:
        return self.weights[key]

    def __repr__(self) -> str:
        return f"JaxParams({self.spec.arch}, {len(self.weights)} tensors)"


def params_from_torch(state_dict: Mapping[str, Any], config: Any) -> JaxParams:
    """Convert a HF ``LlamaForCausalLM``/``Lfm2ForCausalLM`` state dict (+ its config)."""
    spec = spec_from_config(config)
    host = state_dict_to_numpy(state_dict, spec)
    w = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in host.items()}
    stacked = None
    if spec.arch == "llama":  # the scanned forward's input: each layer weight over the layers
        kinds = [k.removeprefix("model.layers.0.") for k in host if k.startswith("model.layers.0.")]
        stacked = {k: jnp.asarray(np.stack([host[f"model.layers.{i}.{k}"]
                                            for i in range(spec.num_layers)]), dtype=jnp.float32)
                   for k in kinds}
    return JaxParams(w, spec, stacked)


# ----------------------------------------------------------------------------- building blocks


def _linear(p: JaxParams, name: str, x, usv, scales):
    w = p.weights[name + ".weight"]
    y = x @ w.T
    b = p.weights.get(name + ".bias")
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
    mask = jax.random.bernoulli(key, keep, x.shape)
    return c, jnp.where(mask, x / keep, 0.0)


def _rms_norm(x, w, eps):
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return w * (x * jax.lax.rsqrt(var + eps))


def _rope_cos_sin(spec: ModelSpec, position_ids):
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B|1, T, d/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x, cos, sin):  # x (B, T, H, D); cos/sin (B|1, T, D)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


def _attention(p, prefix, x, cos, sin, mask, usv, scales, qk_norm: bool, o_name: str):
    spec = p.spec
    B, T, _ = x.shape
    D, Hkv, G = spec.head_dim, spec.num_kv_heads, spec.kv_groups
    q = _linear(p, f"{prefix}.q_proj", x, usv, scales).reshape(B, T, spec.num_heads, D)
    k = _linear(p, f"{prefix}.k_proj", x, usv, scales).reshape(B, T, Hkv, D)
    v = _linear(p, f"{prefix}.v_proj", x, usv, scales).reshape(B, T, Hkv, D)
    if qk_norm:
        q = _rms_norm(q, p.weights[f"{prefix}.q_layernorm.weight"], spec.norm_eps)
        k = _rms_norm(k, p.weights[f"{prefix}.k_layernorm.weight"], spec.norm_eps)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)
    q = q.reshape(B, T, Hkv, G, D)  # head h = kv * G + g (HF repeat_kv order)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * (D**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    # zero fully-masked rows (left padding) like torch SDPA's safe softmax, which HF uses by default
    probs = jax.nn.softmax(scores, axis=-1) * mask[:, None, None]
    o = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(B, T, spec.num_heads * D)
    return _linear(p, f"{prefix}.{o_name}", o, usv, scales)


def _short_conv(p, prefix, x, pad_mask, usv, scales):
    spec = p.spec
    H, K, T = spec.hidden_size, spec.conv_kernel, x.shape[1]
    if pad_mask is not None:
        x = x * pad_mask[:, :, None].astype(x.dtype)
    bcx = _linear(p, f"{prefix}.in_proj", x, usv, scales)
    b, c, xx = bcx[..., :H], bcx[..., H : 2 * H], bcx[..., 2 * H :]
    bx = b * xx  # (B, T, H)
    w = p.weights[f"{prefix}.conv.weight"]  # (H, K)
    xp = jnp.pad(bx, ((0, 0), (K - 1, 0), (0, 0)))
    conv = sum(xp[:, j : j + T, :] * w[:, j] for j in range(K))
    cb = p.weights.get(f"{prefix}.conv.bias")
    if cb is not None:
        conv = conv + cb
    return _linear(p, f"{prefix}.out_proj", c * conv, usv, scales)


def _mlp(p, prefix, x, usv, scales, names):
    gate, up, down = names
    g = _linear(p, f"{prefix}.{gate}", x, usv, scales)
    u = _linear(p, f"{prefix}.{up}", x, usv, scales)
    return _linear(p, f"{prefix}.{down}", jax.nn.silu(g) * u, usv, scales)


def _llama_layer(p, pre, h, cos, sin, mask, usv, scales):
    """One Llama decoder layer: the weights ``{pre}.*`` of ``p``, adapters keyed ``{pre}.*``."""
    eps, w = p.spec.norm_eps, p.weights
    a = _rms_norm(h, w[f"{pre}.input_layernorm.weight"], eps)
    h = h + _attention(p, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, False, "o_proj")
    m = _rms_norm(h, w[f"{pre}.post_attention_layernorm.weight"], eps)
    return h + _mlp(p, f"{pre}.mlp", m, usv, scales, ("gate_proj", "up_proj", "down_proj"))


_LAYER = "layer"  # the module-name prefix of the scan body's one layer


def layer_kinds(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Decoder-layer module kind (the name after ``model.layers.{i}.``) -> the layers that have
    it, ascending. Llama: every kind in every layer; LFM2: convolution and attention layers
    differ."""
    out: dict[str, list[int]] = {}
    for name in module_names(spec):
        if name.startswith("model.layers."):
            _, _, i, kind = name.split(".", 3)
            out.setdefault(kind, []).append(int(i))
    return {k: tuple(v) for k, v in out.items()}


def _llama_layers_scan(p: JaxParams, h, cos, sin, mask, stacked):
    """Every decoder layer by ``jax.lax.scan`` over ``p.stacked`` and the stacked adapters
    ``stacked = (usv, scales)`` (:func:`stack_layer_adapters`); returns the last layer's output
    and each layer's input (L, B, T, H)."""
    spec = p.spec
    ad_usv, ad_scales = stacked

    def body(x, xs):
        weights, a_usv, a_scales = xs
        layer = JaxParams({f"{_LAYER}.{k}": v for k, v in weights.items()}, spec)
        lusv = {f"{_LAYER}.{k}": t for k, t in a_usv.items()}
        lscales = {f"{_LAYER}.{k}": c for k, c in a_scales.items()}
        return _llama_layer(layer, _LAYER, x, cos, sin, mask, lusv, lscales), x

    return jax.lax.scan(body, h, (p.stacked, ad_usv, ad_scales))


def stack_layer_adapters(p: JaxParams, usv, scales):
    """The decoder-layer adapters of ``usv``/``scales`` (by module name) in the stacked form
    :func:`_forward` takes as ``stacked``: per module kind (``self_attn.q_proj``, ...) over the
    layers that have it (:func:`layer_kinds`), ``(U (n, out, r), S (n, ..., r), V (n, in, r))``
    zero-padded to the kind's largest rank r, and the scales ``c (n,)`` or, where an adapter of
    the kind has dropout, ``(c (n,), keep (n,), keys (n, ...))``. A layer without an adapter of
    that kind gets U = S = V = 0 and c = 0 (keep = 1: its mask keeps everything). This is the
    general entry (``logits``, ``loss_and_grads``); the derived trainer keeps its adapters
    stacked throughout, so its compiled functions contain no per-adapter operation."""
    spec = p.spec
    kinds = layer_kinds(spec)
    by_kind: dict[str, dict[int, str]] = {}
    for name in usv:
        parts = name.split(".", 3)
        if name.startswith("model.layers.") and len(parts) == 4:
            by_kind.setdefault(parts[3], {})[int(parts[2])] = name
    out_usv, out_scales = {}, {}
    for kind, names in sorted(by_kind.items()):
        w0 = p.weights[f"model.layers.{kinds[kind][0]}.{kind}.weight"]
        out_dim, in_dim = w0.shape
        r = max(usv[n][0].shape[-1] for n in names.values())
        u0, s0, _ = usv[next(iter(names.values()))]
        s_lead = s0.shape[:-1]  # () or (B, 1) (per-example S)
        with_dropout = [scales[n] for n in names.values() if isinstance(scales[n], tuple)]
        spare_key = with_dropout[0][2] if with_dropout else None  # any key: keep = 1 below
        us, ss, vs, cs, keeps, keys = [], [], [], [], [], []
        for i in kinds[kind]:
            name = names.get(i)
            if name is None:
                u, s, v = (jnp.zeros((out_dim, r), u0.dtype), jnp.zeros((*s_lead, r), s0.dtype),
                           jnp.zeros((in_dim, r), u0.dtype))
                c, keep, key = 0.0, 1.0, spare_key
            else:
                u, s, v = (_pad_last(t, r) for t in usv[name])
                c, keep, key = (scales[name] if isinstance(scales[name], tuple) else
                                (scales[name], 1.0, spare_key))
            us.append(u), ss.append(s), vs.append(v)
            cs.append(jnp.asarray(c, jnp.float32)), keeps.append(jnp.asarray(keep, jnp.float32))
            keys.append(key)
        out_usv[kind] = (jnp.stack(us), jnp.stack(ss), jnp.stack(vs))
        out_scales[kind] = ((jnp.stack(cs), jnp.stack(keeps), jnp.stack(keys)) if with_dropout
                            else jnp.stack(cs))
    rest = {n: t for n, t in usv.items() if not n.startswith("model.layers.")}
    rest_scales = {n: scales[n] for n in rest}
    return (out_usv, out_scales), rest, rest_scales


def unstack_layer_adapters(spec: ModelSpec, stacked):
    """The inverse of :func:`stack_layer_adapters`' stacking, by module name (padded ranks, and
    the zero adapters of untargeted layers included): for the unrolled forward."""
    ad_usv, ad_scales = stacked
    kinds = layer_kinds(spec)
    usv, scales = {}, {}
    for kind, (u, s, v) in ad_usv.items():
        sc = ad_scales[kind]
        for j, i in enumerate(kinds[kind]):
            name = f"model.layers.{i}.{kind}"
            usv[name] = (u[j], s[j], v[j])
            scales[name] = tuple(x[j] for x in sc) if isinstance(sc, tuple) else sc[j]
    return usv, scales


def _pad_last(x, r: int):
    pad = r - x.shape[-1]
    return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _forward(p: JaxParams, input_ids, attention_mask, usv, scales, position_ids=None, hidden=None,
             stacked=None):
    """Logits; with a list ``hidden``, also appends each decoder block's input and the last
    block's output (``hidden[i]`` -> block i -> ``hidden[i + 1]``). Adapters by module name in
    ``usv``/``scales``, and/or the decoder layers' adapters already stacked by kind in
    ``stacked`` (:func:`stack_layer_adapters`)."""
    spec, w = p.spec, p.weights
    B, T = input_ids.shape
    h = jnp.take(w["model.embed_tokens.weight"], input_ids, axis=0)
    if position_ids is None:
        position_ids = jnp.arange(T)[None, :]
    cos, sin = _rope_cos_sin(spec, position_ids)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None]
    if attention_mask is not None:
        am = attention_mask.astype(bool)
        mask = causal & am[:, None, :]
    else:
        am = None
        mask = causal
    eps = spec.norm_eps
    if p.stacked is not None:
        if stacked is None:
            stacked, usv, scales = stack_layer_adapters(p, usv, scales)
        h, inputs = _llama_layers_scan(p, h, cos, sin, mask, stacked)
        if hidden is not None:
            hidden.extend(inputs[i] for i in range(spec.num_layers))
    else:
        if stacked is not None:
            layer_usv, layer_scales = unstack_layer_adapters(spec, stacked)
            usv, scales = {**usv, **layer_usv}, {**scales, **layer_scales}
        for i, lt in enumerate(spec.layer_types):
            pre = f"model.layers.{i}"
            if hidden is not None:
                hidden.append(h)
            if spec.arch == "llama":
                h = _llama_layer(p, pre, h, cos, sin, mask, usv, scales)
            else:
                a = _rms_norm(h, w[f"{pre}.operator_norm.weight"], eps)
                if lt == "conv":
                    h = h + _short_conv(p, f"{pre}.conv", a, am, usv, scales)
                else:
                    h = h + _attention(p, f"{pre}.self_attn", a, cos, sin, mask, usv, scales, True,
                                       "out_proj")
                m = _rms_norm(h, w[f"{pre}.ffn_norm.weight"], eps)
                h = h + _mlp(p, f"{pre}.feed_forward", m, usv, scales, ("w1", "w3", "w2"))
    if hidden is not None:
        hidden.append(h)
    h = _rms_norm(h, w[final_norm_key(spec)], eps)
    head = w[lm_head_key(w)]
    out = h @ head.T
    if "lm_head" in usv:
        u, s, v = usv["lm_head"]
        c, ha = _adapter_input(h, scales["lm_head"])
        out = out + c * (((ha @ v) * s) @ u.T)
    return out


def _prep_adapters(adapters):
    usv, scales = split_adapters(adapters)
    usv = {k: tuple(jnp.asarray(t, dtype=jnp.float32) for t in a) for k, a in usv.items()}
    scales = {k: jnp.asarray(c, dtype=jnp.float32) for k, c in scales.items()}
    return usv, scales


def _mask_or_ones(attention_mask, ids):
    # always pass a mask so padded / unpadded batches of one shape share a compiled function
    if attention_mask is None:
        return jnp.ones(ids.shape, dtype=jnp.int32)
    return jnp.asarray(attention_mask, dtype=jnp.int32)


@jax.jit
def _logits_jit(params, input_ids, attention_mask, usv, scales, position_ids):
    return _forward(params, input_ids, attention_mask, usv, scales, position_ids)


def logits(params: JaxParams, input_ids, attention_mask=None, adapters=None, position_ids=None):
    """Logits ``(B, T, vocab)`` in float32.  Jitted (retraces per shape / adapter set)."""
    usv, scales = _prep_adapters(adapters)
    ids = jnp.asarray(input_ids, dtype=jnp.int32)
    am = _mask_or_ones(attention_mask, ids)
    pos = None if position_ids is None else jnp.asarray(position_ids, dtype=jnp.int32)
    return _logits_jit(params, ids, am, usv, scales, pos)


def masked_cross_entropy(logits_, labels):
    """Mean next-token CE as HF computes it: ``logits[:, :-1]`` vs ``labels[:, 1:]``, -100 ignored."""
    lg = logits_[:, :-1, :].astype(jnp.float32)
    lb = jnp.asarray(labels)[:, 1:]
    valid = lb != IGNORE_INDEX
    safe = jnp.where(valid, lb, 0)
    lse = jax.nn.logsumexp(lg, axis=-1)
    tgt = jnp.take_along_axis(lg, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - tgt, 0.0)
    return nll.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def default_labels(input_ids, attention_mask=None):
    """Labels = input ids with padding positions set to -100 (numpy)."""
    lab = np.array(input_ids, dtype=np.int32, copy=True)
    if attention_mask is not None:
        lab[np.asarray(attention_mask) == 0] = IGNORE_INDEX
    return lab


def _loss(usv, params, scales, input_ids, attention_mask, labels, position_ids):
    out = _forward(params, input_ids, attention_mask, usv, scales, position_ids)
    return masked_cross_entropy(out, labels)


_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss))


def loss_and_grads(params: JaxParams, adapters, batch: Mapping[str, Any]):
    """``(loss, {name: (dU, dS, dV)})`` for the masked LM loss, via jitted ``jax.value_and_grad``."""
    usv, scales = _prep_adapters(adapters)
    ids = jnp.asarray(batch["input_ids"], dtype=jnp.int32)
    am = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = default_labels(batch["input_ids"], am)
    am = _mask_or_ones(am, ids)
    pos = batch.get("position_ids")
    pos = None if pos is None else jnp.asarray(pos, dtype=jnp.int32)
    loss, grads = _value_and_grad_jit(usv, params, scales, ids, am, jnp.asarray(labels, jnp.int32), pos)
    return loss, grads
