"""docs/performance.md from the bench rows (`<results_dir>/bench/*.json`, written by task=bench).

The page depends only on the rows: for each configuration (model, hardware, threads, batch,
sequence length, quick) the latest run's tables and figures, then one line per run. Figures go
to `docs/performance/`; figures of runs the page no longer shows are removed.
"""

from __future__ import annotations

from pathlib import Path

from runner.report import figures
from runner.report.format import num, table, write_all
from runner.report.ledger import read_bench_rows
from runner.tasks.bench_summary import summary_line

PAGE = "performance.md"
FIG_DIR = "performance"
METHOD = """\
How `make bench` measures (runner/tasks/bench.py), all in one run on one machine:

- **tokens/s**: each trainer in its own process takes a fixed number of optimizer steps on the
  same fixed batches (rows of exactly the stated sequence length, packed from the training data,
  no padding) after one untimed warm-up step, repeated; the median over repetitions is shown
  with the min-max spread. Since 2026-11-27 (runs from `20261127T165200` on) the repetitions
  are interleaved across the trainers (every trainer's first, then every trainer's second), so
  a change in the machine's speed reaches all of them; earlier runs took each trainer's
  repetitions back to back. Evaluation is not timed. The ratio is to the faster of two q/v
  references measured in the same run: the project's PEFT LoRA + AdamW, r=8, alpha=16, dropout
  0.05 on q/v (`adamw`), and the stock recipe (`peft_stock`, runner/tasks/bench_reference.py:
  `get_peft_model` with `LoraConfig(r=8, target_modules=["q_proj", "v_proj"])` at PEFT's
  defaults, the Hugging Face loss, `torch.optim.AdamW` at its defaults but the learning rate, no
  code of this project around it). Runs before `peft_stock` existed compare with `adamw` only.
  What still separates the two: `adamw` keeps the trial configuration's LoRA dropout of 0.05
  (one Bernoulli mask and one multiply over each adapted projection's input, forward and
  backward; PEFT's default is no dropout), and its step checks the loss and the gradient norm
  for divergence; the learning-rate scheduler, the train-mode switch and the gradient norm
  are computed without an extra pass over the weights or gradients.
- **peak MB**: the trainer process's whole peak resident memory, over every phase: loading the
  model, setting up the trainer (for the derived readings: the derivation, the residual-scale
  calibration and the noise-scale probe) and the steps, read phase by phase from VmHWM (reset
  between phases) and `ru_maxrss`. The peak after loading (set-up and steps) is in the row as
  `train_peak_mb`; rows without that field show it as their peak MB. Rows that read the phases
  apart also show the peak while loading, setting up and stepping ("load / set-up / steps MB";
  – where an arm has no such phase). What the derived readings hold beyond a q/v reference:
  adapters on every block matrix, so the input of every adapted projection is kept for its V
  gradient (q and v share one input; the reference keeps little else of its own), the factors
  and their gradients, and for the tail start the frozen starting frames. What they do not
  hold: the whole batch's logits (the output layer's loss runs in chunks of 128 token rows,
  runner.derived.torch_ops.answer_loss_backward) or masked copies of the inputs (dropout
  keeps a 1-byte mask). Every arm's peak also holds memory the C allocator keeps after a
  free; fixing glibc's mmap threshold returns it, but the page faults of each step's
  reallocation made every arm slower, so the bench runs at the allocator's defaults.
  `derived_matched_mass_recompute` is the recommended reading under `hardware.recompute=true`:
  each decoder block keeps only its input through the forward and is recomputed in the
  backward (about one more forward per step); its losses are the reading's, step by step
  (the row records both). Any trainer can run so; the bench measures the derived one.
- **MFU**: achieved model FLOP/s over this machine's peak, measured in the same run as the best
  of several large float32 `torch.matmul`s at the same thread count, timed before and after
  the throughput runs (a shared or throttled machine can run one burst slower than the
  training that follows). Model FLOPs: {formula}
- **derive steps**: the recommended derived reading's set-up time for all 15 hyperparameters
  (from the weights, the residual-scale calibration and the gradient-noise-scale probe) divided
  by one step of the faster q/v reference; the weights-only part and each set-up phase are shown
  beside it. Everything in the set-up but the seed's own random state is the same for every
  seed of an experiment (with the adapters' default start; a random start's frames follow the
  seed): the weights' geometry, the residual scales, the adapters' starting
  frames and the noise-scale probe (row 8, whose dropout masks come from a seed of its own) are
  computed by the first seed and read back by the others (the set-up cache,
  runner/derived/cache.py). Since 2026-12-07 the bench sets the reading up twice on an empty
  cache of its own: `derive_steps_first` is the first seed's set-up, `derive_steps` every later
  seed's (the set-up's peak memory spans both). The first seed's is bounded below by the
  probe: per-example gradients of 32 training examples, forward and backward, several
  reference steps of work. Earlier runs set up once, on the bench's cache as they found it
  (the row's `setup_cache`), and computed the tail start's frames and the probe every time,
  the probe's masks then following the run's seed.
- **time to target**: the training tokens and seconds each quality arm needed to first reach
  the target validation loss (the AdamW grid's final one when the grid ran, else the best
  baseline's final one), interpolated linearly between evaluations, with the derived readings'
  set-up added in brackets; "never" when it did not within the budget. Only the same run's
  losses set the target: the bench evaluates a capped validation subset, so a ledger trial's
  loss is on another scale.
- **quality per compute**: every trainer trains on the same budget of training tokens with the
  shared train loop; validation loss at the end, and the tokens and seconds it spent including
  tuning (the AdamW grid trains every grid point on the full budget). The derived trainer's
  stopping certificate is off here, so that it too trains on the whole budget.
- The derived trainer has no rank or target options: it runs with the ranks and targets it
  derives (column *adapters*), not the baseline's r=8 on q/v. `adamw_derived_shape` is PEFT
  LoRA + AdamW with exactly those per-module ranks and targets (alpha = rank): the peer for the
  cost of the derived trainer's step at the same adapter shapes.
"""


