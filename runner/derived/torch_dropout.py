"""Inverted dropout on the adapter branch's input, for the torch adapters' hooks: a dense mask at
2^-16 resolution, or (where few inputs drop) only the dropped positions, drawn as a Bernoulli
process through its geometric gaps, with x V corrected for them."""

from __future__ import annotations

import math
import sys

import torch

DROPOUT_LEVELS = 1 << 16  # the dropout mask's resolution: 16 random bits per element
# The three int16 words of an int64 that hold its low 48 bits.
_LOW_48_BITS = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold, realized p): an element is dropped when its uniform int16 draw is below
    the threshold, which happens with probability round(p 2^16) / 2^16, within 2^-17 of p."""
    levels = round(p * DROPOUT_LEVELS)
    return levels - DROPOUT_LEVELS // 2, levels / DROPOUT_LEVELS


def mask_words(n: int, device=None) -> torch.Tensor:
    """The random words behind a dense mask of n elements (:func:`keep_mask`)."""
    return torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_()


def keep_mask(x: torch.Tensor, threshold: int, words: torch.Tensor | None = None) -> torch.Tensor:
    """A boolean mask of x's shape, True where the element is kept. The CPU generator's cost
    is per draw, so each 64-bit draw (``random_`` on int64: uniform on [0, 2^63), the low 48
    bits uniform) serves three elements with 16 bits each: a third of ``torch.rand_like``'s
    draws, and an int16 comparison instead of a float32 one. ``words``: those draws
    (:func:`mask_words`), drawn here if not given."""
    n = x.numel()
    draws = mask_words(n, x.device) if words is None else words
    keep = draws.view(torch.int16).view(-1, 4)[:, _LOW_48_BITS] >= threshold
    return keep.reshape(-1)[:n].view(x.shape)


class _MaskedProjection(torch.autograd.Function):
    """a = (x * keep) V that saves x and the 1-byte mask, not the 4-byte masked copy that
    ``(x * keep) @ v`` would save for dV: q, k and v share one input, so they save it once
    (and three masks) instead of three masked copies; when V is frozen (the noise probe) x
    is not saved at all. The backward recomputes x * keep for dV, one pass over the input,
    with the same operations autograd would run (bitwise the same gradients)."""

    @staticmethod
    def forward(ctx, x, keep, v):
        masked = x * keep.to(x.dtype)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, keep, v)
        return masked @ v

    @staticmethod
    def backward(ctx, grad):
        x, keep, v = ctx.saved_tensors
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dx = (grad @ v.T) * keep.to(grad.dtype)
        if ctx.needs_input_grad[2]:
            masked = (x * keep.to(x.dtype)).reshape(-1, x.shape[-1])
            dv = masked.T @ grad.reshape(-1, grad.shape[-1])
        return dx, None, dv


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


def dropout_draws(n: int, p: float, r: int, device=None) -> torch.Tensor | None:
    """The random draws of :func:`dropout_projection` on an input of n elements and an r-column
    V, from torch's generator: the dropped positions (sparse, p r <= SPARSE_DROPOUT_MAX_PR), the
    dense mask's words, or None (p = 0). Drawing them and discarding them advances the generator
    as the projection would (``TorchOps.replay_probe``)."""
    if p <= 0:
        return None
    if p * r <= SPARSE_DROPOUT_MAX_PR:
        return dropped_positions(n, p, device)
    return mask_words(n, device)


def dropout_projection(x: torch.Tensor, v: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(dropout_p(x) V without the rescale, the rescale 1/(1-p)): inverted dropout on the
    adapter's input, its rescale left for the caller to apply to the r-wide side. Where few
    inputs drop (p r <= SPARSE_DROPOUT_MAX_PR) only the dropped positions are drawn and x V is
    corrected for them; otherwise a dense mask is drawn (p at 2^-16 resolution)."""
    draws = dropout_draws(x.numel(), p, v.shape[1], x.device)
    if draws is None:
        return x @ v, 1.0
    if p * v.shape[1] <= SPARSE_DROPOUT_MAX_PR:
        x2 = x.reshape(-1, x.shape[-1])
        rows, cols = draws // x2.shape[1], draws % x2.shape[1]
        a = _DroppedProjection.apply(x2, v, rows, cols)
        return a.view(*x.shape[:-1], -1), 1.0 / (1.0 - p)
    threshold, p_dense = dropout_threshold(p)
    return (_MaskedProjection.apply(x, keep_mask(x, threshold, draws), v),
            1.0 / (1.0 - p_dense))
