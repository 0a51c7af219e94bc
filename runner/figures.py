"""Figures for the experiment pages, rendered to PNG bytes that depend only on the data.

Matplotlib's Agg backend, a fixed style and `metadata={"Software": None}` (no version or date
in the file), so `make results` run twice writes the same bytes and rewrites nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.grid": True,
         "grid.alpha": 0.3, "svg.hashsalt": "modelcypher"}
DERIVED_COLOR = "#c0392b"  # the derived trainer stands out; baselines take the default cycle


@dataclass(frozen=True)
class Curve:
    """One seed's validation curve: tokens seen and validation loss at each evaluation."""

    tokens: Sequence[float]
    val_loss: Sequence[float]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _color(arm: str, i: int) -> str:
    return DERIVED_COLOR if arm.startswith("derived") else f"C{i % 10}"


def loss_curves(curves: dict[str, list[Curve]], title: str) -> bytes:
    """Mean validation loss vs tokens per arm, with the min-max band across seeds.

    Seeds evaluate at the same steps, so curves are aligned by evaluation index (up to the
    shortest seed) and plotted at the mean token count of that index.
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (arm, seeds) in enumerate(sorted(curves.items())):
            length = min(len(c.val_loss) for c in seeds)
            if length == 0:
                continue
            loss = np.array([c.val_loss[:length] for c in seeds], dtype=float)
            tokens = np.array([c.tokens[:length] for c in seeds], dtype=float).mean(axis=0)
            color = _color(arm, i)
            ax.plot(tokens, loss.mean(axis=0), color=color, label=f"{arm} ({len(seeds)} seeds)")
            if len(seeds) > 1:
                ax.fill_between(tokens, loss.min(axis=0), loss.max(axis=0), color=color,
                                alpha=0.2, linewidth=0)
        ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=title)
        ax.legend(loc="upper right")
        return _png(fig)


def final_loss_bars(finals: dict[str, list[float]], title: str) -> bytes:
    """Mean final validation loss per arm (bar), each seed as a dot, ±1 sd as the error bar."""
    arms = sorted(finals)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(arms) + 1.5), 3.6))
        for i, arm in enumerate(arms):
            vals = np.array(finals[arm], dtype=float)
            sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
            ax.bar(i, vals.mean(), yerr=sd, color=_color(arm, i), alpha=0.7, capsize=4)
            ax.plot(np.full(len(vals), i), vals, "k.", markersize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        low = min(min(v) for v in finals.values())
        high = max(max(v) for v in finals.values())
        pad = 0.15 * (high - low) + 1e-3
        ax.set_ylim(low - pad, high + pad)
        ax.set(ylabel="final validation loss", title=title)
        return _png(fig)


def spectra(singular_values: dict[str, Sequence[float]], title: str) -> bytes:
    """Normalised singular values s_i / s_1 per adapted matrix (log scale), at most 16 lines."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (name, s) in enumerate(sorted(singular_values.items())[:16]):
            s = np.asarray(s, dtype=float)
            if s.size and s[0] > 0:
                ax.semilogy(np.arange(1, s.size + 1), s / s[0], color=f"C{i % 10}",
                            linewidth=0.9, label=name)
        ax.set(xlabel="index i", ylabel="s_i / s_1", title=title)
        if singular_values:
            ax.legend(fontsize=6, ncol=2, loc="lower left")
        return _png(fig)


def throughput_bars(tok_s: dict[str, Sequence[float]], title: str) -> bytes:
    """Median training tokens/s per trainer (bar, in the given order), min-max over
    repetitions as the error bar."""
    arms = list(tok_s)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(arms) + 1.5), 3.6))
        for i, arm in enumerate(arms):
            vals = np.asarray(tok_s[arm], dtype=float)
            mid = float(np.median(vals))
            ax.bar(i, mid, yerr=[[mid - vals.min()], [vals.max() - mid]],
                   color=_distinct_color(arm, i), alpha=0.8, capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set(ylabel="training tokens / s", title=title)
        return _png(fig)


def loss_vs_tokens(curves: dict[str, Curve], title: str) -> bytes:
    """Validation loss against training tokens, one run per trainer (in the given order)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (arm, c) in enumerate(curves.items()):
            ax.plot(np.asarray(c.tokens, dtype=float), np.asarray(c.val_loss, dtype=float),
                    marker=".", color=_distinct_color(arm, i), label=arm)
        ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=title)
        if curves:
            ax.legend(loc="best")
        return _png(fig)


def _distinct_color(arm: str, i: int) -> str:
    """Like `_color`, but baselines skip C3 (red), so none is mistaken for the derived trainer."""
    if arm.startswith("derived"):
        return DERIVED_COLOR
    return ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")[i % 9]
