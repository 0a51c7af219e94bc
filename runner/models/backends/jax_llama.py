"""The Llama family (and LFM2) with factored LoRA adapters on JAX.

The model itself is :mod:`.array_forward` (``y = x Wᵀ + b + c · ((x V) · S) Uᵀ`` on every
adapted Linear, as the torch backend computes it); this module holds what JAX does its own way:
the parameters as a pytree, the scan over stacked layers, and the jitted entry points.

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

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import array_forward as F
from ._spec import ModelSpec, module_names, spec_from_config, state_dict_to_numpy

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


# ----------------------------------------------------------------------------- backend operations


def _float32(x):
    return jnp.asarray(x, dtype=jnp.float32)


def _int32(x):
    return jnp.asarray(x, dtype=jnp.int32)


OPS = F.ForwardOps(
    xp=jnp,  # an array-API namespace: what geometry._xp.namespace gives for JAX arrays
    rsqrt=jax.lax.rsqrt,
    sigmoid=jax.nn.sigmoid,
    softmax=jax.nn.softmax,
    logsumexp=jax.nn.logsumexp,
    bernoulli=jax.random.bernoulli,
    float32=_float32,
    int32=_int32,
)


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


def _llama_layers_scan(p: JaxParams, stacked, h, cos, sin, mask, hidden=None):
    """Every decoder layer by ``jax.lax.scan`` over ``p.stacked`` and the stacked adapters
    ``stacked = (usv, scales)`` (:func:`stack_layer_adapters`); returns the last layer's output
    and appends each layer's input to ``hidden`` (a list)."""
    spec = p.spec
    ad_usv, ad_scales = stacked

    def body(x, xs):
        weights, a_usv, a_scales = xs
        w = {f"{_LAYER}.{k}": v for k, v in weights.items()}
        lusv = {f"{_LAYER}.{k}": t for k, t in a_usv.items()}
        lscales = {f"{_LAYER}.{k}": c for k, c in a_scales.items()}
        return F.llama_layer(OPS, spec, w, _LAYER, x, cos, sin, mask, lusv, lscales), x

    h, inputs = jax.lax.scan(body, h, (p.stacked, ad_usv, ad_scales))  # inputs (L, B, T, H)
    if hidden is not None:
        hidden.extend(inputs[i] for i in range(spec.num_layers))
    return h


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
    layers = None
    if p.stacked is not None:
        if stacked is None:
            stacked, usv, scales = stack_layer_adapters(p, usv, scales)
        layers = functools.partial(_llama_layers_scan, p, stacked)
    elif stacked is not None:
        layer_usv, layer_scales = unstack_layer_adapters(p.spec, stacked)
        usv, scales = {**usv, **layer_usv}, {**scales, **layer_scales}
    return F.forward(OPS, p.spec, p.weights, input_ids, attention_mask, usv, scales, position_ids,
                     hidden, layers)


@jax.jit
def _logits_jit(params, input_ids, attention_mask, usv, scales, position_ids):
    return _forward(params, input_ids, attention_mask, usv, scales, position_ids)


def logits(params: JaxParams, input_ids, attention_mask=None, adapters=None, position_ids=None):
    """Logits ``(B, T, vocab)`` in float32.  Jitted (retraces per shape / adapter set)."""
    return _logits_jit(params, *F.logits_inputs(OPS, input_ids, attention_mask, adapters,
                                                 position_ids))


def masked_cross_entropy(logits_, labels):
    """Mean next-token CE as HF computes it: ``logits[:, :-1]`` vs ``labels[:, 1:]``, -100 ignored."""
    return F.masked_cross_entropy(OPS, logits_, _int32(labels))


default_labels = F.default_labels


def _loss(usv, params, scales, input_ids, attention_mask, labels, position_ids):
    out = _forward(params, input_ids, attention_mask, usv, scales, position_ids)
    return masked_cross_entropy(out, labels)


_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss))


def loss_and_grads(params: JaxParams, adapters, batch: Mapping[str, Any]):
    """``(loss, {name: (dU, dS, dV)})`` for the masked LM loss, via jitted ``jax.value_and_grad``."""
    usv, scales = F.prep_adapters(OPS, adapters)
    ids, am, labels, pos = F.batch_inputs(OPS, batch)
    return _value_and_grad_jit(usv, params, scales, ids, am, labels, pos)
