"""trainer=derived: LoRA with every hyperparameter derived from the weights (geometry/).

Each target Linear W (out x in) gets an adapter dW = c * U diag(S) V^T (SEED-SPEC rows 3, 10, 14,
15): U (out x r) and V (in x r) have orthonormal columns and start at W's singular vectors just
past its structural rank ("null-space capacity" directions), S starts at 0 so the model is
unchanged at step 0, and c is the block's residual scale. One step:

    1. forward/backward on the batch (split into micro-batches to reach the derived B_crit);
    2. eta = MASS(loss, ||g||) = min(ceiling, SPS, Weyl)                    (row 1)
    3. U, V <- Cayley retraction of -eta * grad on the Stiefel manifold      (row 3, no momentum)
    4. S <- clamp(S - eta * grad_S, 0, sigma_k / c) * (1 - eta * sigma_k/sigma_max)  (rows 4, 10)

The clamp keeps ||dW||_2 = c max(S) <= sigma_k at every step (row 10's Weyl guarantee holds
with the residual scale c of row 15 folded in; docs/derivations.md).

No learning rate, warmup, schedule, clipping, rank or alpha exists to set. The adapter is
exported as plain PEFT LoRA: B = c * U diag(S), A = V^T, lora_alpha = r (scaling 1).
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import geometry
from geometry._xp import host_eigh, one_lapack_thread, worker_pool
from runner.training import StepLog

# ---------------------------------------------------------------------------------------------
# Which matrices, and the factored adapters on them


def candidate_linears(model) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks (embeddings and lm_head are not adapted)."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }


def block_of(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `model.layers.3`."""
    head, _, rest = name.partition(".layers.")
    return f"{head}.layers.{rest.split('.', 1)[0]}"


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    dropout: float
    sigma_k: float  # ||dW||_2 = scale * max(S) <= sigma_k (S is clamped to [0, sigma_k/scale])
    decay: float  # sigma_k / sigma_max: the decoupled shrinkage rate of S
    first_index: int  # 0-based index of the first singular vector used (the structural rank k)
    scale: float  # residual scale c of the block


class FactoredAdapters(nn.Module):
    """U diag(S) V^T adapters applied to their Linears by forward hooks (no module surgery)."""

    def __init__(self, linears: dict[str, nn.Linear], specs: dict[str, AdapterSpec],
                 init: str, seed: int):
        super().__init__()
        self.specs = specs
        self.keys = {name: name.replace(".", "__") for name in specs}
        self.U, self.S, self.V = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        frames = self._frames(linears, specs, init, gen)
        for name, spec in specs.items():
            u, v = frames[name]
            key = self.keys[name]
            self.U[key] = nn.Parameter(u)
            self.V[key] = nn.Parameter(v)
            self.S[key] = nn.Parameter(torch.zeros(spec.rank, dtype=u.dtype))
        self._handles = [linears[name].register_forward_hook(self._hook(name)) for name in specs]
        # name -> {"a": x V, "e": dL/dy U}, filled while `capture` is not None (noise probe)
        self.capture: dict[str, dict[str, torch.Tensor]] | None = None

    @staticmethod
    def _frames(linears, specs, init: str, gen: torch.Generator) -> dict[str, tuple]:
        """Every adapter's initial (U, V). The singular-vector inits are independent per matrix
        (one Gram eigendecomposition each), so they run on as many threads as torch uses (LAPACK
        releases the GIL); a random init draws from one generator, in order."""
        def one(name):
            return initial_frames(linears[name].weight.detach(), specs[name], init, gen)

        threads = torch.get_num_threads()
        if init == "random" or threads < 2 or len(specs) < 2:
            return {name: one(name) for name in specs}
        with one_lapack_thread(), worker_pool(threads) as pool:
            return dict(zip(specs, pool.map(one, specs), strict=True))

    def _hook(self, name: str):
        key, spec = self.keys[name], self.specs[name]

        def hook(module, args, output):
            # out = y + c (x V) diag(S) U^T: (..., in) @ (in, r), scaled by an r-vector, then
            # added to y inside one GEMM (addmm). Every scalar (c and the dropout rescale)
            # rides on the r-vector, so no (..., out)-sized tensor is multiplied.
            p = spec.dropout if self.training else 0.0
            a, rescale = dropout_projection(args[0], self.V[key], p)
            coef = self.S[key] * (spec.scale * rescale)
            u = self.U[key]
            flat = torch.addmm(output.reshape(-1, output.shape[-1]),
                               (a * coef).reshape(-1, a.shape[-1]), u.T)
            out = flat.view(output.shape)
            if self.capture is not None and out.requires_grad:
                slot = self.capture[name] = {"a": (a * rescale).detach()}
                ud = u.detach()
                out.register_hook(lambda g: slot.__setitem__("e", (g @ ud).detach()))
            return out

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def triples(self):
        for name, key in self.keys.items():
            yield name, self.U[key], self.S[key], self.V[key]


