"""The MLX/JAX side of the derived trainer: what the two array backends share (batches on the
backend, the adapters' state, dropout keys, frames, checkpoints in torch tensors). What differs
between them is in runner.derived.mlx_ops and runner.derived.jax_ops.

torch only loads the weights, tokenizer and data, and receives the trained factors for the PEFT
export. Adapter dropout draws its masks from the backend's PRNG keyed by (seed, step,
micro-batch): reproducible within a backend, not torch's masks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

import geometry
from geometry._xp import namespace
from geometry.readings import adapter_step_telemetry, tail_start
from runner.data import batches, collate
from runner.derived.certificate import ngram_repetition
from runner.derived.frames import initial_frames
from runner.errors import ConfigError
from runner.models.backends import module_names

IGNORE = -100


class ArrayOps:
    """The derived trainer's operations on MLX or JAX: a float32 copy of a torch model's weights on a backend, and what training needs there.

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
    be: Any  # the backend module (runner.models.backends.jax_llama / mlx_models)
    mass_on_host = False  # MASS runs on the backend's loss and gradient-norm arrays

    def __init__(self, model):
        self.params = self.be.params_from_torch(model.state_dict(), model.config)
        self.spec = self.params.spec
        self.width: int | None = None  # JAX: pad every batch to this many positions
        self.eos_ids = eos_ids(model)  # never chosen by greedy generation (min_new_tokens)
        self.adapters: BackendAdapters | None = None
        self.seed = 0
        self.bounds = None
        self.tails: dict = {}  # the tail start's frozen (U_t, a, V_t) by name, torch tensors
        # the noise probe's masks are keyed by (its seed, step -1, micro-batch): no generator
        # to replay them on, and the model's forward here draws nothing of its own
        self.probe_stream_own, self.probe_draws = True, []

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

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self, splits) -> None:
        """Pad every batch (JAX) to the run's longest example, rounded up to a multiple of 8,
        so that one compiled program serves the run."""
        self.width = _bucket(max(len(e.input_ids) for part in (splits.train, splits.val,
                                                               splits.retention) for e in part), 8)

    def candidate_weights(self) -> dict[str, Any]:
        """Every Linear weight inside the decoder blocks, in the torch model's named_modules
        order, as backend arrays."""
        w = self.weights()
        return {n: w[n + ".weight"] for n in module_names(self.spec)
                if ".layers." in n and n + ".weight" in w}

    @contextlib.contextmanager
    def derivation_map(self):
        """float64 spectra, one matrix at a time: MLX's streams are not shared by threads, and
        JAX's float64 switch is per thread."""
        with self.float64():
            yield map

    def residual_scales(self, blocks: list[str], calib) -> dict[str, geometry.Derived]:
        """sigma_max(x) / sigma_max(f(x)) per decoder block on a calibration batch (row 15), from
        the backend forward's block inputs x and outputs x + f(x) at the non-padding tokens."""
        ids, am, _ = to_backend_batch(self, calib.input_ids, calib.attention_mask, calib.labels)
        hidden = self.block_hidden(ids, am)
        rows = np.flatnonzero(np.asarray(am).reshape(-1) != 0)
        index = self.array(rows, "int32")
        xp = namespace(hidden[0])
        out = {}
        with self.float64():
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



    def attach(self, specs: dict, init: str, seed: int, rule, frames: dict | None = None) -> None:
        """U, V from W's singular vectors (one compilation per weight shape: the frames are
        padded to the largest rank among that shape's adapters), S = 0. ``frames``: the
        starting (U, V) by name, computed before for these specs and ``init`` (numpy or CPU
        torch tensors; else computed here)."""
        if frames is None:
            frames = self._initial_frames(specs, init, seed)
        else:
            frames = {n: tuple(np.asarray(x) for x in uv) for n, uv in frames.items()}
        self.adapters = BackendAdapters(specs, self, self.pack(specs, frames))
        self.seed = seed
        self.bounds = self.pack_bounds({n: rule.bounds(sp) for n, sp in specs.items()})

    def _initial_frames(self, specs: dict, init: str, seed: int) -> dict:
        """Every adapter's starting (U, V) (:func:`runner.derived.frames.initial_frames`): the
        singular-vector frames padded to the largest rank among the adapters of the weight's
        shape (one JAX compilation for all of them), a random pair drawn by numpy from
        ``seed`` (so not the torch generator's draw)."""
        weights = self.candidate_weights()
        widths: dict[tuple, int] = {}
        for name, spec in specs.items():
            shape = tuple(weights[name].shape)
            widths[shape] = max(widths.get(shape, 0), spec.rank)

        def one(name: str, spec):
            width = widths[tuple(weights[name].shape)]

            def tail(w, start: int, r: int):
                return self.frames(w, start, r, width)

            normal = np.random.default_rng(seed).standard_normal
            return tuple(self.array(x)
                         for x in initial_frames(weights[name], spec, init, normal, tail))

        return {name: one(name, spec) for name, spec in specs.items()}

    def apply_start(self, rule, seed: int) -> None:
        """Move the adapters from the probe's start (S = 0) to the reading's: the tail start
        subtracts U_t diag(a) V_t^T from this backend's copy of W (the torch model, which the
        export uses, keeps the original W) and starts S~ at a, in the box beta."""
        del seed
        if rule.nb_lora:
            raise ConfigError(f"trainer={rule.name} runs on torch only (its NB-LoRA map is not "
                              f"wired into the {self.name} forward)")
        if rule.start.value != "tail":
            return
        specs, usv, res = dict(self.adapters.specs), {}, {}
        weights = {n: np.asarray(w, np.float64) for n, w in self.candidate_weights().items()}
        for name, (u, _, v) in self.adapters.usv().items():
            w = weights[name]
            s_t = np.abs(np.einsum("ir,ij,jr->r", u.astype(np.float64), w, v.astype(np.float64)))
            start = tail_start(s_t, specs[name].sigma_k)
            a = np.asarray(start.start, np.float32)
            usv[name] = (u, a, v)
            res[name] = (w - (u * a.astype(np.float64)) @ v.T).astype(np.float32)
            self.tails[name] = tuple(torch.from_numpy(np.ascontiguousarray(x, np.float32))
                                     for x in (u, a, v))
            specs[name] = replace(specs[name], s_bound=start.bound)
        self.replace_weights({n + ".weight": w for n, w in res.items()})
        self.adapters.specs = specs
        self.adapters.state = self.pack_usv(usv, specs)
        self.bounds = self.pack_bounds({n: rule.bounds(sp) for n, sp in specs.items()})

    def host_tails(self) -> dict:
        return dict(self.tails)

    def adapter_grad_norms(self, grads) -> np.ndarray:
        """||g_W|| of every adapter (its U, S and V gradients), float64, in the specs' order."""
        per = self.unpack(grads)
        return np.array([math.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum())
                                       for g in per[n])) for n in self.adapters.specs])

    def example_s_grads(self, examples, pad_id: int, micro_batch: int, seed: int):
        """Per-example S gradients (n, sum r), float64 numpy. Each example's S gets its own row
        (S of shape (B, 1, r) broadcasts in the adapter branch), so one backward of sum_i L_i
        per micro-batch yields every example's gradient (valid at any S). The dropout masks are
        keyed by (``seed``, step -1, micro-batch): the probe's own keys, apart from training's."""
        rows = []
        for j, i in enumerate(range(0, len(examples), micro_batch)):
            batch = collate(list(examples[i:i + micro_batch]), pad_id=pad_id)
            b = batch.input_ids.shape[0]
            ids, am, lab = to_backend_batch(self, batch.input_ids, batch.attention_mask,
                                            batch.labels, rows=micro_batch)
            scales = adapter_scales(self, self.adapters, train=True, seed=seed, step=-1, micro=j)
            g = self.example_s_grads_of(self.adapters.state, scales, ids, am, lab)
            rows.append(np.concatenate([g[n] for n in self.adapters.specs], axis=1)[:b]
                        .astype(np.float64))
        return np.concatenate(rows)[:len(examples)]

    def replay_probe(self, draws: list) -> None:
        """(Nothing to advance: the probe's masks come from keys of their own.)"""

    def warm_up(self, trainer, batch) -> None:
        """Run (and discard) one step's loss, gradients, norm, MASS step, update and telemetry on
        ``batch``: JAX then compiles them here (set-up time), not in the first timed step. The
        adapters are left unchanged."""
        state = self.adapters.state
        ids, am, lab = to_backend_batch(self, batch.input_ids, batch.attention_mask, batch.labels,
                                        rows=min(trainer.micro_batch, trainer.batch_size))
        scales = adapter_scales(self, self.adapters, train=True, seed=self.seed, step=0, micro=0)
        loss, grads = self.value_and_grad(state, scales, ids, am, lab,
                                          max(int(batch.n_tokens), 1))
        if trainer.batch_size > trainer.micro_batch:
            self.add(grads, grads)
        norm = self.grad_norm(grads)
        geometry.mass_step_size(loss, norm, trainer.sigma_k_min, trainer.ceiling, trainer.floor)
        _, orth, ratio = self.update_state(state, grads, self.pack_etas(0.0), self.bounds)
        float(orth), float(ratio)

    # -- training ----------------------------------------------------------------------------

    def params(self) -> list:
        return [x for t in self.adapters.state.values() for x in t]

    def train_mode(self) -> None:
        """(Dropout is chosen per call by ``adapter_scales``: no mode to switch.)"""

    def eval_mode(self) -> None:
        """(See :meth:`train_mode`.)"""

    def forward_backward(self, batch, micro_batch: int, batch_size: int, *, step: int,
                         train: bool = True):
        """Loss (summed answer-token CE / batch.n_tokens) and its gradients, micro-batched;
        ``train``: with the step's dropout masks, keyed by (seed, step, micro-batch)."""
        total = max(int(batch.n_tokens), 1)
        state = self.adapters.state
        loss, grads = None, None
        for j, i in enumerate(range(0, batch.input_ids.shape[0], micro_batch)):
            sl = slice(i, i + micro_batch)
            ids, am, lab = to_backend_batch(self, batch.input_ids[sl], batch.attention_mask[sl],
                                            batch.labels[sl], rows=min(micro_batch, batch_size))
            scales = adapter_scales(self, self.adapters, train=train, seed=self.seed,
                                    step=step, micro=j)
            l_mb, g_mb = self.value_and_grad(state, scales, ids, am, lab, total)
            if grads is None:
                loss, grads = l_mb, g_mb
            else:
                loss, grads = loss + l_mb, self.add(grads, g_mb)
        return loss, grads

    def update(self, grads, eta, rule, *, keep_direction: bool):
        """One step on every adapter: (the update new - old if kept, else None; largest
        orthogonality error; largest c max|S| / sigma_k; step telemetry by name). ``eta``: one
        step, or one per adapter in the specs' order. ``rule`` fixed the bounds at attach."""
        before = self.adapters.state
        self.adapters.state, orth, s_ratio = self.update_state(before, grads,
                                                               self.pack_etas(eta), self.bounds)
        telemetry = self.telemetry(before, self.adapters.state, grads, eta, rule)
        direction = None
        if keep_direction:
            direction = tree_map(lambda new, old: new - old, self.adapters.state, before)
            self.sync(direction)
        return direction, orth, s_ratio, telemetry

    def pack_etas(self, eta):
        """The step of every adapter in the state's layout (one value, or one per adapter)."""
        names = list(self.adapters.specs)
        etas = [float(e) for e in eta] if hasattr(eta, "__len__") else [float(eta)] * len(names)
        return self.pack_per_adapter(dict(zip(names, etas, strict=True)))

    def telemetry(self, before, after, grads, eta, rule) -> dict:
        """geometry.readings.adapter_step_telemetry of every adapter, on host copies (numpy)."""
        old, new, g = self.unpack(before), self.unpack(after), self.unpack(grads)
        names = list(self.adapters.specs)
        etas = [float(e) for e in eta] if hasattr(eta, "__len__") else [float(eta)] * len(names)
        out = {}
        for name, e in zip(names, etas, strict=True):
            spec = self.adapters.specs[name]
            upper, _ = rule.bounds(spec)
            lower = rule.lower(upper)
            (u0, s0, v0), (u1, _, v1) = old[name], new[name]
            projected = np.clip(s0 - e * g[name][1], lower, upper)
            out[name] = adapter_step_telemetry(u0, u1, v0, v1, projected, lower, upper, e,
                                               spec.scale)
        return out

    def example_losses(self, examples, batch_size: int, pad_id: int):
        """Per-example summed next-token CE and label counts (no dropout), as
        ``runner.training.example_losses``."""
        ops, sums, counts = self, [], []
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

    # -- what the stopping certificate asks (runner.derived.certificate) -------

    def generation_stats(self, prompts, new_tokens: int, pad_id: int) -> tuple[float, float]:
        """Mean next-token entropy and 4-gram repetition rate of greedy continuations of
        ``prompts`` (1-D token tensors), as the torch ops' (HF
        ``generate``, do_sample=False, min_new_tokens = new_tokens): the entropy of the raw
        logits' softmax in float64, the next token their argmax with EOS excluded. Without a
        KV cache: each token is one forward of the sequence so far (JAX: right-padded to a
        multiple of 32 positions, so one compiled forward serves a prompt)."""
        del pad_id  # one unpadded row: nothing to pad
        ops, state = self, self.adapters.state
        scales = adapter_scales(self, self.adapters, train=False, seed=self.seed, step=0, micro=0)
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
            reps.append(ngram_repetition(seq[start:]))
        return sum(entropies) / len(entropies), sum(reps) / len(reps)

    # -- the certificate's curvature probe ---------------------------------------------------

    def curvature_grads(self, val_batch, direction, micro_batch: int, batch_size: int):
        """The validation gradients (no dropout) at x, x + d and x - d; the state is put back
        (the same arrays) afterwards."""
        ad, base = self.adapters, self.adapters.state

        def grads_at(state):
            ad.state = state
            return self.forward_backward(val_batch, micro_batch, batch_size, step=0,
                                         train=False)[1]

        try:
            g0 = grads_at(base)
            g_plus = grads_at(tree_map(lambda x, y: x + y, base, direction))
            g_minus = grads_at(tree_map(lambda x, y: x - y, base, direction))
        finally:
            ad.state = base
        return g0, g_plus, g_minus

    @staticmethod
    def sub(a, b):
        return tree_map(lambda x, y: x - y, a, b)

    def dot(self, a, b) -> float:
        """sum over every leaf of a * b, accumulated in float64 on the host."""
        return float(sum(np.dot(self.numpy(x).astype(np.float64).ravel(),
                                self.numpy(y).astype(np.float64).ravel())
                         for k in a for x, y in zip(a[k], b[k], strict=True)))

    # -- checkpoints (torch tensors by module name) and export -------------------------------

    def _host(self, tree) -> dict:
        return {n: tuple(torch.from_numpy(np.array(x, np.float32)) for x in t)
                for n, t in self.unpack(tree).items()}

    def _device(self, per_name: dict):
        specs = self.adapters.specs
        if set(per_name) != set(specs):
            raise ValueError("the checkpoint's adapters are not this run's target modules")
        usv = {n: tuple(x.numpy() for x in t) for n, t in per_name.items()}
        for n, (_, s, _) in usv.items():
            if s.shape != (specs[n].rank,):
                raise ValueError(f"{n}: rank {s.shape[0]} in the checkpoint, "
                                 f"{specs[n].rank} derived")
        return self.pack_usv(usv, specs)

    def save_adapters(self) -> dict:
        return self._host(self.adapters.state)

    def load_adapters(self, state: dict) -> None:
        self.adapters.state = self._device(state)

    def save_direction(self, direction) -> dict:
        return self._host(direction)

    def load_direction(self, direction):
        return self._device(direction)

    def host_usv(self) -> dict:
        return {n: tuple(torch.from_numpy(np.ascontiguousarray(x, np.float32)) for x in t)
                for n, t in self.adapters.usv().items()}

    def detach(self) -> None:
        """(The torch model was never touched: nothing to detach.)"""


