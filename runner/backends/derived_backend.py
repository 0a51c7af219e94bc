"""trainer=derived on ``hardware.backend`` = mlx or jax: derivation, training and evaluation in
the backend, with the same geometry/ functions as the torch trainer (runner/tasks/derived.py,
runner/trainers/derived.py).

torch is used only to load the weights, the tokenizer and the data (``runner.models``,
``runner.data``), and at the end to export the trained factors as PEFT LoRA through the
torch model (``export_peft``: B = c U diag(S), A = V^T, lora_alpha = r). Everything else runs
on backend arrays:

1. rows 1-7 and 9-14: ``geometry.derive_hyperparameters`` on the backend's weight arrays, with
   float64 spectra as torch's (MLX: on its CPU stream; JAX: x64 switched on for the
   derivation's thread only, ``_JaxOps.float64``; the Gram products stay float32 as torch's);
2. row 15, residual scales: the backend forward's decoder-block inputs/outputs on the same
   calibration batch as torch, then ``geometry.residual_scale``;
3. the frames U, V: W's singular vectors k..k+r-1 from the backend's ``eigh`` (float32, as the
   torch trainer), both sides re-orthonormalised by QR (:func:`_tail_frames`); S = 0;
4. row 8, the gradient noise scale: per-example gradients of the answer-token loss with respect
   to S, from one backward per micro-batch (S is given a batch axis, so autodiff returns each
   example's gradient; the torch trainer gets the same numbers from a closed form at S = 0),
   then ``geometry.gradient_noise_scale``;
5. each step: loss and gradients from the backend forward (micro-batched, summed cross-entropy
   over the batch's answer tokens / ``batch.n_tokens`` as the torch trainer), the gradient
   norm, ``geometry.mass_step_size``, ``geometry.cayley_retract`` for U and V, the S clamp to
   [0, sigma_k / c] and the decoupled decay (1 - eta sigma_k / sigma_max);
6. evaluation: per-example summed next-token cross-entropy of the validation (and retention)
   examples in the backend (``runner.training.example_losses`` semantics).

The adapters live in each backend's own layout (``_Ops.pack``/``unpack``). MLX is eager and
keeps them by module name. JAX keeps them stacked by module kind, zero-padded to the kind's
largest rank (:class:`_JaxLayout`), because XLA compiles every operation of a jitted program
into its own CPU kernel: with one (U, S, V) per module, SmolLM2-135M's 210 adapters of 210
ranks made the loss gradient compile in 34 s and the update in 100 s (over 3 minutes of set-up
in all). Stacked, the forward is a scan over the layers and the update a ``lax.map`` per kind,
so each program holds one layer's and one adapter's operations whatever the depth: the whole
JAX set-up of SmolLM2 (derivation included) takes ~60 s on one CPU thread, 29 s of it
compiling (127 compilations; the loss gradient 9 s, the per-example S gradients 6 s).

MLX on Linux: the ``mlx[cpu]`` wheel's BLAS is the reference one (25x slower than an optimised
sgemm); ``runner.backends.mlx_blas`` makes MLX call torch's instead, and the MLX cross-entropy
sums its 49,152-way log-sum-exp in two levels (``mlx_models.logsumexp``), since MLX's CPU
reductions add sequentially.

Adapter dropout (the derived per-matrix rate, row 13) is inverted dropout on the adapter
branch's input, as the torch hook does, with masks from the backend's PRNG seeded by
(seed, step, micro-batch): the masks are reproducible within a backend but are not torch's.

Parity with torch (tests/test_backend_training.py): initial logits, every derived value to
relative 1e-4, and the first 10 losses, on the tiny models and SmolLM2-135M.

The loop is ``runner.training.train_loop``, as on torch: the same batches, evaluations,
divergence stop, checkpoints (the adapters, their last update and the step count, as torch
tensors; a resumed run ends bitwise where an uninterrupted one does) and the geometric stopping
certificate (``runner.trainers.derived.CertificateMonitor``, which asks this trainer for
greedy-generation statistics and the validation curvature along the last update).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

import geometry
from geometry._xp import namespace

DTYPE_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Backend operations: the few things that differ between MLX and JAX


class _Ops:
    """A float32 copy of a torch model's weights on a backend, and what training needs there.

    The adapters live in a backend-specific *state* (``pack`` builds it from frames by module
    name, ``unpack`` returns numpy (U, S, V) by name): MLX keeps ``{name: (U, S, V)}`` and runs
    eagerly; JAX keeps them stacked by module kind (:class:`_JaxLayout`) so that no compiled
    function holds a per-adapter operation. On that state: ``value_and_grad`` (summed
    answer-token CE / total, and its gradients, in the state's layout), ``example_s_grads``
    (per-example gradients with respect to S at S = 0), ``example_sums`` (per-example summed CE
    and label counts), ``update`` (one derived step on every adapter, with the orthogonality
    and S-ratio telemetry), ``grad_norm`` and ``add``; and ``block_hidden`` (decoder-block
    inputs/outputs), ``frames`` (initial U, V), ``dropout_keys``, ``array``/``numpy``."""

    name: str
    be: Any  # the backend module (runner.backends.jax_llama / mlx_models)

    def __init__(self, model):
        self.params = self.be.params_from_torch(model.state_dict(), model.config)
        self.spec = self.params.spec
        self.width: int | None = None  # JAX: pad every batch to this many positions

    def weights(self) -> dict[str, Any]:
        return self.params.weights

    def float64(self):
        """A context in which the backend computes float64 spectra (MLX: always, on its CPU
        stream)."""
        return contextlib.nullcontext()

    def sync(self, tree) -> None:
        """Compute a lazily built state now (MLX); JAX arrays are already values."""

    def pack(self, specs: dict, frames: dict):
        """The state of fresh adapters: U, V from ``frames[name]``, S = 0."""
        return self.pack_usv({n: (frames[n][0], np.zeros(specs[n].rank, np.float32), frames[n][1])
                              for n in specs}, specs)


@functools.cache
def _jax_functions():
    """The jitted JAX functions, built once per process: the model spec is static data of the
    ``JaxParams`` pytree, so each (spec, shapes) pair compiles once and is shared by every run.

    Why the adapters are stacked: XLA's CPU compiler turns every fusion into its own LLVM
    module (~50 ms each here), so compile time grows with the number of operations in a
    program, and a program over 210 adapters of 210 ranks has thousands (the loss gradient of
    SmolLM2-135M compiled in 34 s, the update in 100 s). The forward is a scan over the
    layers (``jax_llama``) that takes the adapters stacked by module kind, the trainer's state
    is that stacked form, and the update steps the adapters of a kind by ``lax.map``: each
    program compiles one layer body and one adapter step per kind, whatever the depth."""
    import jax
    import jax.numpy as jnp

    from runner.backends import jax_llama as be

    def sum_nll(state, params, scales, ids, am, labels):
        logits = be._forward(params, ids, am, {}, {}, stacked=(state, scales))
        return _per_token_nll(jnp, jax.nn.logsumexp, jnp.take_along_axis, logits, labels)

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
        return _tail_frames(w, start, r, width, jnp.linalg.eigh)

    return SimpleNamespace(
        value_and_grad=jax.jit(jax.value_and_grad(loss)),
        s_grads=jax.jit(jax.grad(example_loss_sum)),
        example_sums=jax.jit(example_sums),
        last_logits=jax.jit(last_logits),
        hidden_states=jax.jit(hidden_states),
        frames=jax.jit(frames, static_argnames="width"),
        update=jax.jit(_update_kinds),
        grad_norm=jax.jit(_grad_norm),
        add=jax.jit(_add_grads),
    )


@dataclass(frozen=True)
class _JaxLayout:
    """Where each adapter sits in the JAX state: ``kinds[kind] = (names, r)``, ``names[j]`` the
    adapter (or None) of the j-th layer having that module kind (``jax_llama.layer_kinds``),
    r the kind's largest rank; ``ranks[name]``."""

    kinds: dict
    ranks: dict

    @classmethod
    def of(cls, spec, specs: dict) -> _JaxLayout:
        from runner.backends.jax_llama import layer_kinds

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


class _JaxOps(_Ops):
    name = "jax"

    def __init__(self, model):
        import jax
        import jax.numpy as jnp

        from runner.backends import jax_llama

        self.jax, self.jnp, self.be = jax, jnp, jax_llama
        super().__init__(model)
        fns = _jax_functions()
        self._value_and_grad, self._s_grads = fns.value_and_grad, fns.s_grads
        self._example_sums, self._hidden = fns.example_sums, fns.hidden_states
        self._last_logits = fns.last_logits
        self._frames, self._update = fns.frames, fns.update
        self.grad_norm, self.add = fns.grad_norm, fns.add
        self.layout: _JaxLayout | None = None

    def array(self, x, dtype="float32"):
        return self.jnp.asarray(np.asarray(x), dtype=getattr(self.jnp, dtype))

    def numpy(self, x):
        return np.asarray(x)

    def float64(self):
        """JAX runs without x64 (float32 everywhere, as torch's training); the derivation turns
        it on in this thread so that its spectra are float64 like torch's (the Gram product
        stays float32, ``spectrum="gram_input"``, and only its eigenvalues are float64): in
        float32 an eigenvalue of the Gram matrix carries an error ~ eps32 * s_1^2, which moved
        the effective rank of SmolLM2-135M's layer-0 q_proj by 2.2e-4 relative (243.67
        against 243.72), over the 1e-4 parity bound."""
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

    def example_s_grads(self, state, scales, ids, am, labels) -> dict:
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

    def update(self, state, grads, eta, bounds):
        return self._update(state, grads, eta, bounds)

    def dropout_keys(self, seed_words: list[int], n: int):
        seed = int(np.random.SeedSequence(seed_words).generate_state(1)[0])
        return np.asarray(self.jax.random.split(self.jax.random.PRNGKey(seed), n))

    def eigh(self, a):
        return self.jnp.linalg.eigh(a)

    def frames(self, w, start: int, r: int, width: int):
        """:func:`_tail_frames` compiled once per (weight shape, width): ``width`` is the largest
        rank among the adapters of this weight shape; the result is cut to r columns (numpy)."""
        u, v = self._frames(w, self.jnp.int32(start), self.jnp.int32(r), width)
        return np.asarray(u)[:, :r], np.asarray(v)[:, :r]


class _MlxOps(_Ops):
    name = "mlx"

    def __init__(self, model):
        import mlx.core as mx

        from runner.backends import mlx_models

        self.mx, self.be = mx, mlx_models
        super().__init__(model)
        spec, be = self.spec, mlx_models

        def take(a, idx, axis):
            return mx.take_along_axis(a, idx, axis=axis)

        def sum_nll(usv, weights, scales, ids, am, labels):
            logits = be._forward(spec, weights, ids, am, usv, scales)
            return _per_token_nll(mx, be.logsumexp, take, logits, labels)

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

    def example_s_grads(self, state, scales, ids, am, labels) -> dict:
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
        return _tail_frames(w, start, r, r, self.eigh)

    @staticmethod
    def update(state, grads, eta, bounds):
        """One step on every adapter, eagerly (MLX is lazy: one graph per step), with the
        telemetry of :func:`_update_kinds`: the largest orthogonality error of U and V and the
        largest c max(S) / sigma_k."""
        out, orth, ratio = {}, 0.0, 0.0
        for name, (u, s, v) in state.items():
            upper, decay = bounds[name]
            out[name] = nu, ns, nv = _update_one(u, s, v, *grads[name], eta, upper, decay)
            orth = max(orth, geometry.orthogonality_error(nu), geometry.orthogonality_error(nv))
            ratio = max(ratio, float(ns.max() / upper))
        return out, orth, ratio

    @staticmethod
    def grad_norm(grads):
        return _grad_norm(grads)

    @staticmethod
    def add(a, b):
        return _add_grads(a, b)


def _per_token_nll(xp, logsumexp, take_along_axis, logits, labels):
    """(nll, valid): next-token cross-entropy per position (B, T-1), 0 where the label is -100."""
    lg = logits[:, :-1, :].astype(xp.float32)
    lb = labels[:, 1:]
    valid = lb != IGNORE
    safe = xp.where(valid, lb, 0)
    tgt = take_along_axis(lg, safe[..., None], axis=-1)[..., 0]
    nll = xp.where(valid, logsumexp(lg, axis=-1) - tgt, 0.0)
    return nll, valid


def make_ops(backend: str, model) -> _Ops:
    """The backend's operations on a copy of ``model``'s weights (float32)."""
    if backend == "jax":
        return _JaxOps(model)
    if backend == "mlx":
        return _MlxOps(model)
    raise ValueError(f"unknown backend {backend!r} (mlx or jax)")


# ---------------------------------------------------------------------------------------------
# Batches on the backend


def _bucket(n: int, step: int = 32) -> int:
    return max(step, -(-n // step) * step)


def to_backend_batch(ops: _Ops, input_ids, attention_mask, labels, *, rows: int | None = None):
    """Backend arrays (ids, mask, labels) of a right-padded torch batch; for JAX, padded further
    to ``ops.width`` positions (the longest example of the run rounded up to a multiple of 8,
    set by the set-up; else a multiple of 32) and to ``rows`` rows, so one compiled function
    serves all batches. Extra right padding changes nothing: attention is causal, the padded
    positions carry label -100, and a padded row has no label at all."""
    ids, am, lab = (np.asarray(t) for t in (input_ids, attention_mask, labels))
    if ops.name == "jax":
        b, t = ids.shape
        rows = max(rows or b, b)
        width = ops.width if ops.width is not None and ops.width >= t else _bucket(t)
        ids = np.pad(ids, ((0, rows - b), (0, width - t)))
        am = np.pad(am, ((0, rows - b), (0, width - t)))
        lab = np.pad(lab, ((0, rows - b), (0, width - t)), constant_values=IGNORE)
    return ops.array(ids, "int32"), ops.array(am, "int32"), ops.array(lab, "int32")


# ---------------------------------------------------------------------------------------------
# Set-up: derive, calibrate, attach, measure the noise scale


def candidate_weights(ops: _Ops) -> dict[str, Any]:
    """Every Linear weight inside the decoder blocks, in the torch trainer's order (named_modules
    order: the order of ``runner.backends.module_names``), as backend arrays."""
    from runner.backends import module_names

    w = ops.weights()
    return {n: w[n + ".weight"] for n in module_names(ops.spec)
            if ".layers." in n and n + ".weight" in w}


def derive_for_backend(ops: _Ops, n_train: int, batches_per_epoch: int, dtype: str,
                       erank_variant: str) -> geometry.DerivedHyperparameters:
    """Rows 1-7 and 9-14 from the backend's weight arrays (``runner.tasks.derived.derive_for_model``
    on torch), with float64 spectra (``_Ops.float64``), one matrix at a time: MLX's streams are
    not shared by threads, and JAX's float64 switch is per thread."""
    with ops.float64():
        return geometry.derive_hyperparameters(
            candidate_weights(ops), n_train=n_train, batches_per_epoch=batches_per_epoch,
            dtype_eps=DTYPE_EPS[dtype], erank_variant=erank_variant, workers=1,
        )


def residual_scales(ops: _Ops, blocks: list[str], calib) -> dict[str, geometry.Derived]:
    """sigma_max(x) / sigma_max(f(x)) per decoder block on a calibration batch (row 15), from
    the backend forward's block inputs x and outputs x + f(x) at the non-padding tokens."""
    ids, am, _ = to_backend_batch(ops, calib.input_ids, calib.attention_mask, calib.labels)
    hidden = ops.block_hidden(ids, am)
    rows = np.flatnonzero(np.asarray(am).reshape(-1) != 0)
    index = ops.array(rows, "int32")
    xp = namespace(hidden[0])
    out = {}
    with ops.float64():
        dt = geometry._xp.work_dtype(hidden[0])
        for name in blocks:
            i = int(name.rsplit(".", 1)[1])
            x, y = hidden[i], hidden[i + 1]
            d = x.shape[-1]
            x2 = xp.take(xp.reshape(x, (-1, d)), index, axis=0)
            y2 = xp.take(xp.reshape(y, (-1, d)), index, axis=0)
            x2, f2 = xp.astype(x2, dt), xp.astype(y2, dt) - xp.astype(x2, dt)  # residual branch
            out[name] = geometry.residual_scale(x2, f2)
    return out


def _tail_frames(w, start, r, width: int, eigh):
    """Left/right singular vectors start..start+r-1 (descending) of ``w``, orthonormal, in
    ``width`` >= r columns of which those after the first r are zero: the backend version of
    ``runner.trainers.derived.singular_frames`` (float32 eigh of the smaller Gram matrix, the
    other side W V / s, both sides re-orthonormalised by QR with R's diagonal made positive).
    ``start`` and ``r`` may be traced (JAX compiles this once per weight shape and width): the
    eigenvectors are gathered by index and the columns from r on masked to zero, which leaves
    the first r columns of each QR factor those of the r-column problem (Householder QR
    builds column j from columns <= j only). Eigenvector signs may differ from torch's; a sign
    flip of a (u_j, v_j) pair changes neither dW nor any later step (the Cayley retraction is
    equivariant under X -> X D, D = diag(+-1))."""
    xp = namespace(w)
    m, n = w.shape
    tall = m >= n
    wt = xp.matrix_transpose(w)
    gram = xp.matmul(wt, w) if tall else xp.matmul(w, wt)
    lam, vecs = eigh(gram)  # ascending
    q = gram.shape[0]
    j = xp.arange(width)
    valid = j < r
    cols = xp.clip(q - 1 - start - j, 0, q - 1)  # column q-1-start-j: descending from start
    zero = xp.zeros((q, width), dtype=w.dtype)
    small_side = xp.where(valid, xp.take(vecs, cols, axis=1), zero)
    s = xp.sqrt(xp.clip(xp.take(lam, cols, axis=0), min=0.0))
    tiny = float(np.finfo(np.float32).tiny)
    other = (xp.matmul(w, small_side) if tall else xp.matmul(wt, small_side)) / xp.clip(s, min=tiny)
    small_side, other = _orthonormal(small_side, valid), _orthonormal(other, valid)
    return (other, small_side) if tall else (small_side, other)


def _orthonormal(x, valid):
    """The Q factor of x = QR with R's diagonal made positive, its columns outside ``valid``
    zeroed (``runner.trainers.derived._orthonormal``)."""
    xp = namespace(x)
    qq, rr = xp.linalg.qr(x)
    d = xp.sum(rr * xp.eye(rr.shape[0], dtype=rr.dtype), axis=0)  # diag(R)
    sign = xp.where(d < 0, -xp.ones_like(d), xp.ones_like(d))
    return xp.where(valid, qq * sign, xp.zeros_like(qq))


def singular_frames(ops: _Ops, w, start: int, r: int, width: int | None = None):
    """U (out x r), V (in x r): singular vectors start..start+r-1 of ``w`` (:func:`_tail_frames`);
    ``width``: the largest rank among adapters of ``w``'s shape (one JAX compilation for all)."""
    return ops.frames(w, start, r, max(width or r, r))


def initial_frames(ops: _Ops, w, spec, init: str, seed: int, width: int | None = None):
    """U (out x r), V (in x r) as ``runner.trainers.derived.initial_frames``: W's singular vectors
    k..k+r-1 (``tail``), the top r (``top``), or a random orthonormal pair (``random``: drawn by
    numpy from ``seed``, so not the torch generator's draw)."""
    r = spec.rank
    if init == "random":
        rng = np.random.default_rng(seed)
        u = np.linalg.qr(rng.standard_normal((w.shape[0], r)))[0]
        v = np.linalg.qr(rng.standard_normal((w.shape[1], r)))[0]
        return ops.array(u), ops.array(v)
    start = 0 if init == "top" else spec.first_index
    start = min(start, min(w.shape) - r)
    return singular_frames(ops, w, start, r, width)


@dataclass
class BackendAdapters:
    """U diag(S) V^T adapters in the backend's state (``_Ops.pack``), with their specs by module
    name; ``U``, ``S``, ``V``: numpy copies by name (``_Ops.unpack``)."""

    specs: dict  # name -> runner.trainers.derived.AdapterSpec
    ops: _Ops
    state: Any

    def usv(self) -> dict:
        return self.ops.unpack(self.state)

    @property
    def U(self) -> dict:
        return {n: t[0] for n, t in self.usv().items()}

    @property
    def S(self) -> dict:
        return {n: t[1] for n, t in self.usv().items()}

    @property
    def V(self) -> dict:
        return {n: t[2] for n, t in self.usv().items()}


def attach(ops: _Ops, derived, scales: dict[str, float], init: str, seed: int) -> BackendAdapters:
    from runner.trainers.derived import AdapterSpec, block_of

    weights = candidate_weights(ops)
    targets = [g for g in derived.layers if g.target]
    widths: dict[tuple, int] = {}  # weight shape -> largest rank (the frames' padded width)
    for g in targets:
        shape = tuple(weights[g.name].shape)
        widths[shape] = max(widths.get(shape, 0), g.rank)
    specs, frames = {}, {}
    for g in targets:
        spec = AdapterSpec(name=g.name, rank=g.rank, dropout=g.dropout, sigma_k=g.sigma_k,
                           decay=g.weight_decay, first_index=g.init_range[0],
                           scale=scales[block_of(g.name)])
        specs[g.name] = spec
        w = weights[g.name]
        frames[g.name] = initial_frames(ops, w, spec, init, seed, widths[tuple(w.shape)])
    return BackendAdapters(specs, ops, ops.pack(specs, frames))


def adapter_scales(ops: _Ops, adapters: BackendAdapters, *, train: bool, seed: int,
                   step: int, micro: int):
    """Per adapter c, or (c, keep, key) where training applies the adapter's dropout, in the
    backend's layout (``_Ops.pack_scales``); the keys come from (seed, step, micro-batch), step
    -1 being the noise-scale probe."""
    names = list(adapters.specs)
    keys = ops.dropout_keys([seed, step + 1, micro], len(names)) if train else None
    out = {}
    for i, name in enumerate(names):
        spec = adapters.specs[name]
        if train and spec.dropout > 0:
            out[name] = (spec.scale, 1.0 - spec.dropout, keys[i])
        else:
            out[name] = spec.scale
    return ops.pack_scales(out)


def measure_noise_scale(ops: _Ops, adapters: BackendAdapters, examples, pad_id: int,
                        n_train: int, n_probe: int, micro_batch: int, seed: int):
    """McCandlish et al. (2018) estimator from per-example gradients with respect to S (row 8),
    as ``runner.trainers.derived.measure_noise_scale``: |G_1|^2 = mean_i |g_i|^2 and
    |G_n|^2 = |mean_i g_i|^2 over the first ``n_probe`` training examples. At S = 0 the
    gradients with respect to U and V vanish, so g_i is the gradient with respect to S.
    Each example's S gets its own row (S of shape (B, 1, r) broadcasts in the adapter branch),
    so one backward of sum_i L_i per micro-batch yields every example's gradient."""
    from runner.data import collate

    n_probe = min(n_probe, len(examples))
    if n_probe < 2:
        raise ValueError(f"the noise-scale probe needs >= 2 training examples (got {n_probe})")
    rows = []
    for j, i in enumerate(range(0, n_probe, micro_batch)):
        batch = collate(list(examples[i:i + micro_batch]), pad_id=pad_id)
        b = batch.input_ids.shape[0]
        ids, am, lab = to_backend_batch(ops, batch.input_ids, batch.attention_mask, batch.labels,
                                        rows=micro_batch)
        scales = adapter_scales(ops, adapters, train=True, seed=seed, step=-1, micro=j)
        g = ops.example_s_grads(adapters.state, scales, ids, am, lab)
        rows.append(np.concatenate([g[n] for n in adapters.specs], axis=1)[:b].astype(np.float64))
    grads = np.concatenate(rows)[:n_probe]
    single_sq = float((grads * grads).sum()) / n_probe
    mean_sq = float((grads.mean(axis=0) ** 2).sum())
    biased = (geometry.per_sample_noise_scale(single_sq, mean_sq, n_probe)
              if mean_sq > 0 else math.nan)
    return geometry.gradient_noise_scale(single_sq, mean_sq, 1, n_probe, n_train=n_train,
                                         b_max=n_probe, b_biased=biased)


@dataclass
class BackendSetup:
    trainer: BackendDerivedTrainer
    derived: geometry.DerivedHyperparameters
    noise: geometry.NoiseScale
    derive_seconds: float
    setup_seconds: float


def setup_backend_derived(cfg, ops: _Ops, splits, pad_id: int, console=None) -> BackendSetup:
    """Steps 1-5 of ``runner.tasks.derived.setup_derived``, on the backend."""
    from runner.data import collate
    from runner.tasks.derived import with_measured_records
    from runner.trainers.derived import block_of

    tcfg, n_train = cfg.trainer, len(splits.train)
    ops.width = _bucket(max(len(e.input_ids) for part in (splits.train, splits.val,
                                                          splits.retention) for e in part), 8)
    started = time.perf_counter()
    derived = derive_for_backend(ops, n_train, math.ceil(n_train / tcfg.micro_batch),
                                 _value(cfg.hardware.dtype), tcfg.erank_variant)
    derive_seconds = time.perf_counter() - started

    calib = collate(list(splits.train[:tcfg.micro_batch]), pad_id=pad_id)
    blocks = sorted({block_of(g.name) for g in derived.layers if g.target})
    scales = {b: float(r.value) for b, r in residual_scales(ops, blocks, calib).items()}

    adapters = attach(ops, derived, scales, _value(tcfg.init), cfg.seed)
    noise = measure_noise_scale(ops, adapters, splits.train, pad_id, n_train,
                                tcfg.noise_examples, tcfg.micro_batch, cfg.seed)
    batch_size = noise.b_crit
    derived = with_measured_records(derived, n_train, noise, scales, blocks)
    records = derived.records
    if console is not None:
        ranks = [s.rank for s in adapters.specs.values()]
        console.print(f"derived ({ops.name}): {len(ranks)} target matrices, ranks {min(ranks)}-"
                      f"{max(ranks)}, batch {batch_size} (B_simple {noise.b_simple:.1f}), MASS "
                      f"ceiling {records[1].value:.3g}, derived in {derive_seconds:.2f}s")
    trainer = BackendDerivedTrainer(ops, adapters, derived, batch_size, tcfg.micro_batch,
                                    ceiling=float(records[1].value),
                                    floor=float(records[2].value), seed=cfg.seed)
    if ops.name == "jax":  # compile the step's functions now: set-up time, not training time
        trainer.warm_up(collate(list(splits.train[:min(batch_size, tcfg.micro_batch)]),
                                pad_id=pad_id))
    setup_seconds = time.perf_counter() - started
    return BackendSetup(trainer, derived, noise, derive_seconds, setup_seconds)


def _value(x) -> str:
    return getattr(x, "value", x)


# ---------------------------------------------------------------------------------------------
# The trainer


class BackendDerivedTrainer:
    """``runner.trainers.derived.DerivedTrainer.step`` on backend arrays: Riemannian SGD on U, V
    (Cayley retraction), projected SGD with decoupled decay on S, MASS step sizes."""

    def __init__(self, ops: _Ops, adapters: BackendAdapters, derived, batch_size: int,
                 micro_batch: int, *, ceiling: float, floor: float, seed: int,
                 eos_ids: tuple[int, ...] = ()):
        self.ops, self.adapters, self.derived = ops, adapters, derived
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.ceiling, self.floor, self.seed = ceiling, floor, seed
        self.eos_ids = tuple(eos_ids)  # never chosen by greedy generation (min_new_tokens)
        self.sigma_k_min = float(derived.sigma_k_min)
        self.steps = 0
        self.bounds = ops.pack_bounds({n: (sp.sigma_k / sp.scale, sp.decay)
                                       for n, sp in adapters.specs.items()})
        # The last update (new - old state), kept when the certificate needs its curvature.
        self.keep_direction = False
        self.last_direction = None

    def train_mode(self) -> None:
        """(Dropout is chosen per call by ``adapter_scales``: no mode to switch.)"""

    def eval_mode(self) -> None:
        """(See :meth:`train_mode`.)"""

    def _forward_backward(self, batch, *, train: bool = True):
        """Loss (summed answer-token CE / batch.n_tokens) and its gradients, micro-batched;
        ``train``: with the step's dropout masks."""
        ops, total = self.ops, max(int(batch.n_tokens), 1)
        state = self.adapters.state
        loss, grads = None, None
        for j, i in enumerate(range(0, batch.input_ids.shape[0], self.micro_batch)):
            sl = slice(i, i + self.micro_batch)
            ids, am, lab = to_backend_batch(ops, batch.input_ids[sl], batch.attention_mask[sl],
                                            batch.labels[sl],
                                            rows=min(self.micro_batch, self.batch_size))
            scales = adapter_scales(ops, self.adapters, train=train, seed=self.seed,
                                    step=self.steps, micro=j)
            l_mb, g_mb = ops.value_and_grad(state, scales, ids, am, lab, total)
            if grads is None:
                loss, grads = l_mb, g_mb
            else:
                loss, grads = loss + l_mb, ops.add(grads, g_mb)
        return loss, grads

    def warm_up(self, batch) -> None:
        """Run (and discard) one step's loss, gradients, norm, MASS step, update and telemetry on
        ``batch``: JAX then compiles them here (set-up time), not in the first timed step. The
        adapters are left unchanged."""
        ops, state = self.ops, self.adapters.state
        ids, am, lab = to_backend_batch(ops, batch.input_ids, batch.attention_mask, batch.labels,
                                        rows=min(self.micro_batch, self.batch_size))
        scales = adapter_scales(ops, self.adapters, train=True, seed=self.seed, step=0, micro=0)
        loss, grads = ops.value_and_grad(state, scales, ids, am, lab, max(int(batch.n_tokens), 1))
        if self.batch_size > self.micro_batch:
            ops.add(grads, grads)
        norm = ops.grad_norm(grads)
        geometry.mass_step_size(loss, norm, self.sigma_k_min, self.ceiling, self.floor)
        _, orth, ratio = ops.update(state, grads, ops.array(0.0), self.bounds)
        float(orth), float(ratio)

    def step(self, batch):
        from runner.training import StepLog

        loss, grads = self._forward_backward(batch)
        self.steps += 1
        grad_norm = self.ops.grad_norm(grads)
        loss_f, norm_f = float(loss), float(grad_norm)
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            return StepLog(loss=loss_f, extra={"grad_norm": norm_f})

        # 2. MASS step size (row 1); 3-4. retract U, V; clamp S to [0, sigma_k / c] and decay it.
        mass = geometry.mass_step_size(loss, grad_norm, self.sigma_k_min, self.ceiling,
                                       self.floor)
        eta = float(mass.step)
        ad, before = self.adapters, self.adapters.state
        ad.state, orth, s_ratio = self.ops.update(ad.state, grads, self.ops.array(eta),
                                                  self.bounds)
        if self.keep_direction:
            self.last_direction = _tree_map(lambda new, old: new - old, ad.state, before)
            self.ops.sync(self.last_direction)
        return StepLog(loss=loss_f, extra={
            "grad_norm": norm_f, "step_size": eta, "bound": mass.bound,
            "update_norm": eta * norm_f, "weyl_bound": self.sigma_k_min,
            "orth_error": float(orth), "adapter_norm_ratio": float(s_ratio),
        })

    def example_losses(self, examples, batch_size: int, pad_id: int):
        """Per-example summed next-token CE and label counts (no dropout), as
        ``runner.training.example_losses``."""
        from runner.data import batches

        ops, sums, counts = self.ops, [], []
        state = self.adapters.state
        scales = adapter_scales(ops, self.adapters, train=False, seed=self.seed, step=0,
                                micro=0)
        for batch in batches(examples, batch_size, seed=0, epoch=0, pad_id=pad_id,
                             shuffle=False):
            b = batch.input_ids.shape[0]
            ids, am, lab = to_backend_batch(ops, batch.input_ids, batch.attention_mask,
                                            batch.labels, rows=batch_size)
            s, c = ops.example_sums(state, scales, ids, am, lab)
            sums.extend(ops.numpy(s).astype(np.float64)[:b].tolist())
            counts.extend(int(x) for x in ops.numpy(c)[:b])
        return sums, counts

    # -- what the stopping certificate asks (runner.trainers.derived.CertificateMonitor) -------

    def generation_stats(self, prompts, new_tokens: int, pad_id: int) -> tuple[float, float]:
        """Mean next-token entropy and 4-gram repetition rate of greedy continuations of
        ``prompts`` (1-D token tensors), as ``runner.trainers.derived.generation_stats`` (HF
        ``generate``, do_sample=False, min_new_tokens = new_tokens): the entropy of the raw
        logits' softmax in float64, the next token their argmax with EOS excluded. Without a
        KV cache: each token is one forward of the sequence so far (JAX: right-padded to a
        multiple of 32 positions, so one compiled forward serves a prompt)."""
        from runner.trainers.derived import _ngram_repetition

        del pad_id  # one unpadded row: nothing to pad
        ops, state = self.ops, self.adapters.state
        scales = adapter_scales(ops, self.adapters, train=False, seed=self.seed, step=0, micro=0)
        entropies, reps = [], []
        for prompt in prompts:
            seq = [int(t) for t in prompt]
            start = len(seq)
            width = _bucket(start + new_tokens) if ops.name == "jax" else None
            for _ in range(new_tokens):
                n = len(seq)
                ids = np.zeros((1, width or n), np.int64)
                am = np.zeros_like(ids)
                ids[0, :n], am[0, :n] = seq, 1
                logits = ops.last_logits(state, scales, ops.array(ids, "int32"),
                                         ops.array(am, "int32"), n - 1)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                nz = p[p > 0]
                entropies.append(float(-(nz * np.log(nz)).sum()))  # 0 log 0 = 0
                logits[list(self.eos_ids)] = -np.inf
                seq.append(int(np.argmax(logits)))
            reps.append(_ngram_repetition(seq[start:]))
        return sum(entropies) / len(entropies), sum(reps) / len(reps)

    def curvature(self, val_batch) -> tuple[float, float]:
        """a = grad L_val . d and b = d^T H_val d along the last update d (central differences
        of the validation gradient, without dropout); NaN before the first step or when the
        trainer keeps no direction."""
        d = self.last_direction
        if d is None:
            return math.nan, math.nan
        ad, base = self.adapters, self.adapters.state
        try:
            _, g0 = self._forward_backward(val_batch, train=False)
            ad.state = _tree_map(lambda x, y: x + y, base, d)
            _, g_plus = self._forward_backward(val_batch, train=False)
            ad.state = _tree_map(lambda x, y: x - y, base, d)
            _, g_minus = self._forward_backward(val_batch, train=False)
        finally:
            ad.state = base  # back where we were, exactly
        a = _tree_dot(self.ops, g0, d)
        b = _tree_dot(self.ops, _tree_map(lambda x, y: x - y, g_plus, g_minus), d) / 2.0
        return a, b

    # -- checkpoints (runner.checkpoint, through runner.training.train_loop) -------------------

    def setup_summary(self) -> dict[str, float]:
        """What the set-up derived (recomputed on resume, so it must come out the same)."""
        return {"batch_size": self.batch_size, "micro_batch": self.micro_batch,
                "ceiling": self.ceiling, "floor": self.floor, "sigma_k_min": self.sigma_k_min}

    def _host(self, tree) -> dict:
        import torch

        return {n: tuple(torch.from_numpy(np.array(x, np.float32)) for x in t)
                for n, t in self.ops.unpack(tree).items()}

    def _device(self, per_name: dict):
        if set(per_name) != set(self.adapters.specs):
            raise ValueError("the checkpoint's adapters are not this run's target modules")
        usv = {n: tuple(x.numpy() for x in t) for n, t in per_name.items()}
        for n, (_, s, _) in usv.items():
            if s.shape != (self.adapters.specs[n].rank,):
                raise ValueError(f"{n}: rank {s.shape[0]} in the checkpoint, "
                                 f"{self.adapters.specs[n].rank} derived")
        return self.ops.pack_usv(usv, self.adapters.specs)

    def state_dict(self) -> dict[str, Any]:
        """U, S, V, the last update and the step count (the dropout masks' seed) as torch
        tensors by module name; the set-up only as its summary, checked on resume."""
        d = self.last_direction
        return {"adapters": self._host(self.adapters.state),
                "last_direction": None if d is None else self._host(d),
                "steps": self.steps, "setup": self.setup_summary()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from runner.trainers.derived import check_setup

        check_setup(self.setup_summary(), state["setup"])
        self.adapters.state = self._device(state["adapters"])
        d = state["last_direction"]
        self.last_direction = None if d is None else self._device(d)
        self.steps = int(state["steps"])

    # -- export ------------------------------------------------------------------------------

    def peft_weights(self) -> dict:
        """name -> (lora_A (r x in), lora_B (out x r)) torch tensors: B = c U diag(S), A = V^T."""
        import torch

        out, usv = {}, self.adapters.usv()
        for name, spec in self.adapters.specs.items():
            u, s, v = (x.astype(np.float32) for x in usv[name])
            out[name] = (torch.from_numpy(np.ascontiguousarray(v.T)),
                         torch.from_numpy(np.ascontiguousarray(spec.scale * u * s)))
        return out

    def adapter_effective_ranks(self) -> dict[str, float]:
        out, usv = {}, self.adapters.usv()
        for name in self.adapters.specs:
            s = usv[name][1].astype(np.float64)
            out[name] = geometry.effective_rank(s) if s.max() > 0 else 0.0
        return out


def _tree_map(f, *trees):
    """``f`` leaf by leaf over states or gradients of the same layout (MLX: by module name;
    JAX: by module kind; each a (U, S, V) triple)."""
    return {k: tuple(f(*leaves) for leaves in zip(*(t[k] for t in trees), strict=True))
            for k in trees[0]}


def _tree_dot(ops: _Ops, a, b) -> float:
    """sum over every leaf of a * b, accumulated in float64 on the host."""
    return float(sum(np.dot(ops.numpy(x).astype(np.float64).ravel(),
                            ops.numpy(y).astype(np.float64).ravel())
                     for k in a for x, y in zip(a[k], b[k], strict=True)))


def _grad_norm(grads):
    """sqrt(sum of squares) over every adapter gradient."""
    flat = [g for triple in grads.values() for g in triple]
    xp = namespace(flat[0])
    return xp.sqrt(sum(xp.sum(g * g) for g in flat))


def _add_grads(a, b):
    """Gradients of two micro-batches, summed adapter by adapter."""
    return {n: tuple(x + y for x, y in zip(a[n], b[n])) for n in a}


def _update_one(u, s, v, gu, gs, gv, eta, upper, decay):
    """One derived step on one adapter (runner.trainers.derived.DerivedTrainer.step, 3-4):
    U, V <- cayley_retract(., grad, -eta) (the curve of -grad for time eta); S <- clamp(S -
    eta grad_S, 0, upper) * (1 - eta decay), with ``upper`` = sigma_k / c and ``decay`` =
    sigma_k / sigma_max."""
    xp = namespace(u)
    s = xp.clip(s - eta * gs, min=0.0, max=upper) * (1.0 - eta * decay)
    return geometry.cayley_retract(u, gu, -eta), s, geometry.cayley_retract(v, gv, -eta)


def _update_kinds(state, grads, eta, bounds):
    """:func:`_update_one` on every adapter of the JAX state (stacked by module kind, zero-padded
    to the kind's rank; ``bounds[kind] = (upper, decay, ranks)``), by ``lax.map`` over each
    kind's layers. Zero columns stay zero and change nothing else: with X = [X_r, 0] and
    D = [D_r, 0] the Cayley r x r matrix K's extra rows and columns are the identity's, and a
    zero S entry with zero gradient stays 0 (a layer without an adapter is all zero columns).
    ``lax.map``, not ``vmap``: a vmapped ``inv`` is a batched LU, and jaxlib 0.10's batched
    LAPACK kernels (``ParallelBatchMap``) deadlocked here when two ran at once on the 2-thread
    CPU pool. Returns the new state, the largest orthogonality error ||X^T X - I_r||_F of any
    U or V over its r real columns (``geometry.orthogonality_error``), and the largest
    c max(S) / sigma_k (= max(S) / upper)."""
    import jax
    import jax.numpy as jnp

    out, orth, ratio = {}, [], []
    for kind, (u, s, v) in state.items():
        upper, decay, ranks = bounds[kind]

        def one(a):
            return _update_one(*a[:6], eta, a[6], a[7])

        nu, ns, nv = jax.lax.map(one, (u, s, v, *grads[kind], upper, decay))
        r = u.shape[2]
        mask = (jnp.arange(r)[None, :] < ranks[:, None]).astype(u.dtype)
        ident = mask[:, :, None] * jnp.eye(r, dtype=u.dtype)  # diag(1 on the real columns)
        for x in (nu, nv):
            d = jnp.matmul(jnp.swapaxes(x, 1, 2), x) - ident
            orth.append(jnp.max(jnp.sqrt(jnp.sum(d * d, axis=(1, 2)))))
        ratio.append(jnp.max(jnp.max(ns, axis=1) / upper))
        out[kind] = (nu, ns, nv)
    return out, jnp.max(jnp.stack(orth)), jnp.max(jnp.stack(ratio))


class _ExportView:
    """What ``runner.trainers.derived.export_peft`` reads from a trainer (no hooks to remove)."""

    def __init__(self, trainer: BackendDerivedTrainer):
        self.adapters = SimpleNamespace(specs=trainer.adapters.specs, remove=lambda: None)
        self.peft_weights = trainer.peft_weights


def export_peft(model, trainer: BackendDerivedTrainer, derived):
    """The trained factors as plain PEFT LoRA on the torch model (B = c U diag(S), A = V^T)."""
    from runner.trainers.derived import export_peft as torch_export

    return torch_export(model, _ExportView(trainer), derived)


# ---------------------------------------------------------------------------------------------
# The loop and the task


def eos_ids(model) -> tuple[int, ...]:
    """The torch model's end-of-sequence token ids (its generation config's, as a tuple)."""
    eos = model.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def run_backend_derived(cfg, loaded, splits, pad_id: int, console):
    """trainer=derived with ``hardware.backend`` mlx or jax (``runner.tasks.train.run_trainer``)."""
    from runner.checkpoint import Checkpoint
    from runner.tasks.derived import certificate_monitor
    from runner.training import train_loop
    from runner.trial import TrainOutcome, config_hash

    backend, tcfg = _value(cfg.hardware.backend), cfg.trainer
    if _value(cfg.hardware.dtype) != "float32":
        from runner.errors import ConfigError

        raise ConfigError(f"hardware.dtype={_value(cfg.hardware.dtype)}: the {backend} derived "
                          "trainer runs in float32 only")
    ops = make_ops(backend, loaded.model)
    setup = setup_backend_derived(cfg, ops, splits, pad_id, console)
    trainer, derived, noise = setup.trainer, setup.derived, setup.noise
    trainer.eos_ids = eos_ids(loaded.model)

    # Train with MASS steps; stop on the certificate or the token budget (the torch loop,
    # checkpoints included: runner.tasks.derived.run_derived).
    monitor = None
    if tcfg.certificate:
        trainer.keep_direction = True  # the curvature criterion reads the last update
        monitor = certificate_monitor(cfg, trainer, splits, pad_id)
    checkpoint = Checkpoint.for_run(cfg.runs_dir, config_hash(cfg),
                                    stateful={"certificate": monitor} if monitor else None)
    result = train_loop(None, trainer, splits, cfg.budget, seed=cfg.seed, pad_id=pad_id,
                        console=console, on_eval=monitor.on_eval if monitor else None,
                        checkpoint=checkpoint)
    ranks = trainer.adapter_effective_ranks()
    peft_model = export_peft(loaded.model, trainer, derived)
    records = derived.records
    return TrainOutcome(
        model=peft_model, result=result,
        hyperparameters={"init": _value(tcfg.init), "batch_size": trainer.batch_size,
                         "micro_batch": tcfg.micro_batch, "mass_ceiling": records[1].value,
                         "epsilon_floor": records[2].value, "backend": backend},
        extra_metrics={"derive_seconds": setup.derive_seconds,
                       "setup_seconds": setup.setup_seconds, "batch_size": trainer.batch_size,
                       "noise_b_simple": noise.b_simple,
                       "max_orth_error": max((s.get("orth_error", 0.0)
                                              for s in result.step_logs), default=0.0),
                       "adapter_effective_rank_mean": sum(ranks.values()) / max(len(ranks), 1)},
        derived=derived.to_dict(),
        certificate=monitor.history[-1] if monitor and monitor.history else None,
        step_table=result.step_logs,
    )