DROPOUT_LEVELS = 1 << 16  # the dropout mask's resolution: 16 random bits per element
# The three int16 words of an int64 that hold its low 48 bits.
_LOW_48_BITS = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold, realized p): an element is dropped when its uniform int16 draw is below
    the threshold, which happens with probability round(p 2^16) / 2^16, within 2^-17 of p."""
    levels = round(p * DROPOUT_LEVELS)
    return levels - DROPOUT_LEVELS // 2, levels / DROPOUT_LEVELS


def keep_mask(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """A boolean mask of x's shape, True where the element is kept. The CPU generator's cost
    is per draw, so each 64-bit draw (``random_`` on int64: uniform on [0, 2^63), the low 48
    bits uniform) serves three elements with 16 bits each: a third of ``torch.rand_like``'s
    draws, and an int16 comparison instead of a float32 one."""
    n = x.numel()
    words = (n + 2) // 3
    draws = torch.empty(words, dtype=torch.int64, device=x.device).random_()
    keep = draws.view(torch.int16).view(words, 4)[:, _LOW_48_BITS] >= threshold
    return keep.reshape(-1)[:n].view(x.shape)


class _Masked(torch.autograd.Function):
    """x * keep that saves the 1-byte mask for backward (``x * keep.float()`` would save a
    4-byte copy; ``x * keep`` multiplies mixed dtypes, 4x slower here)."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x * keep.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None


# Sparse dropout (below) when p * r is at most this: its scattered K x r corrections (K ~ p x
# the input's elements) then cost less than the dense mask's passes over the whole input.
SPARSE_DROPOUT_MAX_PR = 0.5


def dropped_positions(n: int, p: float, device=None) -> torch.Tensor:
    """The dropped positions among n elements that each drop independently with probability p:
    sorted, distinct int64 indices, drawn as an iid Bernoulli(p) process through its geometric
    gaps (gap - 1 = floor(log U / log(1-p)), U uniform on (0, 1], in float64). Exact in
    distribution, and about n p draws instead of one per element."""
    if p <= 0.0 or n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    log_q = math.log1p(-p)
    mean = n * p
    chunk = int(mean + 6.0 * math.sqrt(mean) + 16)  # rarely needs a second chunk
    parts, last = [], -1.0
    while True:
        u = 1.0 - torch.rand(chunk, dtype=torch.float64, device=device)  # (0, 1]
        pos = last + torch.cumsum(torch.floor(torch.log(u) / log_q) + 1.0, 0)
        if bool(pos[-1] >= n):
            parts.append(pos[pos < n])
            return torch.cat(parts).to(torch.int64)
        parts.append(pos)
        last = float(pos[-1])


class _DroppedProjection(torch.autograd.Function):
    """a = (x * M) V for x (N, in) and the 0/1 mask M that is 0 at the dropped (rows, cols),
    without forming x * M: a = x V - sum over dropped (t, i) of x[t, i] V[i, :]. Backward:
    dx = da V^T with the dropped entries zeroed, dV = x^T da - the same scattered terms. It
    saves x itself (q, k and v share one input, so they save one tensor, not three masked
    copies)."""

    @staticmethod
    def forward(ctx, x, v, rows, cols):
        dropped = x[rows, cols].unsqueeze(1)  # (K, 1): the dropped inputs' values
        a = x @ v
        a.index_add_(0, rows, dropped * v[cols], alpha=-1.0)
        ctx.save_for_backward(x, v, rows, cols, dropped)
        return a

    @staticmethod
    def backward(ctx, grad):
        x, v, rows, cols, dropped = ctx.saved_tensors
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dx = grad @ v.T
            dx[rows, cols] = 0.0
        if ctx.needs_input_grad[1]:
            dv = x.T @ grad
            dv.index_add_(0, cols, dropped * grad[rows], alpha=-1.0)
        return dx, dv, None, None


