"""The JAX ops of the derived trainer: the adapters stacked by module kind (zero-padded to the
kind's largest rank), so that each compiled program holds one layer's and one adapter's
operations whatever the model's depth (XLA's compile time grows with a program's operations)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from runner.derived.array_ops import (
    ArrayOps,
    add_grads,
    grad_norm,
    update_one,
)
from runner.derived.frames import gathered_eigenpairs, tail_frames
from runner.models.backends import jax_llama as be
from runner.models.backends.array_forward import token_nll
from runner.models.backends.jax_llama import layer_kinds


@functools.cache
def _jax_functions():
    """The jitted JAX functions, built once per process and reading: the model spec is static data of the
    ``JaxParams`` pytree, so each (spec, shapes) pair compiles once and is shared by every run.

    Why the adapters are stacked: XLA's CPU compiler turns every fusion into its own LLVM
    module, so compile time grows with the number of operations in a
    program, and a program over hundreds of adapters of different ranks has thousands. The forward is a scan over the
    layers (``jax_llama``) that takes the adapters stacked by module kind, the trainer's state
    is that stacked form, and the update steps the adapters of a kind by ``lax.map``: each
    program compiles one layer body and one adapter step per kind, whatever the depth."""
    def sum_nll(state, params, scales, ids, am, labels):
        logits = be._forward(params, ids, am, {}, {}, stacked=(state, scales))
        return token_nll(be.OPS, logits, labels)

    def loss(state, params, scales, ids, am, labels, total):
        nll, _ = sum_nll(state, params, scales, ids, am, labels)
        return nll.sum() / total

    def example_loss_sum(s_batched, state, params, scales, ids, am, labels):
        with_s = {k: (u, s_batched[k], v) for k, (u, _, v) in state.items()}
        nll, valid = sum_nll(with_s, params, scales, ids, am, labels)
        per = nll.sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1).astype(jnp.float32)
        return per.sum()

    def example_sums(state, params, scales, ids, am, labels):
        nll, valid = sum_nll(state, params, scales, ids, am, labels)
        return nll.sum(axis=1), valid.sum(axis=1)

    def last_logits(state, params, scales, ids, am, pos):
        logits = be._forward(params, ids, am, {}, {}, stacked=(state, scales))
        return jax.lax.dynamic_index_in_dim(logits[0], pos, axis=0, keepdims=False)

    def hidden_states(params, ids, am):
        hidden: list = []
        be._forward(params, ids, am, {}, {}, hidden=hidden)
        return hidden

    def frames(w, start, r, width):
        return tail_frames(w, start, r, width, gathered_eigenpairs(jnp.linalg.eigh))

    return SimpleNamespace(
        value_and_grad=jax.jit(jax.value_and_grad(loss)),
        s_grads=jax.jit(jax.grad(example_loss_sum)),
        example_sums=jax.jit(example_sums),
        last_logits=jax.jit(last_logits),
        hidden_states=jax.jit(hidden_states),
        frames=jax.jit(frames, static_argnames="width"),
        grad_norm=jax.jit(grad_norm),
        add=jax.jit(add_grads),
    )




@functools.cache
def _jax_update(rule):
    """The jitted update of every adapter under ``rule`` (one compilation per reading)."""
    return jax.jit(functools.partial(_update_kinds, rule))


@dataclass(frozen=True)
class _JaxLayout:
    """Where each adapter sits in the JAX state: ``kinds[kind] = (names, r)``, ``names[j]`` the
    adapter (or None) of the j-th layer having that module kind (``jax_llama.layer_kinds``),
    r the kind's largest rank; ``ranks[name]``."""

    kinds: dict
    ranks: dict

    @classmethod
    def of(cls, spec, specs: dict) -> _JaxLayout:
        where = {}
        for name in specs:
            _, _, i, kind = name.split(".", 3)
            where.setdefault(kind, {})[int(i)] = name
        kinds = {}
        for kind, layers in layer_kinds(spec).items():
            if kind in where:
                names = tuple(where[kind].get(i) for i in layers)
                kinds[kind] = (names, max(specs[n].rank for n in names if n is not None))
        return cls(kinds, {n: s.rank for n, s in specs.items()})

    def stack(self, per_name: dict, fill) -> dict:
        """``{kind: np.stack over the kind's layers}`` of the host arrays ``per_name[name]``,
        their last axis zero-padded to the kind's rank r; ``fill(kind, r)`` where a layer has
        no adapter of that kind."""
        out = {}
        for kind, (names, r) in self.kinds.items():
            rows = []
            for n in names:
                x = fill(kind, r) if n is None else np.asarray(per_name[n])
                rows.append(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, r - x.shape[-1])]))
            out[kind] = np.stack(rows)
        return out




