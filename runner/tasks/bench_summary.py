"""The bench's summary: the honest reference, the ratios of the summary line, time-to-target,
and the tables printed at the end (runner.tasks.bench measures; this module only reads rows)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

BASELINE = "adamw"  # PEFT LoRA + AdamW, r=8 alpha=16, q/v: the denominator of the tables' ratios
STOCK = "peft_stock"  # the stock PEFT + AdamW recipe (runner/tasks/bench_reference.py)
REFERENCES = (BASELINE, STOCK)  # the q/v references; the summary takes the best of them
RECOMMENDED = "derived_matched_mass"  # the reading the README recommends: the summary's numerator
RECOMMENDED_RECOMPUTE = f"{RECOMMENDED}_recompute"  # the same under hardware.recompute=true
DERIVED_READINGS = ("derived", "derived_matched_mass", "derived_tail_start", "derived_uniform",
                    "derived_seed_code")
SAME_SHAPE = "adamw_derived_shape"  # PEFT LoRA + AdamW at the derived ranks and targets
FLOPS_FORMULA = (
    "6·N·T (Kaplan et al. 2020): N = every parameter of the model, frozen base and adapters, "
    "counted once; T = training tokens. It counts the frozen base's forward, the backward "
    "through its activations, and weight gradients as if the base were trained; a LoRA step "
    "skips the base's weight gradients and so executes about 4·N·T, and attention's T² term "
    "is left out. MFU = 6·N·(tokens/s) / measured peak matmul FLOP/s."
)


def best_reference(by_arm: dict[str, dict], key: str, best=max) -> str:
    """The reference arm (of REFERENCES present) with the best ``key``: the honest denominator
    is the one least flattering to the derived trainer."""
    present = [name for name in REFERENCES if name in by_arm]
    if not present:
        raise ValueError(f"no reference arm ({', '.join(REFERENCES)}) among the throughput rows")
    return best(present, key=lambda name: by_arm[name][key])


def summarize(by_arm: dict[str, dict]) -> dict:
    """The recommended derived reading against the honest reference: the summary line's numbers.

    tokens/s against the faster reference, memory against the smaller whole-process peak, set-up
    against the shorter reference step."""
    derived = by_arm[RECOMMENDED]
    ref = best_reference(by_arm, "tok_s_median")
    mem_ref = best_reference(by_arm, "process_peak_mb", best=min)
    step_ref = best_reference(by_arm, "step_seconds_median", best=min)
    step = by_arm[step_ref]["step_seconds_median"]
    return {
        "reading": RECOMMENDED, "reference": ref, "mem_reference": mem_ref,
        "step_reference": step_ref,
        "tok_s_ratio": derived["tok_s_median"] / by_arm[ref]["tok_s_median"],
        "mem_ratio": derived["process_peak_mb"] / by_arm[mem_ref]["process_peak_mb"],
        "train_mem_ratio": derived["train_peak_mb"] / by_arm[mem_ref]["train_peak_mb"],
        "derive_steps": derived["setup_seconds"] / step,
        "derive_weights_steps": derived["derive_seconds"] / step,
        # the first seed of an experiment (an empty set-up cache); derive_steps is every later
        # seed's (rows before 2026-12-07 set up once, on the bench's cache as they found it)
        **({"derive_steps_first": derived["setup_seconds_first"] / step}
           if "setup_seconds_first" in derived else {}),
        "mfu": derived["mfu"],
        **{f"vs_{name}_tok_s_ratio": derived["tok_s_median"] / by_arm[name]["tok_s_median"]
           for name in REFERENCES if name in by_arm},
        # under hardware.recompute: the same numbers with the blocks recomputed in the backward
        **({"recompute_tok_s_ratio": by_arm[RECOMMENDED_RECOMPUTE]["tok_s_median"]
            / by_arm[ref]["tok_s_median"],
            "recompute_mem_ratio": by_arm[RECOMMENDED_RECOMPUTE]["process_peak_mb"]
            / by_arm[mem_ref]["process_peak_mb"]}
           if RECOMMENDED_RECOMPUTE in by_arm else {}),
        **({"same_shape_tok_s_ratio": derived["tok_s_median"] / by_arm[SAME_SHAPE]["tok_s_median"],
            "same_shape_mem_ratio": derived["train_peak_mb"] / by_arm[SAME_SHAPE]["train_peak_mb"]}
           if SAME_SHAPE in by_arm else {}),
    }


def summary_line(summary: dict) -> str:
    """The bench's last line (also quoted on the performance page); with the recompute arm,
    its two ratios after ``recompute:``. Rows from before the summary named its reading and
    reference give the line without them."""
    line = ("bench: " + " ".join(f"{k}={summary[k]:.3g}" for k in
                                 ("tok_s_ratio", "mem_ratio", "derive_steps",
                                  "derive_steps_first", "mfu") if k in summary)
            + (f" reading={summary['reading']} reference={summary['reference']}"
               if "reading" in summary else ""))
    if "recompute_tok_s_ratio" in summary:
        line += (f" recompute: tok_s_ratio={summary['recompute_tok_s_ratio']:.3g} "
                 f"mem_ratio={summary['recompute_mem_ratio']:.3g}")
    return line


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """Tokens and training seconds at which the validation curve first reaches ``target``,
    linearly interpolated between the two evaluations around the crossing; None if it never
    does. ``curve``: evaluation points in training order, each with tokens, seconds, val_loss."""
    for i, point in enumerate(curve):
        if not point["val_loss"] <= target:  # (a NaN loss never reaches it)
            continue
        prev = curve[i - 1] if i else None
        if prev is None or not math.isfinite(prev["val_loss"]):  # nothing to interpolate from
            return {"tokens": float(point["tokens"]), "seconds": float(point["seconds"])}
        frac = (prev["val_loss"] - target) / (prev["val_loss"] - point["val_loss"])
        return {k: prev[k] + frac * (point[k] - prev[k]) for k in ("tokens", "seconds")}
    return None


def quality_target(quality: list[dict]) -> dict:
    """The validation loss every arm is timed to: the tuned AdamW grid's final one when the grid
    ran, else the best final one among the baselines (the arms that are not derived readings).

    Only this run's values qualify: the bench evaluates on its own capped validation subset and
    token budget, so a ledger trial's loss is not on the same scale."""
    by_arm = {q["arm"]: q for q in quality}
    if "adamw_grid" in by_arm:
        return {"val_loss": by_arm["adamw_grid"]["val_loss_final"], "source": "adamw_grid"}
    baselines = [q for q in quality if q["trainer"] not in DERIVED_READINGS]
    if not baselines:
        raise ValueError("no baseline among the quality arms to set the target")
    best = min(baselines, key=lambda q: q["val_loss_final"])
    return {"val_loss": best["val_loss_final"], "source": best["arm"]}