def dropout_projection(x: torch.Tensor, v: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(dropout_p(x) V without the rescale, the rescale 1/(1-p)): inverted dropout on the
    adapter's input, its rescale left for the caller to apply to the r-wide side. Where few
    inputs drop (p r <= SPARSE_DROPOUT_MAX_PR) only the dropped positions are drawn and x V is
    corrected for them; otherwise a dense mask is drawn (p at 2^-16 resolution)."""
    if p <= 0:
        return x @ v, 1.0
    if p * v.shape[1] <= SPARSE_DROPOUT_MAX_PR:
        x2 = x.reshape(-1, x.shape[-1])
        pos = dropped_positions(x2.numel(), p, x.device)
        rows, cols = pos // x2.shape[1], pos % x2.shape[1]
        a = _DroppedProjection.apply(x2, v, rows, cols)
        return a.view(*x.shape[:-1], -1), 1.0 / (1.0 - p)
    threshold, p_dense = dropout_threshold(p)
    return _Masked.apply(x, keep_mask(x, threshold)) @ v, 1.0 / (1.0 - p_dense)


def initial_frames(w: torch.Tensor, spec: AdapterSpec, init: str, gen: torch.Generator):
    """Orthonormal U (out x r), V (in x r): W's singular vectors k..k+r-1 (row 14), or ablations."""
    r = spec.rank
    if init == "random":
        u = torch.linalg.qr(torch.randn(w.shape[0], r, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(w.shape[1], r, generator=gen, dtype=torch.float64))[0]
        return u.to(w.dtype), v.to(w.dtype)
    start = 0 if init == "top" else spec.first_index
    start = min(start, min(w.shape) - r)
    u, v = singular_frames(w.float(), start, r)
    return u.contiguous().to(w.dtype), v.contiguous().to(w.dtype)


def singular_frames(w: torch.Tensor, start: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right singular vectors start..start+r-1 (descending order) of w, orthonormal.

    From the eigenvectors of the smaller Gram matrix (a q x q symmetric eigenproblem, several
    times cheaper than a full SVD of the m x n matrix): for W^T W = V diag(s^2) V^T the left
    vectors are W V / s. The frames only initialise the adapter, so float32 suffices: an
    eigenvector's error is about eps * s_1^2 / gap, which mixes it only with its spectral
    neighbours (directions of nearly the same singular value, an equally valid start). The
    division by s loses accuracy near the noise floor, and float32 eigenvectors are orthogonal
    only to about q * eps, so both sides are re-orthonormalised by QR (signs kept: R's diagonal
    made positive), which leaves them orthonormal to float32 rounding.
    """
    m, n = w.shape
    tall = m >= n
    gram = w.T @ w if tall else w @ w.T  # (q, q)
    lam, small_side = _gram_eigenpairs(gram, start, r)  # (r,), (q, r): descending
    s = lam.clamp(min=0).sqrt()
    other = (w @ small_side if tall else w.T @ small_side) / s.clamp(min=torch.finfo(w.dtype).tiny)
    small_side, other = _orthonormal(small_side), _orthonormal(other)
    return (other, small_side) if tall else (small_side, other)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """The Q factor of x = QR with R's diagonal made positive (same column span and signs)."""
    q, rr = torch.linalg.qr(x)
    d = torch.diagonal(rr)
    return q * torch.sign(d).where(d != 0, torch.ones_like(d))


def _gram_eigenpairs(gram: torch.Tensor, start: int, r: int):
    """Eigenvalues start..start+r-1 of the symmetric ``gram`` counted from the largest, and
    their eigenvectors, in descending order.

    On the CPU only those r eigenvectors are computed (LAPACK's ``ssyevr``, MRRR, through SciPy,
    with the tridiagonalisation every method shares): 3.1 s for the 210 matrices of
    SmolLM2-135M on one thread, against 5.0 s for torch's full ``eigh``. On other devices it is
    torch's full ``eigh``, sliced.
    """
    q = gram.shape[0]
    if gram.device.type == "cpu":
        lam, vecs = host_eigh(gram.detach().numpy(), subset=(q - start - r, q - 1 - start))
        return (torch.from_numpy(lam[::-1].copy()).to(gram.dtype),
                torch.from_numpy(vecs[:, ::-1].copy()).to(gram.dtype))
    lam, vecs = torch.linalg.eigh(gram)  # ascending
    idx = torch.arange(q - 1 - start, q - 1 - start - r, -1)
    return lam[idx], vecs[:, idx]


# ---------------------------------------------------------------------------------------------
# Calibration: residual scales (row 15) and the gradient noise scale (row 8)


@torch.no_grad()
def residual_scales(model, blocks: list[str], calib) -> dict[str, geometry.Derived]:
    """sigma_max(x) / sigma_max(f(x)) per decoder block on a calibration batch (row 15)."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(model.named_modules())

    def capture(name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            captured[name] = (x.detach(), y.detach())
        return hook

    handles = [modules[b].register_forward_hook(capture(b), with_kwargs=True) for b in blocks]
    try:
        model(input_ids=calib.input_ids, attention_mask=calib.attention_mask)
    finally:
        for h in handles:
            h.remove()
    mask = calib.attention_mask.bool()
    scales = {}
    for name in blocks:
        x, y = captured[name]
        x2, f2 = x[mask].double(), (y - x)[mask].double()  # (tokens, d): the block's residual branch
        scales[name] = geometry.residual_scale(x2, f2)  # a Derived record
    return scales


def measure_noise_scale(model, adapters: FactoredAdapters, examples, collate, n_train: int,
                        n_probe: int, micro_batch: int) -> geometry.NoiseScale:
    """McCandlish et al. (2018) two-batch-size estimator from measured gradient norms (row 8).

    The first ``n_probe`` training examples each give one per-example gradient g_i (batch 1);
    their mean is the gradient of the batch of all ``n_probe``. So one pass yields both terms of
    the estimator: |G_1|^2 = mean_i |g_i|^2 (B = 1) and |G_n|^2 = |mean_i g_i|^2 (B = n_probe).
    An estimate of B_simple above n_probe is not resolved by this sample (the signal |G|^2 is
    below the estimator's noise), so B_crit is capped at n_probe (docs/derivations.md, row 8).

    The per-example gradients come from batched passes (``micro_batch`` examples each), not
    one pass per example: see :func:`per_example_s_grads`.
    """
    n_probe = min(n_probe, len(examples))
    if n_probe < 2:
        raise ValueError(f"the noise-scale probe needs >= 2 training examples (got {n_probe})")
    # Examples of similar length share a pass (less padding); the order does not matter.
    probe = sorted(examples[:n_probe], key=lambda ex: len(ex.input_ids))
    grads = torch.cat([per_example_s_grads(model, adapters, collate(probe[i:i + micro_batch]))
                       for i in range(0, n_probe, micro_batch)])  # (n_probe, sum r)
    single_sq = float((grads * grads).sum()) / n_probe
    mean_sq = float((grads.mean(dim=0) ** 2).sum())
    biased = (geometry.per_sample_noise_scale(single_sq, mean_sq, n_probe)
              if mean_sq > 0 else math.nan)  # the seed's estimator, recorded beside ours
    return geometry.gradient_noise_scale(single_sq, mean_sq, 1, n_probe,
                                         n_train=n_train, b_max=n_probe, b_biased=biased)


def per_example_s_grads(model, adapters: FactoredAdapters, batch) -> torch.Tensor:
    """Per-example gradients (float64, one row per example) of each example's mean answer-token
    loss with respect to every adapter parameter, from one forward/backward of the batch.

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
    adapters.capture = {}
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = nn.functional.pad(batch.labels[:, 1:], (0, 1), value=-100)  # (b, T): t -> t+1
        ce = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=-100, reduction="none").view(labels.shape)  # (b, T)
        counted = (labels != -100).sum(dim=1).clamp(min=1)
        (ce.sum(dim=1) / counted).sum().backward()
        rows = [adapters.specs[name].scale
                * torch.einsum("btr,btr->br", slot["a"].double(), slot["e"].double())
                for name, slot in ((n, adapters.capture[n]) for n in adapters.specs)]
    finally:
        adapters.capture = None
        for p in adapters.parameters():
            p.grad = None
    return torch.cat(rows, dim=1)


# ---------------------------------------------------------------------------------------------
# The trainer


class DerivedTrainer:
    """Riemannian SGD on U, V (Cayley retraction) and projected SGD on S, with MASS steps."""

    def __init__(self, model, adapters: FactoredAdapters, derived, batch_size: int,
                 micro_batch: int, *, ceiling: float, floor: float):
        self.model, self.adapters, self.derived = model, adapters, derived
        self.batch_size, self.micro_batch = batch_size, micro_batch
        self.params = list(adapters.parameters())
        self.ceiling, self.floor = ceiling, floor
        self.sigma_k_min = float(derived.sigma_k_min)
        self.last_direction: dict[str, torch.Tensor] | None = None
        threads = torch.get_num_threads()
        # (one torch thread per worker: see worker_pool for why)
        self._pool = worker_pool(threads) if threads > 1 else None
        if self._pool is not None:  # its idle threads end with the trainer
            weakref.finalize(self, self._pool.shutdown, wait=False)

    def train_mode(self) -> None:
        self.model.train()
        self.adapters.train()

    def eval_mode(self) -> None:
        self.model.eval()
        self.adapters.eval()

    def _forward_backward(self, batch) -> torch.Tensor:
        """Mean loss over the batch's answer tokens; gradients accumulated over micro-batches."""
        total = max(int(batch.n_tokens), 1)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(0, batch.input_ids.shape[0], self.micro_batch):
            ids = batch.input_ids[i:i + self.micro_batch]
            labels = batch.labels[i:i + self.micro_batch]
            mask = batch.attention_mask[i:i + self.micro_batch]
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (b, T, V)
            # Position t predicts token t+1: shift the labels (a small copy), not the logits.
            shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
                ignore_index=-100, reduction="sum",
            ) / total
            loss.backward()
            loss_sum += loss.detach().double()
        return loss_sum

    def step(self, batch) -> StepLog:
        # 1. Loss and gradients (micro-batched to the derived batch size).
        self.train_mode()
        for p in self.params:
            p.grad = None
        loss = self._forward_backward(batch)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # Per-tensor norms in one fused call, combined in float64.
        grad_norm = torch.stack(torch._foreach_norm(grads)).double().norm()
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            return StepLog(loss=float(loss), extra={"grad_norm": float(grad_norm)})

        # 2. MASS step size (row 1): which of the three terms binds is logged.
        mass = geometry.mass_step_size(float(loss), float(grad_norm), self.sigma_k_min,
                                       self.ceiling, self.floor)
        eta = float(mass.step)

        # 3-4. Retract U, V on their Stiefel manifolds; project S into [0, sigma_k] and decay it.
        #      The adapters are independent: they update on as many threads as torch uses (the
        #      many small products do not parallelise inside one op; across adapters they do).
        triples = list(self.adapters.triples())
        if self._pool is None:
            updates = [self._update(t, eta) for t in triples]
        else:
            updates = list(self._pool.map(lambda t: self._update(t, eta), triples))
        self.last_direction = {name: d for (name, *_), (d, _, _) in zip(triples, updates, strict=True)}
        orth = max((o for _, o, _ in updates), default=0.0)
        s_ratio = max((r for _, _, r in updates), default=0.0)
        return StepLog(loss=float(loss), extra={
            "grad_norm": float(grad_norm), "step_size": eta, "bound": mass.bound,
            "update_norm": eta * float(grad_norm), "weyl_bound": self.sigma_k_min,
            "orth_error": orth, "adapter_norm_ratio": s_ratio,
        })

    @torch.no_grad()  # (grad mode is per thread: the pool's threads need it said here)
    def _update(self, triple, eta: float):
        """One adapter's step: (U, S, V) change in place; returns (direction, orthogonality
        error, c max(S) / sigma_k)."""
        name, u, s, v = triple
        spec = self.adapters.specs[name]
        # Along -grad for time eta = along grad for time -eta (A is linear in the direction),
        # which saves negating the gradients. The frames move in place by the displacement,
        # which is kept as the step's direction.
        du, dv = (geometry.cayley_displacement(x, x.grad, -eta, series=True)
                  if x.grad is not None else torch.zeros_like(x) for x in (u, v))
        new_s = (s - eta * s.grad) if s.grad is not None else s.clone()
        # ||c U diag(S) V^T||_2 = c max(S) <= sigma_k (row 10, with the residual scale c)
        new_s = new_s.clamp(0.0, spec.sigma_k / spec.scale) * (1.0 - eta * spec.decay)
        direction = (du, new_s - s, dv)
        u.add_(du), v.add_(dv), s.copy_(new_s)
        orth = max(geometry.orthogonality_error(u), geometry.orthogonality_error(v))
        return direction, orth, spec.scale * float(s.max()) / spec.sigma_k

    # -- what the stopping certificate asks (CertificateMonitor) ------------------------------

    def generation_stats(self, prompts: list[torch.Tensor], new_tokens: int, pad_id: int):
        return generation_stats(self.model, prompts, new_tokens, pad_id)

    def _val_grads(self, val_batch) -> list[torch.Tensor]:
        """Gradients of the validation batch's loss for every adapter parameter, in
        ``adapters.triples()`` order (U, S, V of each); .grad is left cleared."""
        params = [p for _, u, s, v in self.adapters.triples() for p in (u, s, v)]
        for p in self.params:
            p.grad = None
        self._forward_backward(val_batch)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
        for p in self.params:
            p.grad = None
        return grads

    def curvature(self, val_batch) -> tuple[float, float]:
        """a = grad L_val . d and b = d^T H_val d along the last update d, by central
        differences of the validation gradient; NaN before the first step. The weights end
        bitwise where they started (restored from a copy: W + d - 2d + d is not W in floats)."""
        if self.last_direction is None:
            return math.nan, math.nan
        d = [delta for name in self.adapters.keys for delta in self.last_direction[name]]
        params = [p for _, u, s, v in self.adapters.triples() for p in (u, s, v)]
        start = [p.detach().clone() for p in params]
        g0 = self._val_grads(val_batch)
        with torch.no_grad():
            for p, dp in zip(params, d, strict=True):
                p.add_(dp)
        g_plus = self._val_grads(val_batch)
        with torch.no_grad():
            for p, dp in zip(params, d, strict=True):
                p.sub_(2 * dp)
        g_minus = self._val_grads(val_batch)
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        a = sum(float((g * dp).double().sum()) for g, dp in zip(g0, d, strict=True))
        b = sum(float(((gp - gm) * dp).double().sum()) / 2.0
                for gp, gm, dp in zip(g_plus, g_minus, d, strict=True))
        return a, b

    # -- checkpoints -------------------------------------------------------------------------

    def setup_summary(self) -> dict[str, float]:
        """What the set-up derived (recomputed on resume, so it must come out the same)."""
        return {"batch_size": self.batch_size, "micro_batch": self.micro_batch,
                "ceiling": self.ceiling, "floor": self.floor, "sigma_k_min": self.sigma_k_min}

    def state_dict(self) -> dict[str, Any]:
        """U, S, V and the last update (the certificate's curvature probe reads it); the set-up
        is not stored, only its summary, to check that the recomputed one agrees."""
        return {"adapters": {k: v.detach().clone() for k, v in self.adapters.state_dict().items()},
                "last_direction": self.last_direction, "setup": self.setup_summary()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_setup(self.setup_summary(), state["setup"])
        self.adapters.load_state_dict(state["adapters"])
        self.last_direction = state["last_direction"]

    # -- export ------------------------------------------------------------------------------

    def peft_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (lora_A (r x in), lora_B (out x r)) with B = c U diag(S), A = V^T."""
        out = {}
        for name, u, s, v in self.adapters.triples():
            scale = self.adapters.specs[name].scale
            out[name] = (v.detach().T.contiguous(), (scale * u.detach() * s.detach()).contiguous())
        return out

    def adapter_effective_ranks(self) -> dict[str, float]:
        return {name: geometry.effective_rank(s.detach().double()) if float(s.detach().max()) > 0 else 0.0
                for name, _, s, _ in self.adapters.triples()}


def export_peft(base_model, trainer: DerivedTrainer, derived) -> Any:
    """Remove the hooks and attach the same adapters as plain PEFT LoRA modules."""
    from peft import LoraConfig, get_peft_model

    trainer.adapters.remove()
    patterns = derived.peft_patterns()
    specs = trainer.adapters.specs
    dropout = sum(s.dropout for s in specs.values()) / len(specs)  # PEFT has one dropout
    config = LoraConfig(
        r=patterns["r"], lora_alpha=patterns["r"], target_modules=list(specs),
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
        lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base_model, config)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in trainer.peft_weights().items():
            layer = modules[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    return peft_model.eval()


def check_setup(ours: dict[str, float], theirs: dict[str, float]) -> None:
    """Refuse a checkpoint whose stored set-up summary differs from the recomputed one
    (relative 1e-6): its adapters were trained under other derived values."""
    differ = [f"{k} {theirs.get(k)} != {v}" for k, v in ours.items()
              if not math.isclose(float(theirs.get(k, math.nan)), float(v), rel_tol=1e-6)]
    if differ:
        raise ValueError("the derived set-up differs: " + ", ".join(differ))


def grad_norm_series(step_logs: list[dict]) -> list[float]:
    return [log["grad_norm"] for log in step_logs if math.isfinite(log.get("grad_norm", math.nan))]


# ---------------------------------------------------------------------------------------------
# The geometric stopping certificate (row 9), evaluated at every evaluation


def _ngram_repetition(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


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
        reps.append(_ngram_repetition(out.sequences[0, prompt.shape[0]:].tolist()))
    return sum(entropies) / len(entropies), sum(reps) / len(reps)


class CertificateMonitor:
    """Computes the four criteria at each evaluation; says when the certificate holds.

    The trainer supplies what depends on its model: ``generation_stats(prompts, new_tokens,
    pad_id)`` (mean next-token entropy and 4-gram repetition of greedy continuations) and
    ``curvature(val_batch)`` (a = grad L_val . d and b = d^T H_val d along its last update d);
    the torch trainer and the MLX/JAX one (runner.backends.derived_backend) both do."""

    def __init__(self, trainer, val_batch, prompts, pad_id: int, grad_window: int,
                 new_tokens: int = 16):
        self.trainer, self.val_batch, self.prompts = trainer, val_batch, prompts
        self.pad_id, self.grad_window, self.new_tokens = pad_id, grad_window, new_tokens
        # S = 0 here (a resumed run loads its adapters later): the base model's statistics
        self.base_entropy, self.base_rep = trainer.generation_stats(prompts, new_tokens, pad_id)
        self.history: list[dict] = []
        self.epoch_start_val: float | None = None

    def on_eval(self, evals, step_logs, per_example_val: list[float], epoch_start_val: float):
        """Evaluate the certificate; return (satisfied, record)."""
        t = self.trainer
        t.eval_mode()
        vals = [e.val_loss for e in evals]
        grad_norms = grad_norm_series(step_logs)
        criteria = [
            _windowed(geometry.gradient_stationarity, grad_norms, self.grad_window),
            geometry.predicted_improvement(*t.curvature(self.val_batch),
                                           geometry.validation_ci_half_width(per_example_val)),
            geometry.generation_drift(*_swap(t.generation_stats(self.prompts, self.new_tokens,
                                                                self.pad_id),
                                             self.base_entropy, self.base_rep)),
            _windowed(geometry.validation_stability, vals, 2),
        ]
        cert = geometry.stopping_certificate(*criteria,
                                             validation_fell=vals[-1] < epoch_start_val)
        record = {"step": evals[-1].step, "tokens": evals[-1].tokens, **cert.to_dict()}
        self.history.append(record)
        t.train_mode()
        return cert.satisfied, record


    def state_dict(self) -> dict[str, Any]:
        """The certificate's history (the base model's generation statistics are recomputed)."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def _swap(stats, base_entropy, base_rep):
    entropy, rep = stats
    return entropy, base_entropy, rep, base_rep


def _windowed(criterion, series, window):
    """A two-window criterion needs 2 full windows; before that it cannot pass."""
    if len(series) < 2 * window or window < 2:
        name = criterion.__name__
        return geometry.Criterion(name, math.nan, math.nan, False)
    return criterion(series, window)