class JaxOps(ArrayOps):
    name = "jax"

    def __init__(self, model):
        self.jax, self.jnp, self.be = jax, jnp, be
        super().__init__(model)
        self.layout: _JaxLayout | None = None
        fns = _jax_functions()
        self._value_and_grad, self._s_grads = fns.value_and_grad, fns.s_grads
        self._example_sums, self._hidden = fns.example_sums, fns.hidden_states
        self._last_logits = fns.last_logits
        self._frames = fns.frames
        self.grad_norm, self.add = fns.grad_norm, fns.add

    def attach(self, specs: dict, init: str, seed: int, rule, frames: dict | None = None) -> None:
        self._update = _jax_update(rule)
        super().attach(specs, init, seed, rule, frames)

    def array(self, x, dtype="float32"):
        return self.jnp.asarray(np.asarray(x), dtype=getattr(self.jnp, dtype))

    def numpy(self, x):
        return np.asarray(x)

    def float64(self):
        """JAX runs without x64 (float32 everywhere, as torch's training); the derivation turns
        it on in this thread so that its spectra are float64 like torch's (the Gram product
        stays float32, ``spectrum="gram_input"``): a float32 eigenvalue of the Gram matrix
        carries an error ~ eps32 * s_1^2, enough to move an effective rank past the parity
        bound."""
        return self.jax.enable_x64(True)

    # -- the stacked state -----------------------------------------------------------------

    def pack_usv(self, usv: dict, specs: dict):
        """The stacked state of ``usv[name] = (U, S, V)``: per kind (U (n, out, r), S (n, r),
        V (n, in, r)), zero where a layer has no adapter of the kind and past an adapter's rank."""
        self.layout = lay = _JaxLayout.of(self.spec, specs)
        w = self.params.weights
        kinds = self.be.layer_kinds(self.spec)

        def shape(kind):
            return w[f"model.layers.{kinds[kind][0]}.{kind}.weight"].shape

        u = lay.stack({n: t[0] for n, t in usv.items()},
                      lambda k, r: np.zeros((shape(k)[0], r), np.float32))
        s = lay.stack({n: t[1] for n, t in usv.items()}, lambda k, r: np.zeros(r, np.float32))
        v = lay.stack({n: t[2] for n, t in usv.items()},
                      lambda k, r: np.zeros((shape(k)[1], r), np.float32))
        return {k: (self.array(u[k]), self.array(s[k]), self.array(v[k])) for k in lay.kinds}

    def unpack(self, state) -> dict:
        out = {}
        for kind, (names, _) in self.layout.kinds.items():
            u, s, v = (np.asarray(x) for x in state[kind])
            for j, n in enumerate(names):
                if n is not None:
                    r = self.layout.ranks[n]
                    out[n] = (u[j, :, :r], s[j, :r], v[j, :, :r])
        return out

    def pack_scales(self, scales: dict):
        """Per kind c (n,), or (c, keep, keys) where an adapter of the kind has dropout; layers
        without an adapter: c = 0, keep = 1 (a mask that keeps everything)."""
        out = {}
        for kind, (names, _) in self.layout.kinds.items():
            vals = [scales.get(n) for n in names]
            c = np.array([0.0 if x is None else float(x[0] if isinstance(x, tuple) else x)
                          for x in vals], np.float32)
            if not any(isinstance(x, tuple) for x in vals):
                out[kind] = self.array(c)
                continue
            keep = np.array([x[1] if isinstance(x, tuple) else 1.0 for x in vals], np.float32)
            keys = np.stack([np.asarray(x[2]) if isinstance(x, tuple) else np.zeros(2, np.uint32)
                             for x in vals])
            out[kind] = (self.array(c), self.array(keep), self.jnp.asarray(keys))
        return out

    def pack_bounds(self, bounds: dict):
        """Per kind (upper (n,), decay (n,), ranks (n,)); layers without an adapter: 1, 0, 0."""
        out = {}
        for kind, (names, _) in self.layout.kinds.items():
            b = [bounds.get(n, (1.0, 0.0)) for n in names]
            ranks = [0 if n is None else self.layout.ranks[n] for n in names]
            out[kind] = (self.array([x[0] for x in b]), self.array([x[1] for x in b]),
                         self.array(ranks, "int32"))
        return out

    # -- model functions ---------------------------------------------------------------------

    def block_hidden(self, ids, am) -> list:
        return self._hidden(self.params, ids, am)

    def value_and_grad(self, state, scales, ids, am, labels, total):
        return self._value_and_grad(state, self.params, scales, ids, am, labels,
                                    self.jnp.float32(total))

    def example_s_grads_of(self, state, scales, ids, am, labels) -> dict:
        rows = ids.shape[0]
        s_b = {k: self.array(np.zeros((u.shape[0], rows, 1, u.shape[2])))
               for k, (u, _, _) in state.items()}
        g = self._s_grads(s_b, state, self.params, scales, ids, am, labels)
        out = {}
        for kind, (names, _) in self.layout.kinds.items():
            gk = np.asarray(g[kind])  # (n, rows, 1, r)
            for j, n in enumerate(names):
                if n is not None:
                    out[n] = gk[j, :, 0, :self.layout.ranks[n]]
        return out

    def example_sums(self, state, scales, ids, am, labels):
        return self._example_sums(state, self.params, scales, ids, am, labels)

    def last_logits(self, state, scales, ids, am, pos: int) -> np.ndarray:
        """The logits at position ``pos`` of the first row, float64 numpy (V,)."""
        row = self._last_logits(state, self.params, scales, ids, am, self.jnp.int32(pos))
        return np.asarray(row, np.float64)

    def update_state(self, state, grads, eta, bounds):
        return self._update(state, grads, eta, bounds)

    def pack_per_adapter(self, values: dict):
        """Per kind (n,): the value of each layer's adapter of the kind (0 where none)."""
        return {kind: self.array([0.0 if n is None else values[n] for n in names])
                for kind, (names, _) in self.layout.kinds.items()}

    def replace_weights(self, weights: dict) -> None:
        """Swap the named weights (numpy) in this backend's copy of the model (and, for the
        scanned Llama forward, in the weights stacked over the layers)."""
        w = dict(self.params.weights)
        w.update({k: self.array(v) for k, v in weights.items()})
        stacked = self.params.stacked
        if stacked is not None:
            stacked = {k: self.jnp.stack([w[f"model.layers.{i}.{k}"]
                                          for i in range(self.spec.num_layers)])
                       for k in stacked}
        self.params = type(self.params)(w, self.spec, stacked)

    def dropout_keys(self, seed_words: list[int], n: int):
        seed = int(np.random.SeedSequence(seed_words).generate_state(1)[0])
        return np.asarray(self.jax.random.split(self.jax.random.PRNGKey(seed), n))

    def eigh(self, a):
        return self.jnp.linalg.eigh(a)

    def frames(self, w, start: int, r: int, width: int):
        """:func:`tail_frames` compiled once per (weight shape, width): ``width`` is the largest
        rank among the adapters of this weight shape; the result is cut to r columns (numpy)."""
        u, v = self._frames(w, self.jnp.int32(start), self.jnp.int32(r), width)
        return np.asarray(u)[:, :r], np.asarray(v)[:, :r]




