"""Llama-family and LFM2 causal LMs with factored LoRA adapters on MLX.

The model itself is :mod:`.array_forward` (``y = x Wᵀ + b + c · ((x V) · S) Uᵀ`` on every
adapted Linear, as :mod:`.jax_llama` and the torch backend compute it); this module holds what
MLX does its own way: the parameters, a log-sum-exp accurate over a vocabulary, eager
evaluation, and the gradient function per model spec.

API::

    params = params_from_torch(model.state_dict(), model.config)   # MlxParams, float32
    out = logits(params, input_ids, attention_mask=None, adapters=None)        # mx.array (B, T, V)
    loss = masked_cross_entropy(out, labels)                                  # HF shift, -100 ignored
    loss, grads = loss_and_grads(params, adapters, batch)   # grads[name] = (dU, dS, dV)

No mlx-lm dependency, so the adapter branch can sit on any Linear, including ``lm_head``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import array_forward as F
from ._spec import ModelSpec, spec_from_config, state_dict_to_numpy
from .mlx_blas import use_torch_blas

use_torch_blas()  # before MLX loads: its Linux CPU BLAS is the reference one (see mlx_blas)

import mlx.core as mx  # noqa: E402

from geometry._mlx import mlx_namespace  # noqa: E402

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


# ----------------------------------------------------------------------------- backend operations


def _f32(x):
    if isinstance(x, mx.array):
        return x.astype(mx.float32) if x.dtype != mx.float32 else x
    return mx.array(np.asarray(x, dtype=np.float32))


def _i32(x):
    if isinstance(x, mx.array):
        return x.astype(mx.int32)
    return mx.array(np.asarray(x, dtype=np.int32))


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


def _bernoulli(key, p, shape):
    return mx.random.bernoulli(p, shape, key=key)


OPS = F.ForwardOps(
    xp=mlx_namespace,  # geometry._xp.namespace's adapter for MLX arrays
    rsqrt=mx.rsqrt,
    sigmoid=mx.sigmoid,
    softmax=mx.softmax,
    logsumexp=logsumexp,
    bernoulli=_bernoulli,
    float32=_f32,
    int32=_i32,
)


def _forward(spec: ModelSpec, w, input_ids, attention_mask, usv, scales, position_ids=None,
             hidden=None):
    """Logits, layer by layer (eager); :func:`array_forward.forward`."""
    return F.forward(OPS, spec, w, input_ids, attention_mask, usv, scales, position_ids, hidden)


def logits(params: MlxParams, input_ids, attention_mask=None, adapters=None, position_ids=None):
    """Logits ``(B, T, vocab)`` in float32 (evaluated)."""
    inputs = F.logits_inputs(OPS, input_ids, attention_mask, adapters, position_ids)
    out = _forward(params.spec, params.weights, *inputs)
    mx.eval(out)
    return out


def masked_cross_entropy(logits_, labels):
    """Mean next-token CE as HF computes it: ``logits[:, :-1]`` vs ``labels[:, 1:]``, -100 ignored."""
    return F.masked_cross_entropy(OPS, logits_, _i32(labels))


default_labels = F.default_labels


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
    if batch.get("position_ids") is not None:
        raise NotImplementedError("position_ids in loss_and_grads (MLX)")
    usv, scales = F.prep_adapters(OPS, adapters)
    ids, am, labels, _ = F.batch_inputs(OPS, batch)
    loss, grads = _grad_fn(params.spec)(usv, params.weights, scales, ids, am, labels)
    mx.eval(loss, grads)
    return loss, grads