def build_performance(results_dir: Path, docs_dir: Path) -> list[Path]:
    """Write docs/performance.md and its figures; return the files changed (or removed)."""
    rows = read_bench_rows(results_dir)
    latest = _latest_per_configuration(rows)
    outputs: dict[Path, str | bytes] = {docs_dir / PAGE: performance_page(rows, latest)}
    for row in latest:
        for name, png in _figures(row).items():
            outputs[docs_dir / FIG_DIR / name] = png
    changed = write_all(outputs)
    for stale in sorted((docs_dir / FIG_DIR).glob("*.png")):
        if stale not in outputs:
            stale.unlink()
            changed.append(stale)
    return changed


def performance_page(rows: list[dict], latest: list[dict]) -> str:
    parts = ["# Performance", "",
             "Generated by `make results` from `results/bench/` alone; do not edit. "
             "`make bench` (SmolLM2-135M) or `python -m runner task=bench model=...` adds a run.",
             ""]
    if not rows:
        parts += ["No bench runs yet: run `make bench` (or `make bench QUICK=1`).", ""]
        return "\n".join(parts)
    formula = latest[-1]["flops_formula"]
    parts += [METHOD.format(formula=formula), ""]
    for row in latest:
        parts += _section(row)
    parts += ["## All bench runs", "",
              "The recommended derived reading against the faster q/v reference (runs before "
              "`peft_stock`: `derived` against `adamw`), as the summary line of each run; "
              "*vs same shape*: its tokens/s over `adamw_derived_shape`'s; *peak*: the run's "
              "measured matmul GFLOP/s. Runs on the same machine that differ in *peak* ran on a "
              "machine whose speed changed, and a ratio is only as steady as the machine was "
              "between its two trainers' turns. *derive_steps*: a later seed's set-up, "
              "*first seed*: the first seed's (– where the run set up once).",
              "", table(["run", "model", "hardware", "threads", "batch x seq", "quick",
                          "tok_s_ratio", "vs same shape", "mem_ratio", "derive_steps",
                          "first seed", "mfu", "peak"],
                         [[r["run_id"], r["model_id"], r["hardware"], r["threads"],
                           _shape(r), "yes" if r["settings"]["quick"] else "no",
                           num(r["summary"]["tok_s_ratio"], 3), num(_vs_same_shape(r), 3),
                           *(num(r["summary"].get(k), 3)
                             for k in ("mem_ratio", "derive_steps", "derive_steps_first")),
                           num(r["summary"]["mfu"], 4),
                           num(r["peak_matmul"]["flops_per_second"] / 1e9, 1)] for r in rows]),
              ""]
    return "\n".join(parts)