def add_time_to_target(quality: list[dict]) -> dict:
    """Each quality row gains ``to_target`` (tokens, seconds, and seconds with its set-up) or
    None; returns the target."""
    target = quality_target(quality)
    for q in quality:
        hit = time_to_target(q["curve"], target["val_loss"])
        q["to_target"] = None if hit is None else {
            **hit, "seconds_with_setup": hit["seconds"] + q.get("setup_seconds", 0.0)}
    return target


def phase_peaks(r: dict) -> str:
    """"load / set-up / steps" peak MB of a throughput row ("-" where a phase was not read
    apart)."""
    return " / ".join("-" if r.get(k) is None else f"{r[k]:.0f}"
                      for k in ("load_peak_mb", "setup_peak_mb", "steps_peak_mb"))


def _print_tables(row: dict, path: Path) -> None:
    s, out = row["settings"], Console(file=sys.stdout, width=140)
    out.print(f"bench {row['model_id']} on {row['hardware']} ({row['device']}, {row['dtype']}, "
              f"threads={row['threads']}): fixed batches of {s['batch_size']} x {s['seq_len']} "
              f"tokens, {s['repeats']} repetitions x {s['steps']} steps per trainer"
              f"{' (quick)' if s['quick'] else ''}; peak matmul "
              f"{row['peak_matmul']['flops_per_second'] / 1e9:.1f} GFLOP/s "
              f"(float32 {row['peak_matmul']['n']}^3)", highlight=False)
    summary = row["summary"]
    ref = next(r for r in row["throughput"] if r["arm"] == summary["reference"])
    table = Table(title=f"throughput and memory (ratios to {ref['arm']}: {ref['adapters']}, the "
                        "faster q/v reference; peak MB: the whole process, loading included; "
                        "by phase: the peak while loading, setting up (the derived trainer's "
                        "noise-scale probe included) and stepping)")
    for col in ("trainer", "adapters", "tok/s median", "min-max", "ratio", "peak MB", "ratio",
                "load / set-up / steps MB", "MFU"):
        table.add_column(col)
    for r in row["throughput"]:
        table.add_row(r["arm"], r["adapters"], f"{r['tok_s_median']:.0f}",
                      f"{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}",
                      f"{r['tok_s_median'] / ref['tok_s_median']:.3f}", f"{r['peak_mb']:.0f}",
                      f"{r['peak_mb'] / ref['peak_mb']:.3f}", phase_peaks(r), f"{r['mfu']:.4f}")
    out.print(table)
    target = row["quality_target"]
    table = Table(title=f"quality per compute ({s['quality_tokens']} training tokens each; target "
                        f"val {target['val_loss']:.4f}, {target['source']}'s final)")
    for col in ("trainer", "tokens", "val initial", "val final", "train s", "tokens incl. tuning",
                "s incl. tuning", "to target: tokens", "s (+ set-up)", "stop"):
        table.add_column(col)
    for q in row["quality"]:
        hit = q["to_target"]
        table.add_row(q["arm"], str(q["tokens"]), f"{q['val_loss_initial']:.4f}",
                      f"{q['val_loss_final']:.4f}", f"{q['train_seconds']:.1f}",
                      str(q["tuning_tokens"]), f"{q['tuning_seconds']:.1f}",
                      "never" if hit is None else f"{hit['tokens']:.0f}",
                      "never" if hit is None else
                      f"{hit['seconds']:.1f} ({hit['seconds_with_setup']:.1f})", q["stop_reason"])
    out.print(table)
    derived = next(r for r in row["throughput"] if r["arm"] == summary["reading"])
    step = next(r for r in row["throughput"] if r["arm"] == summary["step_reference"])
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in derived.get("setup_phases", {}).items())
    mem = next(r for r in row["throughput"] if r["arm"] == summary["mem_reference"])
    out.print(f"{derived['arm']}: rank and targets are derived ({derived['adapters']}), not set "
              f"to the baseline's; set-up of all 15 hyperparameters "
              f"{derived['setup_seconds']:.2f}s (cache {derived.get('setup_cache', '-')}; "
              f"{phases}; the first seed's, on an empty cache: "
              f"{derived.get('setup_seconds_first', math.nan):.2f}s); one {step['arm']} step "
              f"{step['step_seconds_median']:.3f}s; whole-process peak "
              f"{derived['process_peak_mb']:.0f} MB against {mem['arm']}'s "
              f"{mem['process_peak_mb']:.0f} MB (load / set-up / steps: {phase_peaks(derived)} "
              f"against {phase_peaks(mem)}); its passes take {derived.get('derived_micro_batch')} "
              f"rows at a time, the peers' batch", highlight=False)
    out.print(f"model FLOPs: {FLOPS_FORMULA}", highlight=False)
    out.print(f"bench row {path}; `make results` renders docs/performance.md", highlight=False)
