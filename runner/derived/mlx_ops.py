"""The MLX ops of the derived trainer: eager, the adapters kept by module name. On Linux MLX's
matmuls run torch's BLAS (runner.models.backends.mlx_blas), and the cross-entropy sums its
log-sum-exp in two levels (mlx_models.logsumexp), since MLX's CPU reductions add sequentially."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

import geometry
from runner.derived.array_ops import (
    ArrayOps,
    add_grads,
    grad_norm,
    update_one,
)
from runner.derived.frames import gathered_eigenpairs, tail_frames
from runner.models.backends import mlx_blas, mlx_models
from runner.models.backends.array_forward import token_nll


class MlxOps(ArrayOps):
    name = "mlx"

    def __init__(self, model):
        # MLX computes on its own threads; their BLAS (torch's) runs on torch's thread count,
        # which runner.hardware sets from hardware.threads, not on every core (mlx_blas).
        mlx_blas.set_threads(torch.get_num_threads())
        self.mx, self.be = mx, mlx_models
        super().__init__(model)
        spec, be = self.spec, mlx_models

        def sum_nll(usv, weights, scales, ids, am, labels):
            logits = be._forward(spec, weights, ids, am, usv, scales)
            return token_nll(be.OPS, logits, labels)

        def loss(usv, weights, scales, ids, am, labels, total):
            nll, _ = sum_nll(usv, weights, scales, ids, am, labels)
            return nll.sum() / total

        def example_loss_sum(s_batched, uv, weights, scales, ids, am, labels):
            usv = {n: (uv[n][0], s_batched[n], uv[n][1]) for n in uv}
            nll, valid = sum_nll(usv, weights, scales, ids, am, labels)
            per = nll.sum(axis=1) / mx.maximum(valid.sum(axis=1), 1).astype(mx.float32)
            return per.sum()

        self._sum_nll = sum_nll
        self._value_and_grad = mx.value_and_grad(loss, argnums=0)
        self._s_grads = mx.grad(example_loss_sum, argnums=0)

    def array(self, x, dtype="float32"):
        return self.mx.array(np.asarray(x), dtype=getattr(self.mx, dtype))

    def numpy(self, x):
        return np.array(x)

    # -- the state: {name: (U, S, V)} --------------------------------------------------------

    def pack_usv(self, usv: dict, specs: dict):
        return {n: tuple(self.array(x) for x in usv[n]) for n in specs}

    def sync(self, tree) -> None:
        self.mx.eval(tree)

    def unpack(self, state) -> dict:
        return {n: tuple(np.array(x) for x in t) for n, t in state.items()}

    def pack_scales(self, scales: dict):
        a = self.array
        return {n: (a(x[0]), a(x[1]), x[2]) if isinstance(x, tuple) else a(x)
                for n, x in scales.items()}

    def pack_bounds(self, bounds: dict):
        return {n: (self.array(u), self.array(d)) for n, (u, d) in bounds.items()}

    # -- model functions ---------------------------------------------------------------------

    def block_hidden(self, ids, am) -> list:
        hidden: list = []
        out = self.be._forward(self.spec, self.params.weights, ids, am, {}, {}, hidden=hidden)
        del out  # lazy: only the hidden states are evaluated
        self.mx.eval(hidden)
        return hidden

    def value_and_grad(self, state, scales, ids, am, labels, total):
        loss, grads = self._value_and_grad(state, self.params.weights, scales, ids, am, labels,
                                           self.mx.array(total, dtype=self.mx.float32))
        self.mx.eval(loss, grads)
        return loss, grads

    def example_s_grads_of(self, state, scales, ids, am, labels) -> dict:
        rows = ids.shape[0]
        s_b = {n: self.mx.zeros((rows, 1, s.shape[0])) for n, (_, s, _) in state.items()}
        uv = {n: (u, v) for n, (u, _, v) in state.items()}
        g = self._s_grads(s_b, uv, self.params.weights, scales, ids, am, labels)
        self.mx.eval(g)
        return {n: np.array(g[n]).reshape(rows, -1) for n in state}

    def example_sums(self, state, scales, ids, am, labels):
        nll, valid = self._sum_nll(state, self.params.weights, scales, ids, am, labels)
        sums, counts = nll.sum(axis=1), valid.sum(axis=1)
        self.mx.eval(sums, counts)
        return sums, counts

    def last_logits(self, state, scales, ids, am, pos: int) -> np.ndarray:
        logits = self.be._forward(self.spec, self.params.weights, ids, am, state, scales)
        return np.array(logits[0, pos].astype(self.mx.float32)).astype(np.float64)

    def dropout_keys(self, seed_words: list[int], n: int):
        seed = int(np.random.SeedSequence(seed_words).generate_state(1)[0])
        keys = self.mx.random.split(self.mx.random.key(seed), n)
        return [keys[i] for i in range(n)]

    def eigh(self, a):
        return self.mx.linalg.eigh(a, stream=self.mx.cpu)

    def frames(self, w, start: int, r: int, width: int):
        del width  # eager: nothing compiled to share between ranks
        return tail_frames(w, start, r, r, gathered_eigenpairs(self.eigh))

    def pack_per_adapter(self, values: dict):
        return {n: self.array(x) for n, x in values.items()}

    def replace_weights(self, weights: dict) -> None:
        """Swap the named weights (numpy) in this backend's copy of the model."""
        self.params.weights.update({k: self.array(v) for k, v in weights.items()})
        self.mx.eval(self.params.weights)

    def update_state(self, state, grads, eta, bounds):
        """One step on every adapter (``eta[name]`` its step), eagerly (MLX is lazy: one graph
        per step), with the telemetry of the JAX update: the largest orthogonality error of U and V and the
        largest c max(S) / sigma_k."""
        out, orth, ratio = {}, 0.0, 0.0
        for name, (u, s, v) in state.items():
            upper, decay = bounds[name]
            out[name] = nu, ns, nv = update_one(self.rule, u, s, v, *grads[name], eta[name],
                                                upper, decay)
            orth = max(orth, geometry.orthogonality_error(nu), geometry.orthogonality_error(nv))
            ratio = max(ratio, float(self.mx.abs(ns).max() / upper))
        return out, orth, ratio

    @staticmethod
    def grad_norm(grads):
        return grad_norm(grads)

    @staticmethod
    def add(a, b):
        return add_grads(a, b)

    def attach(self, specs: dict, init: str, seed: int, rule, frames: dict | None = None) -> None:
        self.rule = rule
        super().attach(specs, init, seed, rule, frames)
