"""Figures for the generated pages, as PNG bytes that depend only on the data.

Byte-stable: the Agg backend, a fixed style, size and dpi, no metadata (`Software: None`; Agg
writes no date), and plotted values rounded to 6 significant digits so that float noise in the
last bits of a mean cannot move a pixel.

Every arm has one colour in every figure (`arm_colours`): known trainers keep a fixed colour,
other arms take the next unused colour of a palette in sorted order, so no two arms of a page
ever share one.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "axes.grid": True,
         "grid.alpha": 0.3, "svg.hashsalt": "modelcypher", "path.simplify": False}
SIGNIFICANT = 6
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}  # never over the curves
# token counts on an axis as 20k, 140k (full numbers run into each other past 100,000)
TOKENS = FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}")


def _count(n: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# The trainers of conf/trainer/ (and the bench's peer) keep these colours on every page.
KNOWN_ARMS = {
    "derived": "#d62728",  # red: the method under test stands out
    "sgd": "#7f7f7f",
    "adamw": "#1f77b4",
    "adamw_grid": "#17becf",
    "adamw_all_linear": "#aec7e8",
    "adamw_derived_shape": "#9467bd",
    "prodigy": "#2ca02c",
    "schedulefree": "#ff7f0e",
    "muon": "#8c564b",
}
# Arms not listed above (other readings, hardware variants), in sorted order.
PALETTE = ("#e377c2", "#bcbd22", "#393b79", "#ff9896", "#637939", "#c49c94", "#843c39",
           "#98df8a", "#7b4173", "#dbdb8d", "#c5b0d5", "#ffbb78", "#9edae5", "#f7b6d2")


def _base(arm: str) -> str:
    """The trainer part of an arm label (`derived @ mlx` -> `derived`)."""
    return arm.split(" @ ", 1)[0]


def _extra_colour(i: int) -> str:
    """The i-th colour past the palette: golden-ratio hues, distinct as strings and to the eye."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1.0, 0.75, 0.7)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def arm_colours(arms: Iterable[str]) -> dict[str, str]:
    """One distinct colour per arm: a known trainer's own colour (the first arm of that trainer
    in sorted order keeps it), every other arm the next unused palette colour."""
    names = sorted(set(arms))
    out: dict[str, str] = {}
    for arm in names:
        colour = KNOWN_ARMS.get(_base(arm))
        if colour is not None and colour not in out.values():
            out[arm] = colour
    spare = [c for c in PALETTE if c not in KNOWN_ARMS.values()]
    extra = 0
    for arm in names:
        if arm in out:
            continue
        while not spare or spare[0] in out.values():
            if spare:
                spare.pop(0)
            else:
                spare.append(_extra_colour(extra))
                extra += 1
        out[arm] = spare.pop(0)
    return out


@dataclass(frozen=True)
class Curve:
    """One trial's validation curve: tokens seen, validation loss and (where the trial recorded
    them) seconds of training at each evaluation."""

    tokens: Sequence[float]
    val_loss: Sequence[float]
    seconds: Sequence[float] | None = None


def _data(values) -> np.ndarray:
    """Values as a float array rounded to `SIGNIFICANT` digits (no last-bit noise)."""
    a = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 10.0 ** (SIGNIFICANT - 1 - np.floor(np.log10(np.abs(a))))
        rounded = np.round(a * scale) / scale
    return np.where(np.isfinite(rounded) & (a != 0), rounded, a)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colours(colours: dict[str, str] | None, arms: Iterable[str]) -> dict[str, str]:
    arms = list(arms)
    return colours if colours is not None and set(arms) <= set(colours) else arm_colours(arms)


def loss_curves(curves: dict[str, list[Curve]], title: str,
                colours: dict[str, str] | None = None) -> bytes:
    """Mean validation loss vs tokens per arm, with the min-max band across seeds.

    Seeds evaluate at the same steps, so curves are aligned by evaluation index (up to the
    shortest seed) and plotted at the mean token count of that index.
    """
    colours = _colours(colours, curves)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for arm, seeds in sorted(curves.items()):
            length = min(len(c.val_loss) for c in seeds)
            if length == 0:
                continue
            loss = _data([c.val_loss[:length] for c in seeds])
            tokens = _data(np.mean([c.tokens[:length] for c in seeds], axis=0))
            colour = colours[arm]
            ax.plot(tokens, _data(loss.mean(axis=0)), color=colour,
                    label=f"{arm} ({_count(len(seeds), 'seed')})")
            if len(seeds) > 1:
                ax.fill_between(tokens, loss.min(axis=0), loss.max(axis=0), color=colour,
                                alpha=0.2, linewidth=0)
        ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=title)
        ax.xaxis.set_major_formatter(TOKENS)
        ax.legend(**LEGEND_OUTSIDE)
        return _png(fig)