def _bucket(n: int, step: int = 32) -> int:
    return max(step, -(-n // step) * step)


def to_backend_batch(ops: ArrayOps, input_ids, attention_mask, labels, *, rows: int | None = None):
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




@dataclass
class BackendAdapters:
    """U diag(S) V^T adapters in the backend's state (``ArrayOps.pack``), with their specs by module
    name; ``U``, ``S``, ``V``: numpy copies by name (``ArrayOps.unpack``)."""

    specs: dict  # name -> runner.derived.spec.AdapterSpec
    ops: ArrayOps
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




def adapter_scales(ops: ArrayOps, adapters: BackendAdapters, *, train: bool, seed: int,
                   step: int, micro: int):
    """Per adapter c, or (c, keep, key) where training applies the adapter's dropout, in the
    backend's layout (``ArrayOps.pack_scales``); the keys come from (seed, step, micro-batch), step
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




def tree_map(f, *trees):
    """``f`` leaf by leaf over states or gradients of the same layout (MLX: by module name;
    JAX: by module kind; each a (U, S, V) triple)."""
    return {k: tuple(f(*leaves) for leaves in zip(*(t[k] for t in trees), strict=True))
            for k in trees[0]}


def grad_norm(grads):
    """sqrt(sum of squares) over every adapter gradient."""
    flat = [g for triple in grads.values() for g in triple]
    xp = namespace(flat[0])
    return xp.sqrt(sum(xp.sum(g * g) for g in flat))


def add_grads(a, b):
    """Gradients of two micro-batches, summed adapter by adapter."""
    return {n: tuple(x + y for x, y in zip(a[n], b[n])) for n in a}



def update_one(rule, u, s, v, gu, gs, gv, eta, upper, decay):
    """One derived step on one adapter: U, V <- cayley_retract(., grad, -eta) (the curve of
    -grad for time eta); S by the reading's rule (``upper``, ``decay``: its bounds)."""
    s = rule.s_step(s, gs, eta, upper, decay)
    return geometry.cayley_retract(u, gu, -eta), s, geometry.cayley_retract(v, gv, -eta)




def eos_ids(model) -> tuple[int, ...]:
    """The torch model's end-of-sequence token ids (its generation config's, as a tuple)."""
    eos = model.generation_config.eos_token_id
    return tuple(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


