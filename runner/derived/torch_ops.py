"""The torch side of the derived trainer: U diag(S) V^T adapters applied to the model's Linears
by forward hooks (addmm, sparse dropout), their frames, and the operations the shared trainer
(runner.derived.trainer) and set-up (runner.derived.setup) call."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import replace

import torch
from torch import nn

import geometry
from geometry._xp import host_eigh
from geometry.pullback import pullback_metric_deviation
from geometry.readings import (
    adapter_step_telemetry,
    nb_lora_factors,
    nb_lora_init,
    tail_start,
)
from runner.data import collate
from runner.derived.cache import random_forward
from runner.derived.certificate import ngram_repetition
from runner.derived.frames import gathered_eigenpairs, initial_frames, tail_frames
from runner.derived.spec import AdapterSpec
from runner.derived.torch_dropout import dropout_draws, dropout_projection
from runner.models.loading import block_linears
from runner.training.loop import example_losses
from runner.training.runtime import one_lapack_thread, worker_pool


def candidate_linears(model) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks (embeddings and lm_head are not adapted); the
    blocks are found from the model's structure, whatever the architecture names them."""
    return block_linears(model)


def _tail_frames(w: torch.Tensor, start: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`runner.derived.frames.tail_frames` of ``w`` in float32, r columns, contiguous."""
    u, v = tail_frames(w.float(), start, r, r, _gram_eigenpairs)
    return u.contiguous(), v.contiguous()


def _gram_eigenpairs(gram: torch.Tensor, start: int, width: int):
    """Eigenvalues start..start+width-1 of the symmetric ``gram`` counted from the largest, and
    their eigenvectors, in descending order. On the CPU only those eigenvectors are computed
    (LAPACK's ``ssyevr``, MRRR, through SciPy: cheaper than a full ``eigh``); on other devices
    it is torch's full ``eigh``, gathered."""
    if gram.device.type != "cpu":
        return gathered_eigenpairs(torch.linalg.eigh)(gram, start, width)
    q = gram.shape[0]
    lam, vecs = host_eigh(gram.detach().numpy(), subset=(q - start - width, q - 1 - start))
    return (torch.from_numpy(lam[::-1].copy()).to(gram.dtype),
            torch.from_numpy(vecs[:, ::-1].copy()).to(gram.dtype))


class FactoredAdapters(nn.Module):
    """U diag(S) V^T adapters applied to their Linears by forward hooks (no module surgery)."""

    def __init__(self, linears: dict[str, nn.Linear], specs: dict[str, AdapterSpec],
                 init: str, seed: int, frames: dict[str, tuple] | None = None):
        super().__init__()
        self.specs = specs
        self.keys = {name: name.replace(".", "__") for name in specs}
        self.U, self.S, self.V = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        if frames is None:  # (given: the frames an earlier set-up computed for these specs)
            frames = self._frames(linears, specs, init, gen)
        for name, spec in specs.items():
            u, v = frames[name]
            key = self.keys[name]
            self.U[key] = nn.Parameter(u)
            self.V[key] = nn.Parameter(v)
            self.S[key] = nn.Parameter(torch.zeros(spec.rank, dtype=u.dtype))
        self.tails: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles = [linears[name].register_forward_hook(self._hook(name)) for name in specs]
        # name -> {"a": x V, "e": dL/dy U}, filled while `capture` is not None (noise probe)
        self.capture: dict[str, dict[str, torch.Tensor]] | None = None
        # the dropout draws of the forward passes, (input elements, p, r) in the order made,
        # recorded while not None (noise probe)
        self.draws: list[tuple[int, float, int]] | None = None

    @staticmethod
    def _frames(linears, specs, init: str, gen: torch.Generator) -> dict[str, tuple]:
        """Every adapter's initial (U, V). The singular-vector inits are independent per matrix
        (one Gram eigendecomposition each), so they run on as many threads as torch uses (LAPACK
        releases the GIL); a random init draws from one generator, in order."""
        def normal(shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        def one(name):
            w = linears[name].weight.detach()
            u, v = initial_frames(w, specs[name], init, normal, _tail_frames)
            return u.to(w.dtype), v.to(w.dtype)

        threads = torch.get_num_threads()
        if init == "random" or threads < 2 or len(specs) < 2:
            return {name: one(name) for name in specs}
        with one_lapack_thread(), worker_pool(threads) as pool:
            return dict(zip(specs, pool.map(one, specs), strict=True))

    def _hook(self, name: str):
        spec = self.specs[name]

        def hook(module, args, output):
            # out = y + c (x V) diag(S) U^T: (..., in) @ (in, r), scaled by an r-vector, then
            # added to y inside one GEMM (addmm). Every scalar (c and the dropout rescale)
            # rides on the r-vector, so no (..., out)-sized tensor is multiplied.
            p = spec.dropout if self.training else 0.0
            u, s, v = self.factors(name)
            a, rescale = dropout_projection(args[0], v, p)
            if self.draws is not None and torch._C._current_graph_task_id() == -1:
                # (not in the backward, where hardware.recompute reruns a block under the
                # random state it saved: those draws advance nothing)
                self.draws.append((args[0].numel(), p, v.shape[1]))
            coef = s * (spec.scale * rescale)
            flat = torch.addmm(output.reshape(-1, output.shape[-1]),
                               (a * coef).reshape(-1, a.shape[-1]), u.T)
            if name in self.tails:  # the frozen W_res = W - U_t diag(a) V_t^T (no dropout)
                u_t, start, v_t = self.tails[name]
                x = args[0].reshape(-1, args[0].shape[-1])
                flat = torch.addmm(flat, (x @ v_t) * start, u_t.T, alpha=-1.0)
            out = flat.view(output.shape)
            if self.capture is not None and out.requires_grad and name not in self.capture:
                # (not again when hardware.recompute reruns the block in the backward: the
                # first forward's output is the one the gradient reaches)
                slot = self.capture[name] = {"a": (a * rescale).detach()}
                ud = u.detach()
                out.register_hook(lambda g: slot.__setitem__("e", (g @ ud).detach()))
            return out

        return hook

    def factors(self, name: str):
        """The adapter's (U, S, V) as the forward uses them (dW = c U diag(S) V^T)."""
        key = self.keys[name]
        return self.U[key], self.S[key], self.V[key]

    @torch.no_grad()
    def start_from_tail(self, linears: dict[str, nn.Linear]) -> None:
        """derived_tail_start: move U_t diag(a) V_t^T out of W into the adapter (S~ = a, box
        beta; geometry.readings.tail_start). W stays as loaded: the hook subtracts the frozen
        tail, so the base model exported with the adapter is the original one."""
        for name, key in self.keys.items():
            u, v = self.U[key], self.V[key]
            w = linears[name].weight
            s_t = torch.diagonal(u.double().T @ w.double() @ v.double()).abs()  # (r,) tail values
            start = tail_start(s_t, self.specs[name].sigma_k)
            self.tails[name] = (u.detach().clone(), start.start.to(u.dtype), v.detach().clone())
            self.S[key].copy_(self.tails[name][1])
            self.specs[name] = replace(self.specs[name], s_bound=start.bound)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def triples(self):
        """(name, U, S, V): the trained parameters in their (out, values, in) slots."""
        for name, key in self.keys.items():
            yield name, self.U[key], self.S[key], self.V[key]


class NbLoraAdapters(FactoredAdapters):
    """derived_seed_code: dW = 2 B^T diag(S) A from free parameters (A~, B~, S_raw) through
    the NB-LoRA map (geometry.readings.nb_lora_factors), applied by the same hooks. The free
    parameters sit in the (out, values, in) slots: U holds B~ (r x out), S holds S_raw, V holds
    A~ (r x in); the seed code's start A~, B~ ~ N(0, 0.01^2), S_raw = sigma_k / 2."""

    def __init__(self, linears, specs: dict[str, AdapterSpec], seed: int):
        nn.Module.__init__(self)
        self.specs = specs
        self.keys = {name: name.replace(".", "__") for name in specs}
        self.U, self.S, self.V = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for name, spec in specs.items():
            out_f, in_f = linears[name].weight.shape
            dt = linears[name].weight.dtype
            z_a = torch.randn(spec.rank, in_f, generator=gen, dtype=torch.float64)
            z_b = torch.randn(spec.rank, out_f, generator=gen, dtype=torch.float64)
            a, b, s = nb_lora_init(z_a, z_b, spec.sigma_k)
            key = self.keys[name]
            self.U[key], self.S[key], self.V[key] = (nn.Parameter(x.to(dt)) for x in (b, s, a))
        self.tails = {}
        self._handles = [linears[name].register_forward_hook(self._hook(name)) for name in specs]
        self.capture, self.draws = None, None

    @torch.no_grad()
    def pullback_deviations(self) -> list[float]:
        """||P - I||_F / sqrt(r) of every adapter (geometry.pullback), in float64."""
        return [pullback_metric_deviation(self.V[key].double(), self.U[key].double())
                for key in self.keys.values()]

    def factors(self, name: str):
        """(U, S, V) = (B^T, 2 S, A^T) of the NB-LoRA map: 2 B^T diag(S) A = U diag(S) V^T."""
        key = self.keys[name]
        f = nb_lora_factors(self.V[key], self.U[key], self.S[key], self.specs[name].sigma_k)
        return f.b.T, 2.0 * f.s, f.a.T




# Causal LMs whose logits are exactly the output layer applied to the decoder's last hidden
# state (no soft-capping, scaling or bias after it): their answer loss is taken in chunks of
# token rows (answer_loss_backward). Any other model takes the whole-logits path.
PLAIN_HEAD_MODELS = frozenset({"LlamaForCausalLM", "Lfm2ForCausalLM", "MistralForCausalLM",
                               "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
LOSS_CHUNK_ROWS = 128  # token rows per chunk of the output layer (128 x vocab logits at a time)


def answer_loss_backward(model, input_ids, attention_mask, labels,
                         weight: torch.Tensor | float) -> torch.Tensor:
    """Backward of sum_t weight_t nll_t over next-token positions (gradients accumulated in the
    parameters' .grad); returns that sum in float64. ``labels``: (b, T), already shifted (t
    predicts t+1), -100 where a position does not count; ``weight``: a scalar or (b, T).

    For a plain-head model the (b T, vocab) logits never exist at once: the decoder runs once,
    the output layer, the softmax and their backward run on LOSS_CHUNK_ROWS token rows at a
    time (the output layer is frozen: only its input needs a gradient), and the decoder's
    backward takes the gathered gradient of its output. That holds a chunk's logits instead of
    the whole batch's logits, log-probabilities and their gradient (3 x 96 MB at 512 tokens
    on a 49k vocabulary). The gradient is the same up to float rounding (the output layer's
    matmul runs on fewer rows at a time)."""
    head = model.get_output_embeddings()
    weight = torch.as_tensor(weight, dtype=torch.float32, device=input_ids.device)
    weight = weight.expand(labels.shape).reshape(-1)
    flat_labels = labels.reshape(-1)
    plain = (type(model).__name__ in PLAIN_HEAD_MODELS  # (not remote code reusing the name)
             and type(model).__module__.startswith("transformers.models."))
    if not plain or head.weight.requires_grad:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          flat_labels, ignore_index=-100, reduction="none")
        del logits  # (the graph keeps the log-probabilities: the logits go before the backward)
        loss = (nll * weight).sum()
        loss.backward()
        return loss.detach().double()
    hidden = model.get_decoder()(input_ids=input_ids,
                                 attention_mask=attention_mask).last_hidden_state
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    grad = torch.empty_like(flat)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.shape[0], LOSS_CHUNK_ROWS):
        rows = flat[i:i + LOSS_CHUNK_ROWS].detach().requires_grad_()
        nll = nn.functional.cross_entropy(head(rows).float(), flat_labels[i:i + LOSS_CHUNK_ROWS],
                                          ignore_index=-100, reduction="none")
        loss = (nll * weight[i:i + LOSS_CHUNK_ROWS]).sum()
        (grad[i:i + LOSS_CHUNK_ROWS],) = torch.autograd.grad(loss, rows)
        total += loss.detach().double()
    hidden.backward(grad.view_as(hidden))
    return total


def per_example_s_grads(model, adapters: FactoredAdapters,
                        batch) -> tuple[torch.Tensor, list[tuple[int, float, int]]]:
    """Per-example gradients (float64, one row per example) of each example's mean answer-token
    loss with respect to every adapter parameter, from one forward/backward of the batch; and
    the adapters' dropout draws in the order the forward made them, as (input elements, p, r)
    (:func:`runner.derived.torch_dropout.dropout_draws`; not those of a block that
    hardware.recompute reruns in the backward, which draws under the random state it saved).

    Valid at S = 0 (the adapters' initialisation, when the probe runs), where dL/dU and dL/dV
    vanish (both carry a factor S) and the only gradient is
        dL_i/dS_j = c * sum_t (x_t V)_j (delta_t U)_j,   delta_t = dL_i/dy_t,
    with x the adapter's (dropped-out) input and y its output. The examples do not interact
    (attention is per row), so the summed loss sum_i L_i gives each example's delta in one
    backward. ``test_batched_noise_probe_matches_per_example_passes`` checks it against one
    backward per example.
    """
    if any(bool((s != 0).any()) for _, _, s, _ in adapters.triples()):
        raise ValueError("per-example gradients by this formula need S = 0 (initialisation)")
    # The formula reads only the captured (x V, delta U): U and V are frozen for the pass, so
    # the forward saves nothing for their gradients and the backward allocates none (what the
    # backward computes for S and the activations is unchanged).
    frames = [(x, x.requires_grad) for _, u, _, v in adapters.triples() for x in (u, v)]
    adapters.capture, adapters.draws = {}, []
    try:
        for x, _ in frames:
            x.requires_grad_(False)
        labels = nn.functional.pad(batch.labels[:, 1:], (0, 1), value=-100)  # (b, T): t -> t+1
        counted = (labels != -100).sum(dim=1, keepdim=True).clamp(min=1)
        # sum_i L_i, L_i example i's mean answer-token loss: weight 1 / (its answer tokens)
        answer_loss_backward(model, batch.input_ids, batch.attention_mask, labels,
                             1.0 / counted.float())
        rows = [adapters.specs[name].scale
                * torch.einsum("btr,btr->br", slot["a"].double(), slot["e"].double())
                for name, slot in ((n, adapters.capture[n]) for n in adapters.specs)]
        draws = adapters.draws
    finally:
        adapters.capture, adapters.draws = None, None
        for x, wanted in frames:
            x.requires_grad_(wanted)
        for p in adapters.parameters():
            p.grad = None
    return torch.cat(rows, dim=1), draws


@torch.no_grad()
def generation_stats(model, prompts: list[torch.Tensor], new_tokens: int, pad_id: int):
    """Mean next-token entropy and 4-gram repetition rate of greedy continuations."""
    entropies, reps = [], []
    for prompt in prompts:
        out = model.generate(prompt.unsqueeze(0), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad_id)
        for logits in out.logits:  # (1, V) raw logits per generated token
            probs = torch.softmax(logits[0].double(), -1)
            entropies.append(float(torch.special.entr(probs).sum()))  # 0 log 0 = 0
        reps.append(ngram_repetition(out.sequences[0, prompt.shape[0]:].tolist()))
    return sum(entropies) / len(entropies), sum(reps) / len(reps)


def probe_passes(examples, micro_batch: int, pad_id: int) -> list:
    """The noise probe's batches on torch: examples of similar length share a pass (less
    padding; the estimator does not depend on order), ``micro_batch`` at a time."""
    probe = sorted(examples, key=lambda ex: len(ex.input_ids))
    return [collate(list(probe[i:i + micro_batch]), pad_id=pad_id)
            for i in range(0, len(probe), micro_batch)]


def seed_generators(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and ``device``'s (no other device's, unlike torch.manual_seed)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


class TorchOps:
    """The derived trainer's operations on a torch model (its adapters: :class:`FactoredAdapters`)."""

    name = "torch"
    mass_on_host = True  # MASS reads the loss and gradient norm as Python floats

    def __init__(self, model):
        self.model = model
        self.adapters: FactoredAdapters | None = None
        self._pool = None
        # the noise probe's dropout draws (None: it drew from the run's generator)
        self.probe_draws: list[tuple[int, float, int]] | None = []

    # -- set-up ------------------------------------------------------------------------------

    def prepare(self, splits) -> None:
        """(Nothing to size in advance: torch runs every batch shape eagerly.)"""

    def candidate_weights(self) -> dict[str, torch.Tensor]:
        return {name: lin.weight.detach() for name, lin in candidate_linears(self.model).items()}

    @contextlib.contextmanager
    def derivation_map(self):
        """Two threads share the matrices (LAPACK releases the GIL), one BLAS thread each."""
        with one_lapack_thread(), worker_pool(2) as pool:
            yield pool.map

    @torch.no_grad()
    def residual_scales(self, blocks: list[str], calib) -> dict[str, geometry.Derived]:
        """sigma_max(x) / sigma_max(f(x)) per decoder block on a calibration batch (row 15)."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        modules = dict(self.model.named_modules())

        def capture(name):
            def hook(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                captured[name] = (x.detach(), y.detach())
            return hook

        handles = [modules[b].register_forward_hook(capture(b), with_kwargs=True) for b in blocks]
        try:
            self.model(input_ids=calib.input_ids, attention_mask=calib.attention_mask)
        finally:
            for h in handles:
                h.remove()
        mask = calib.attention_mask.bool()
        scales = {}
        for name in blocks:
            x, y = captured[name]
            x2, f2 = x[mask].double(), (y - x)[mask].double()  # (tokens, d): the residual branch
            scales[name] = geometry.residual_scale(x2, f2)
        return scales

    def attach(self, specs: dict[str, AdapterSpec], init: str, seed: int, rule=None,
               frames: dict[str, tuple] | None = None) -> None:
        """Hook U diag(S) V^T adapters (S = 0) onto the frozen model: backward then computes
        gradients only for U, S, V. ``frames``: the starting (U, V) by name, computed before
        for these specs and ``init`` (else computed here)."""
        self.model.requires_grad_(False)
        torch.manual_seed(seed)
        linears = candidate_linears(self.model)
        if frames is not None:
            frames = {n: tuple(x.to(linears[n].weight.device) for x in uv)
                      for n, uv in frames.items()}
        self.adapters = FactoredAdapters(linears, specs, init, seed, frames)
        self.model.train()
        threads = torch.get_num_threads()
        # (one torch thread per worker: see runner.training.runtime.worker_pool for why)
        self._pool = worker_pool(threads) if threads > 1 else None
        if self._pool is not None:  # its idle threads end with these ops
            weakref.finalize(self, self._pool.shutdown, wait=False)

    def apply_start(self, rule, seed: int) -> None:
        """Move the adapters from the probe's start (S = 0) to the reading's (Start)."""
        if rule.start.value == "tail":
            self.adapters.start_from_tail(candidate_linears(self.model))
        elif rule.nb_lora:
            specs = self.adapters.specs
            self.adapters.remove()
            self.adapters = NbLoraAdapters(candidate_linears(self.model), specs, seed)
            self.model.train()

    @property
    def probe_stream_own(self) -> bool:
        """Whether the noise probe can draw its masks from a generator of its own: not when the
        model's own training forward draws random numbers (its dropout), whose draws the probe
        cannot replay on the run's generator."""
        return not random_forward(self.model, training=True)

    def example_s_grads(self, examples, pad_id: int, micro_batch: int, seed: int):
        """Per-example S gradients (n, sum r), float64, of the probe ``examples``, in the passes
        of :func:`probe_passes`.

        The adapters' dropout masks come from torch's generator seeded with ``seed`` (the
        probe's own, not the run's), so the probe depends on the run's seed only through a
        random start's frames. The run's generator is then advanced by the same draws
        (:meth:`replay_probe`; they are kept in ``probe_draws`` for the set-up cache), so that
        training draws the masks it drew when the probe took them from the run's generator,
        and the same whether the probe ran or was read back. A model whose own forward draws
        (``probe_stream_own`` false) is probed on the run's generator, as before; its
        ``probe_draws`` are then None."""
        device = next(self.model.parameters()).device

        def passes() -> tuple[torch.Tensor, list]:
            grads, draws = [], []
            for batch in probe_passes(examples, micro_batch, pad_id):
                g, d = per_example_s_grads(self.model, self.adapters, batch)
                grads.append(g)
                draws += d
            return torch.cat(grads), draws

        if not self.probe_stream_own:
            grads, self.probe_draws = passes()[0], None
            return grads
        # fork_rng forks the CPU generator always, and the model's device's when it is an
        # accelerator (its device_type names the accelerator kind; unused with no devices)
        devices, kind = ([], "cuda") if device.type == "cpu" else ([device], device.type)
        with torch.random.fork_rng(devices=devices, device_type=kind):
            seed_generators(device, seed)
            grads, draws = passes()
        self.probe_draws = draws
        self.replay_probe(draws)
        return grads

    def replay_probe(self, draws: list) -> None:
        """Advance torch's generator by the probe's dropout draws (``probe_draws`` of the probe
        that ran, or as read back from the set-up cache): the same draws, discarded."""
        device = next(self.model.parameters()).device
        for n, p, r in draws:
            dropout_draws(int(n), float(p), int(r), device)

    def warm_up(self, trainer, batch) -> None:
        """(Nothing to compile.)"""

    # -- training ----------------------------------------------------------------------------

    def params(self) -> list[torch.Tensor]:
        return list(self.adapters.parameters())

    def train_mode(self) -> None:
        self.model.train()
        self.adapters.train()

    def eval_mode(self) -> None:
        self.model.eval()
        self.adapters.eval()

    def forward_backward(self, batch, micro_batch: int, batch_size: int, *, step: int,
                         train: bool = True):
        """(Mean loss over the batch's answer tokens, float64; the gradients of every adapter
        parameter), accumulated over micro-batches. Dropout follows the modules' mode."""
        del batch_size, step, train
        params = self.params()
        for p in params:
            p.grad = None
        loss = self._loss_backward(batch, micro_batch)
        return loss, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    @staticmethod
    def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor norms in one fused call, combined in float64."""
        return torch.stack(torch._foreach_norm(grads)).double().norm()

    def adapter_grad_norms(self, grads) -> torch.Tensor:
        """||g_W|| of every adapter (its U, S and V gradients together), float64, in the
        adapters' order."""
        del grads  # the gradients are the parameters' .grad
        per = [torch.stack(torch._foreach_norm([p.grad if p.grad is not None else
                                                torch.zeros_like(p) for p in (u, s, v)]))
               for _, u, s, v in self.adapters.triples()]
        return torch.stack(per).double().norm(dim=1)

    def update(self, grads, eta, rule, *, keep_direction: bool):
        """One step on every adapter, in place: (direction by name if kept, else None;
        largest orthogonality error, largest c max(S) / sigma_k, step telemetry by name).
        ``eta``: one step, or one per adapter in the adapters' order. The adapters are
        independent: they update on as many threads as torch uses. The direction is a
        by-product, but one the size of the adapters: only the certificate reads it, so it is
        held only when ``keep_direction`` says so."""
        del grads  # the gradients are the parameters' .grad
        triples = list(self.adapters.triples())
        etas = [float(e) for e in eta] if hasattr(eta, "__len__") else [eta] * len(triples)
        work = list(zip(triples, etas, strict=True))
        if self._pool is None:
            updates = [self._update(t, e, rule, keep_direction) for t, e in work]
        else:
            updates = list(self._pool.map(
                lambda te: self._update(te[0], te[1], rule, keep_direction), work))
        names = [name for name, *_ in triples]
        direction = ({n: up[0] for n, up in zip(names, updates, strict=True)}
                     if keep_direction else None)
        orth = max((up[1] for up in updates), default=0.0)
        s_ratio = max((up[2] for up in updates), default=0.0)
        telemetry = {n: up[3] for n, up in zip(names, updates, strict=True)}
        return direction, orth, s_ratio, telemetry

    @torch.no_grad()  # (grad mode is per thread: the pool's threads need it said here)
    def _update(self, triple, eta: float, rule, keep_direction: bool = True):
        """One adapter's step: (U, S, V) change in place; returns (direction or None,
        orthogonality error, c max(S) / sigma_k, telemetry)."""
        if rule.nb_lora:
            return self._update_free(triple, eta, keep_direction)
        name, u, s, v = triple
        spec = self.adapters.specs[name]
        # Along -grad for time eta = along grad for time -eta (A is linear in the direction),
        # which saves negating the gradients. The frames move in place by the displacement,
        # which is kept as the step's direction.
        du, dv = (geometry.cayley_displacement(x, x.grad, -eta, series=True)
                  if x.grad is not None else torch.zeros_like(x) for x in (u, v))
        upper, decay = rule.bounds(spec)
        grad_s = s.grad if s.grad is not None else torch.zeros_like(s)
        new_s = rule.s_step(s, grad_s, eta, upper, decay)
        lower = rule.lower(upper)
        telemetry = adapter_step_telemetry(u, u + du, v, v + dv,
                                           (s - eta * grad_s).clamp(lower, upper), lower, upper,
                                           eta, spec.scale)
        direction = (du, new_s - s, dv) if keep_direction else None
        u.add_(du), v.add_(dv), s.copy_(new_s)
        orth = max(geometry.orthogonality_error(u), geometry.orthogonality_error(v))
        return direction, orth, spec.scale * float(s.abs().max()) / spec.sigma_k, telemetry

    def _update_free(self, triple, eta: float, keep_direction: bool = True):
        """derived_seed_code: plain SGD on the free parameters (B~, S_raw, A~), then S_raw
        clamped to [0, sigma_k], as the seed's code stepped them."""
        name, b, s, a = triple
        spec = self.adapters.specs[name]
        u0, _, v0 = (x.detach().clone() for x in self.adapters.factors(name))
        old = [x.detach().clone() for x in (b, s, a)]
        for x in (b, s, a):
            if x.grad is not None:
                x.sub_(eta * x.grad)
        s.clamp_(0.0, spec.sigma_k)
        u1, _, v1 = self.adapters.factors(name)
        telemetry = adapter_step_telemetry(u0, u1, v0, v1, s, 0.0, spec.sigma_k, eta, 1.0)
        direction = (tuple(x - x0 for x, x0 in zip((b, s, a), old, strict=True))
                     if keep_direction else None)
        orth = geometry.orthogonality_error(torch.cat([v1, u1]))
        return direction, orth, float(s.max()) / spec.sigma_k, telemetry

    def example_losses(self, examples, batch_size: int, pad_id: int):
        return example_losses(self.model, examples, batch_size, pad_id)

    def generation_stats(self, prompts, new_tokens: int, pad_id: int):
        return generation_stats(self.model, prompts, new_tokens, pad_id)

    # -- the certificate's curvature probe ---------------------------------------------------

    def _val_grads(self, val_batch, micro_batch: int) -> list[torch.Tensor]:
        """Gradients of the validation batch's loss, in ``adapters.triples()`` order (U, S, V
        of each); .grad is left cleared."""
        params = [p for _, u, s, v in self.adapters.triples() for p in (u, s, v)]
        for p in self.params():
            p.grad = None
        self._loss_backward(val_batch, micro_batch)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
        for p in self.params():
            p.grad = None
        return grads

    def curvature_grads(self, val_batch, direction, micro_batch: int, batch_size: int):
        """The validation gradients at x, x + d and x - d; the weights are restored from a
        copy (W + d - 2d + d is not W in floats)."""
        del batch_size
        d = self._flat(direction)
        params = [p for _, u, s, v in self.adapters.triples() for p in (u, s, v)]
        start = [p.detach().clone() for p in params]
        g0 = self._val_grads(val_batch, micro_batch)
        with torch.no_grad():
            for p, dp in zip(params, d, strict=True):
                p.add_(dp)
        g_plus = self._val_grads(val_batch, micro_batch)
        with torch.no_grad():
            for p, dp in zip(params, d, strict=True):
                p.sub_(2 * dp)
        g_minus = self._val_grads(val_batch, micro_batch)
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        return g0, g_plus, g_minus

    def _flat(self, direction) -> list[torch.Tensor]:
        if isinstance(direction, dict):
            return [delta for name in self.adapters.keys for delta in direction[name]]
        return direction

    def sub(self, a: list, b: list) -> list:
        return [x - y for x, y in zip(a, b, strict=True)]

    def dot(self, a, b) -> float:
        """sum over every tensor of a * b, each summed in float64."""
        return sum(float((x * y).double().sum())
                   for x, y in zip(self._flat(a), self._flat(b), strict=True))

    # -- checkpoints and export --------------------------------------------------------------

    def save_adapters(self) -> dict:
        return {k: v.detach().clone() for k, v in self.adapters.state_dict().items()}

    def load_adapters(self, state: dict) -> None:
        self.adapters.load_state_dict(state)

    @staticmethod
    def save_direction(direction):
        return direction

    @staticmethod
    def load_direction(direction):
        return direction

    @torch.no_grad()
    def host_usv(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The adapters as c U diag(S) V^T (NB-LoRA: its factors, 2 B^T diag(S) A)."""
        return {name: tuple(x.detach() for x in self.adapters.factors(name))
                for name in self.adapters.specs}

    def host_tails(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The tail start's frozen (U_t, a, V_t) by name (empty for the other readings)."""
        return dict(self.adapters.tails)

    def detach(self) -> None:
        """Remove the hooks: the base model is itself again."""
        self.adapters.remove()

    def _loss_backward(self, batch, micro_batch: int) -> torch.Tensor:
        """Mean loss over the batch's answer tokens; gradients accumulated over micro-batches."""
        total = max(int(batch.n_tokens), 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(0, batch.input_ids.shape[0], micro_batch):
            ids = batch.input_ids[i:i + micro_batch]
            labels = batch.labels[i:i + micro_batch]
            mask = batch.attention_mask[i:i + micro_batch]
            # Position t predicts token t+1: shift the labels (a small copy), not the logits.
            shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss_sum += answer_loss_backward(self.model, ids, mask, shifted, 1.0 / total)
        return loss_sum