def _vs_same_shape(row: dict) -> float | None:
    """The derived arm's tokens/s over PEFT AdamW's at the derived ranks and targets (None when
    the run has no such arm)."""
    arms = {t["arm"]: t for t in row["throughput"]}
    reading = row["summary"].get("reading", "derived")
    if reading not in arms or "adamw_derived_shape" not in arms:
        return None
    return arms[reading]["tok_s_median"] / arms["adamw_derived_shape"]["tok_s_median"]


def _section(row: dict) -> list[str]:
    s, run = row["settings"], row["run_id"]
    target = row.get("quality_target")

    summary = row["summary"]
    base = next(t for t in row["throughput"] if t["arm"] == summary.get("reference",
                                                                          row["baseline"]))
    derived = next(t for t in row["throughput"] if t["arm"] == summary.get("reading", "derived"))
    step = next(t for t in row["throughput"] if t["arm"] == summary.get("step_reference",
                                                                          base["arm"]))
    peak = row["peak_matmul"]
    head = [f"## {row['model_id']} on {row['hardware']} (threads={row['threads']}, "
            f"batch {_shape(row)}{', quick' if s['quick'] else ''})", "",
            f"Run `{run}` ({row['device']}, {row['dtype']}, commit `{row['git_commit'][:12]}`): "
            f"{s['repeats']} repetitions x {s['steps']} steps per trainer, "
            f"{row['tokens_per_step']:,} tokens per step; measured peak "
            f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s (the best of {len(peak['seconds'])} "
            f"float32 {peak['n']}^3 matmuls).", "",
            f"`{summary_line(summary)}`", ""]
    by_phase = any(t.get("steps_peak_mb") is not None for t in row["throughput"])
    throughput = table(
        ["trainer", "adapters", "tok/s (median)", "min-max", "ratio", "peak MB", "ratio",
         *(["load / set-up / steps MB"] if by_phase else []), "MFU"],
        [[t["arm"], t["adapters"], num(t["tok_s_median"], 0),
          f"{t['tok_s_min']:,.0f}-{t['tok_s_max']:,.0f}",
          num(t["tok_s_median"] / base["tok_s_median"], 3), num(t["peak_mb"], 0),
          num(t["peak_mb"] / base["peak_mb"], 3),
          *([" / ".join(num(t.get(k), 0) for k in ("load_peak_mb", "setup_peak_mb",
                                                   "steps_peak_mb"))] if by_phase else []),
          num(t["mfu"], 4)]
         for t in row["throughput"]])
    phases = "; ".join(f"{k.replace('_', ' ')} {v:.3f} s"
                       for k, v in derived.get("setup_phases", {}).items())
    derive = (f"Derivation (`{derived['arm']}`): all 15 hyperparameters in "
              f"{derived['setup_seconds']:.3f} s (from the weights alone "
              f"{derived['derive_seconds']:.3f} s{'; by phase: ' + phases if phases else ''}) "
              f"against one `{step['arm']}` step of {step['step_seconds_median']:.4f} s: "
              f"{summary['derive_steps']:.3g} steps ({summary['derive_weights_steps']:.3g} for "
              f"the weights alone).")
    if "derive_steps_first" in summary:
        first = "; ".join(f"{k.replace('_', ' ')} {v:.3f} s"
                          for k, v in derived.get("setup_phases_first", {}).items())
        derive += (f" That is the set-up of every seed after an experiment's first, which reads "
                   f"the seed-independent steps back from the set-up cache; the first seed, on "
                   f"an empty cache, took {derived['setup_seconds_first']:.3f} s "
                   f"({summary['derive_steps_first']:.3g} steps; by phase: {first}).")
    if "same_shape_tok_s_ratio" in summary:
        derive += (f" At the same ranks and targets (`adamw_derived_shape`), the derived trainer "
                   f"runs at {summary['same_shape_tok_s_ratio']:.3g}x its tokens/s with "
                   f"{summary['same_shape_mem_ratio']:.3g}x its peak memory.")
    if derived.get("steps_peak_mb") is not None:
        derive += (f" The derived trainer's peak memory is {derived['setup_peak_mb']:,.0f} MB "
                   f"during its set-up and {derived['steps_peak_mb']:,.0f} MB during its steps.")
    if "recompute_tok_s_ratio" in summary:
        derive += (f" Under `hardware.recompute=true` (`{summary['reading']}_recompute`: each "
                   "decoder block recomputed in the backward, the same losses step by step) it "
                   f"runs at {summary['recompute_tok_s_ratio']:.3g}x the reference's tokens/s "
                   f"with {summary['recompute_mem_ratio']:.3g}x its whole-process peak memory.")
    quality = table(
        ["trainer", "tokens", "val initial", "val final", "train s", "tokens incl. tuning",
         "s incl. tuning", *(["to target: tokens", "s (+ set-up)"] if target else []), "stop"],
        [[q["arm"], num(q["tokens"], 0), num(q["val_loss_initial"], 4),
          num(q["val_loss_final"], 4), num(q["train_seconds"], 2),
          num(q["tuning_tokens"], 0), num(q["tuning_seconds"], 2),
          *(_to_target(q) if target else []), q["stop_reason"]]
         for q in row["quality"]])
    target_line = ([f"Target: validation loss {target['val_loss']:.4f}, `{target['source']}`'s "
                    "final one.", ""] if target else [])
    return [*head, "### Throughput and memory", "", throughput, "",
            f"![throughput]({FIG_DIR}/{run}-throughput.png)", "", derive, "",
            f"### Quality per compute ({s['quality_tokens']:,} training tokens each)", "",
            *target_line, quality, "", f"![validation loss]({FIG_DIR}/{run}-val_loss.png)", "",
            *_time_spent(row)]


def _to_target(q: dict) -> list[str]:
    hit = q["to_target"]
    if hit is None:
        return ["never", "never"]
    extra = hit["seconds_with_setup"] - hit["seconds"]
    return [num(hit["tokens"], 0), num(hit["seconds"], 2)
            + (f" ({num(hit['seconds_with_setup'], 2)})" if extra else "")]


def _time_spent(row: dict) -> list[str]:
    """Where the bench's own wall time went, per phase and trainer (rows that record it)."""
    if "wall_seconds" not in row["throughput"][0]:
        return []
    phases = [[f"throughput {t['arm']}", num(t["wall_seconds"], 1), num(t["load_seconds"], 1),
               num(t["setup_seconds"], 1), "–"] for t in row["throughput"]]
    phases += [[f"quality {q['arm']}", num(q["wall_seconds"], 1), "–", num(q["tuning_seconds"], 1),
                num(q["eval_seconds"], 1)] for q in row["quality"]]
    return ["### Where the bench's time went", "",
            f"`make bench` took {row['wall_seconds'] / 60:.1f} min in all. Per phase (seconds; "
            "throughput phases: loading and set-up; quality phases: training including tuning, "
            "and evaluation):", "",
            table(["phase", "wall s", "load s", "set-up / train s", "eval s"], phases), ""]


def _figures(row: dict) -> dict[str, bytes]:
    run, model = row["run_id"], row["model_id"]
    tok_s = {t["arm"]: t["tok_s"] for t in row["throughput"]}
    curves = {q["arm"]: figures.Curve([p["tokens"] for p in q["curve"]],
                                      [p["val_loss"] for p in q["curve"]])
              for q in row["quality"]}
    colours = figures.arm_colours([*tok_s, *curves])
    return {f"{run}-throughput.png": figures.throughput_bars(tok_s, f"{model}: training tokens/s",
                                                             colours),
            f"{run}-val_loss.png": figures.loss_vs_tokens(curves, f"{model}: validation loss",
                                                          colours)}


def _latest_per_configuration(rows: list[dict]) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for r in rows:  # sorted by run id, which starts with the UTC time
        s = r["settings"]
        latest[(r["model_id"], r["hardware"], r["threads"], s["batch_size"], s["seq_len"],
                s["quick"])] = r
    return [latest[k] for k in sorted(latest, key=str)]


def _shape(row: dict) -> str:
    return f"{row['settings']['batch_size']} x {row['settings']['seq_len']}"