def _update_kinds(rule, state, grads, eta, bounds):
    """:func:`update_one` on every adapter of the JAX state (stacked by module kind, zero-padded
    to the kind's rank; ``eta[kind]`` each layer's step, ``bounds[kind] = (upper, decay,
    ranks)``), by ``lax.map`` over each
    kind's layers. Zero columns stay zero and change nothing else: with X = [X_r, 0] and
    D = [D_r, 0] the Cayley r x r matrix K's extra rows and columns are the identity's, and a
    zero S entry with zero gradient stays 0 (a layer without an adapter is all zero columns).
    ``lax.map``, not ``vmap``: a vmapped ``inv`` is a batched LU, whose batched LAPACK
    kernels can deadlock when two run at once on a small CPU pool. Returns the new state, the largest orthogonality error ||X^T X - I_r||_F of any
    U or V over its r real columns (``geometry.orthogonality_error``), and the largest
    c max(S) / sigma_k (= max(S) / upper)."""
    out, orth, ratio = {}, [], []
    for kind, (u, s, v) in state.items():
        upper, decay, ranks = bounds[kind]

        def one(a):
            return update_one(rule, *a[:6], a[6], a[7], a[8])

        nu, ns, nv = jax.lax.map(one, (u, s, v, *grads[kind], eta[kind], upper, decay))
        r = u.shape[2]
        mask = (jnp.arange(r)[None, :] < ranks[:, None]).astype(u.dtype)
        ident = mask[:, :, None] * jnp.eye(r, dtype=u.dtype)  # diag(1 on the real columns)
        for x in (nu, nv):
            d = jnp.matmul(jnp.swapaxes(x, 1, 2), x) - ident
            orth.append(jnp.max(jnp.sqrt(jnp.sum(d * d, axis=(1, 2)))))
        ratio.append(jnp.max(jnp.max(jnp.abs(ns), axis=1) / upper))
        out[kind] = (nu, ns, nv)
    return out, jnp.max(jnp.stack(orth)), jnp.max(jnp.stack(ratio))