def learning_curves(curves: dict[str, list[Curve]], title: str,
                    colours: dict[str, str] | None = None) -> bytes:
    """Validation loss of every trial against training tokens and, where the trials recorded
    the seconds of each evaluation, against seconds (a second panel); one colour per arm."""
    colours = _colours(colours, curves)
    timed = {a: [c for c in seeds if c.seconds is not None and len(c.seconds) == len(c.tokens)]
             for a, seeds in curves.items()}
    timed = {a: seeds for a, seeds in timed.items() if seeds}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10.0 if timed else 6.4, 4.0),
                                 squeeze=False)
        panels = [(axes[0][0], curves, "tokens", "training tokens")]
        if timed:
            panels.append((axes[0][1], timed, "seconds", "training seconds"))
        for ax, per_arm, axis, label in panels:
            for arm, seeds in sorted(per_arm.items()):
                for i, c in enumerate(seeds):
                    ax.plot(_data(getattr(c, axis)), _data(c.val_loss), color=colours[arm],
                            marker=".", markersize=3, linewidth=1.0,
                            label=f"{arm} ({_count(len(seeds), 'run')})" if i == 0 else None)
            ax.set(xlabel=label, ylabel="validation loss (nats/token)")
            if axis == "tokens":
                ax.xaxis.set_major_formatter(TOKENS)
        axes[0][0].set_title(title)
        axes[0][-1].legend(**LEGEND_OUTSIDE)
        return _png(fig)


def _bar_axes(bars: int):
    """A figure wide enough for `bars` labelled bars (the bar charts share one shape)."""
    return plt.subplots(figsize=(max(3.5, 1.1 * bars + 1.5), 3.6))


def final_loss_bars(finals: dict[str, list[float]], title: str,
                    colours: dict[str, str] | None = None) -> bytes:
    """Mean final validation loss per arm (bar), each seed as a dot, ±1 sd as the error bar."""
    arms = sorted(finals)
    colours = _colours(colours, arms)
    with plt.rc_context(STYLE):
        fig, ax = _bar_axes(len(arms))
        for i, arm in enumerate(arms):
            vals = _data(finals[arm])
            sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
            ax.bar(i, _data(vals.mean()), yerr=_data(sd), color=colours[arm], alpha=0.7,
                   capsize=4)
            ax.plot(np.full(len(vals), i), vals, "k.", markersize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        low = min(min(v) for v in finals.values())
        high = max(max(v) for v in finals.values())
        pad = 0.15 * (high - low) + 1e-3
        ax.set_ylim(_data(low - pad), _data(high + pad))
        ax.set(ylabel="final validation loss", title=title)
        return _png(fig)


def spectra(singular_values: dict[str, Sequence[float]], title: str) -> bytes:
    """Normalised singular values s_i / s_1 per adapted matrix (log scale), at most 16 lines."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (name, s) in enumerate(sorted(singular_values.items())[:16]):
            s = np.asarray(s, dtype=float)
            if s.size and s[0] > 0:
                ax.semilogy(np.arange(1, s.size + 1), _data(s / s[0]), color=f"C{i % 10}",
                            linewidth=0.9, label=name)
        ax.set(xlabel="index i", ylabel="s_i / s_1", title=title)
        if singular_values:
            ax.legend(fontsize=6, ncol=2, loc="lower left")
        return _png(fig)


def throughput_bars(tok_s: dict[str, Sequence[float]], title: str,
                    colours: dict[str, str] | None = None) -> bytes:
    """Median training tokens/s per trainer (bar, in the given order), min-max over
    repetitions as the error bar."""
    arms = list(tok_s)
    colours = _colours(colours, arms)
    with plt.rc_context(STYLE):
        fig, ax = _bar_axes(len(arms))
        for i, arm in enumerate(arms):
            vals = _data(tok_s[arm])
            mid = float(np.median(vals))
            ax.bar(i, mid, yerr=[[mid - vals.min()], [vals.max() - mid]], color=colours[arm],
                   alpha=0.8, capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set(ylabel="training tokens / s", title=title)
        return _png(fig)


def loss_vs_tokens(curves: dict[str, Curve], title: str,
                   colours: dict[str, str] | None = None) -> bytes:
    """Validation loss against training tokens, one run per trainer (in the given order)."""
    colours = _colours(colours, curves)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for arm, c in curves.items():
            ax.plot(_data(c.tokens), _data(c.val_loss), marker=".", color=colours[arm],
                    label=arm)
        ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=title)
        ax.xaxis.set_major_formatter(TOKENS)
        if curves:
            ax.legend(**LEGEND_OUTSIDE)
        return _png(fig)
