"""task=bench (`make bench`): what the derived trainer costs against PEFT LoRA baselines, all
measured in one run on this machine.

1. Peak: the best FLOP/s of a large float32 `torch.matmul` at the configured thread count.
2. Throughput and memory: each trainer runs in its own process (so peak memories do not
   mix) and takes `steps` optimizer steps on the same fixed batches (`batch_size` rows of exactly
   `seq_len` tokens packed from the training data, no padding), `repeats` times after one
   untimed warm-up step; nothing else is timed. The repetitions are interleaved across the
   trainers (every trainer's first, then every trainer's second, ...), so a change in the
   machine's speed during the bench reaches all of them. The derived trainer's set-up (all 15
   hyperparameters) is timed there too.
3. Quality per compute: every trainer (and the AdamW learning-rate grid, with its tuning cost)
   trains on the same token budget with the shared train loop; validation loss against tokens.
4. Time to target: the tokens and seconds each quality arm needed to reach the target
   validation loss (the AdamW grid's final one when the grid ran, else the best baseline's), by
   linear interpolation between evaluations, or never within the budget.
5. One row under `<results_dir>/bench/` (read by `make results` into docs/performance.md, apart
   from the trials), the tables, and last the summary line
   `bench: tok_s_ratio=X mem_ratio=Y derive_steps=Z mfu=W reading=R reference=F` (the
   recommended derived reading R against the honest reference: the faster of the project's PEFT
   AdamW q/v arm and the stock PEFT recipe, runner/tasks/bench_reference.py, for tokens/s; the
   smaller whole-process peak and the shorter step of the two for memory and set-up).

Model FLOPs are 6·N·T (FLOPS_FORMULA). The derived trainer has no rank or target options: it
runs with the rank and targets it derives, which the output says next to its numbers.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from runner.config.load import load_trainer_option
from runner.config.schema import RunConfig
from runner.data import IGNORE_INDEX, Batch, load_splits
from runner.derived import candidate_linears, derive_for_model, setup_derived
from runner.errors import ConfigError
from runner.hardware import setup_hardware
from runner.ledger import new_run_id, utc_now
from runner.models.loading import enable_recompute, load_model
from runner.tasks.bench_process import (
    reset_peak_rss,
    ru_maxrss_mb,
    vm_hwm_mb,
    whole_process_peak,
    worker_process,
)
from runner.tasks.bench_reference import StockPeftTrainer
from runner.tasks.bench_summary import (
    BASELINE,
    DERIVED_READINGS,
    FLOPS_FORMULA,
    RECOMMENDED,
    RECOMMENDED_RECOMPUTE,
    SAME_SHAPE,
    STOCK,
    _print_tables,
    add_time_to_target,
    summarize,
    summary_line,
)
from runner.tasks.train import check_data_paths, run_trainer
from runner.training.baseline import BaselineTrainer, attach_lora
from runner.trial import Provenance, config_hash

BENCH_DIR = "bench"
# task.quick=true (make bench QUICK=1): caps on the settings, and only the arms the summary line
# needs (Arm.quick); evaluation only before and after training.
QUICK = {"repeats": 2, "steps": 2, "quality_tokens": 1000}
MATMUL_N = {False: 2048, True: 512}  # size of the square peak-FLOP/s matmul (by quick)
MATMUL_REPEATS = 10  # per measurement; measured before and after the throughput runs
QUALITY_EVALS = 3  # evaluations per quality run (about), beyond the one at step 0
QUALITY_EVAL_EXAMPLES = 32  # cap on validation examples per evaluation in the quality runs


@dataclass(frozen=True)
class Arm:
    name: str
    trainer: str  # the conf/trainer option it runs at its committed settings
    all_linear: bool = False  # PEFT LoRA on every Linear of the decoder blocks instead of q/v
    derived_shape: bool = False  # PEFT LoRA with the derived trainer's per-module ranks/targets
    stock: bool = False  # the stock PEFT recipe, outside the project's trainer and loop
    throughput: bool = True  # adamw_grid's step is AdamW's: measured for quality only
    quality: bool = True  # the derived-shape peer is a throughput and memory reference only
    quick: bool = False  # also run under task.quick=true
    recompute: bool = False  # hardware.recompute: the decoder blocks recomputed in the backward


ARMS = (
    Arm(BASELINE, "adamw", quick=True),
    # The stock recipe's loss curve would differ from adamw's only by its LoRA dropout and alpha:
    # a speed and memory reference, not a quality arm.
    Arm(STOCK, "adamw", stock=True, quality=False, quick=True),
    Arm("adamw_all_linear", "adamw", all_linear=True),
    Arm("prodigy", "prodigy"),
    Arm("schedulefree", "schedulefree"),
    # Every reading trains in the quality phase; the readings' steps differ only in their step
    # rule's arithmetic, so the throughput phase times the recommended one and `derived`.
    *(Arm(name, name, throughput=name in ("derived", RECOMMENDED), quick=name == RECOMMENDED)
      for name in DERIVED_READINGS),
    # The recommended reading as hardware.recompute runs it (the same numbers, less memory,
    # about one more forward per step): what memory the derived trainer needs at the least.
    Arm(RECOMMENDED_RECOMPUTE, RECOMMENDED, recompute=True, quality=False, quick=True),
    # The derived trainer's own adapter shapes (ranks 1-276 on all 210 matrices of SmolLM2)
    # under PEFT + AdamW: the peer for "at the same rank and targets".
    Arm(SAME_SHAPE, "adamw", derived_shape=True, quality=False, quick=True),
    Arm("adamw_grid", "adamw_grid", throughput=False),
)


@dataclass(frozen=True)
class BenchSettings:
    batch_size: int  # rows per fixed batch (the baseline's batch size)
    seq_len: int  # tokens per row (data.max_seq_len)
    repeats: int
    steps: int
    quality_tokens: int
    matmul_n: int
    quick: bool

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def bench_task(cfg: RunConfig) -> dict:
    """Measure every arm, write the bench row, print the tables and the summary line last."""
    started, wall = utc_now(), time.perf_counter()
    provenance = Provenance.read(cfg.results_dir)
    check_data_paths(cfg)
    settings = bench_settings(cfg)
    hw = setup_hardware(cfg.hardware, backends=("torch",), task="bench")
    arms = [a for a in ARMS if a.throughput and (a.quick or not settings.quick)]
    with _progress() as bar:
        quality_arms = [a for a in ARMS if a.quality and (a.quick or not settings.quick)]
        task = bar.add_task("peak matmul",
                            total=1 + len(arms) + settings.repeats + len(quality_arms))

        # 1. This machine's peak matmul FLOP/s, at the same thread count as the trainers (again
        #    after the throughput runs: the best of both, since a shared or throttled machine
        #    can run one burst of matmuls slower than the training that follows).
        peak = measure_peak_matmul(settings.matmul_n, MATMUL_REPEATS)
        bar.advance(task)

        # 2. Throughput and memory, one fresh process per trainer, repetitions interleaved.
        @contextmanager
        def unit(description):
            bar.update(task, description=description)
            yield
            bar.advance(task)

        throughput = measure_throughput(cfg, arms, settings, unit)
        peak = best_peak(peak, measure_peak_matmul(settings.matmul_n, MATMUL_REPEATS))

        # 3. Quality at an equal token budget (fresh weights per arm; checkpoints in a temp dir).
        quality = []
        with tempfile.TemporaryDirectory(prefix="bench-runs-") as runs_dir:
            for arm in quality_arms:
                bar.update(task, description=f"quality {arm.name}")
                quality.append(measure_quality(cfg, arm, settings, Path(runs_dir)))
                bar.advance(task)

    # 4. Time to the target validation loss, per quality arm.
    target = add_time_to_target(quality)

    # 5. Ratios, the row, the tables, the summary line.
    for row in throughput:
        row["mfu"] = 6 * row["n_params"] * row["tok_s_median"] / peak["flops_per_second"]
    summary = summarize({r["arm"]: r for r in throughput})
    summary["to_target"] = next((q["to_target"] for q in quality if q["arm"] == RECOMMENDED),
                                None)
    row = _bench_row(cfg, hw, provenance, settings, peak, throughput, quality, summary, started,
                     wall)
    row["quality_target"] = target
    path = write_bench_row(cfg.results_dir, row)
    _print_tables(row, path)
    print(summary_line(summary), flush=True)
    return row


def bench_settings(cfg: RunConfig) -> BenchSettings:
    t = cfg.task
    for key, value in (("repeats", t.repeats), ("steps", t.steps),
                       ("quality_tokens", t.quality_tokens)):
        if value < 1:
            raise ConfigError(f"task.{key}: must be >= 1")
    cap = QUICK if t.quick else {}
    return BenchSettings(
        batch_size=load_trainer_option(BASELINE).batch_size, seq_len=cfg.data.max_seq_len,
        repeats=min(t.repeats, cap.get("repeats", t.repeats)),
        steps=min(t.steps, cap.get("steps", t.steps)),
        quality_tokens=min(t.quality_tokens, cap.get("quality_tokens", t.quality_tokens)),
        matmul_n=MATMUL_N[t.quick], quick=t.quick,
    )


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_peak_matmul(n: int, repeats: int) -> dict:
    """Best FLOP/s (2·n³ per product) of `repeats` float32 n×n matmuls after one warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    torch.matmul(a, b)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        seconds.append(time.perf_counter() - started)
    return {"n": n, "dtype": "float32", "threads": torch.get_num_threads(), "seconds": seconds,
            "flops_per_second": 2 * n**3 / min(seconds)}


def best_peak(first: dict, second: dict) -> dict:
    """Two peak measurements as one: every timing kept, the best FLOP/s."""
    return {**first, "seconds": first["seconds"] + second["seconds"],
            "flops_per_second": max(first["flops_per_second"], second["flops_per_second"])}


def measure_throughput(cfg: RunConfig, arms: list[Arm], settings: BenchSettings,
                       unit=lambda description: nullcontext()) -> list[dict]:
    """Every arm in a fresh process of its own: the set-ups one after another, then the timed
    repetitions interleaved (repetition 1 of every arm, then repetition 2, ...), so that a
    drift in the machine's speed reaches every arm alike instead of whichever ran last.
    ``unit(description)`` is entered around each set-up and each round of repetitions (the
    progress bar)."""
    with ExitStack() as stack:
        workers = []
        for arm in arms:
            with unit(f"throughput set-up {arm.name}"):
                workers.append(stack.enter_context(worker_process(cfg.hardware.threads)))
                workers[-1].submit(_throughput_setup, cfg, arm, settings).result()
        for rep in range(settings.repeats):
            with unit(f"throughput repetition {rep + 1}/{settings.repeats}"):
                for worker in workers:
                    worker.submit(_throughput_repeat).result()
        return [worker.submit(_throughput_report).result() for worker in workers]


# The state of one arm's throughput run, inside its own worker process.
_ARM: dict = {}


def _throughput_setup(cfg: RunConfig, arm: Arm, settings: BenchSettings) -> None:
    """Load, set up `arm`'s trainer (timed) and take one untimed warm-up step."""
    # 1. Load (the load's memory transient is recorded apart from the training phase).
    wall = time.perf_counter()
    setup_hardware(cfg.hardware, backends=("torch",), task="bench")
    loaded, splits = _load(cfg)
    if arm.recompute:
        enable_recompute(loaded.model)
    pad_id = loaded.tokenizer.pad_token_id
    fixed = fixed_batches(splits.train, settings.steps, settings.batch_size, settings.seq_len)
    load_peak, load_seconds = ru_maxrss_mb(), time.perf_counter() - wall
    tracked = reset_peak_rss()

    # 2. Set up the trainer (the derived one derives all its hyperparameters here, timed).
    #    Its peak memory is recorded, then reset, so the steps' own peak is seen apart.
    started = time.perf_counter()
    trainer, info = _build_trainer(cfg, arm, loaded, splits, pad_id, settings.batch_size,
                                   first_and_later=True)
    info.setdefault("setup_seconds", time.perf_counter() - started)
    setup_peak = vm_hwm_mb() if tracked else None
    tracked = tracked and reset_peak_rss()

    # 3. One untimed warm-up step (lazy optimizer state).
    _ARM.clear()
    _ARM.update(arm=arm, settings=settings, trainer=trainer, fixed=fixed, info=info,
                losses=[trainer.step(fixed[0]).loss], seconds=[], wall=wall,
                load_peak=load_peak, load_seconds=load_seconds, tracked=tracked,
                setup_peak=setup_peak, model_sha256=loaded.sha256, data_sha256=splits.sha256,
                n_params=_count_params(loaded.model, trainer.params))


def _throughput_repeat() -> None:
    """One timed repetition: `steps` optimizer steps on the fixed batches."""
    started = time.perf_counter()
    for batch in _ARM["fixed"]:
        _ARM["losses"].append(_ARM["trainer"].step(batch).loss)
    _ARM["seconds"].append(time.perf_counter() - started)


def _throughput_report() -> dict:
    """Throughput spread over the repetitions and this process's peak memory."""
    a, arm, settings = _ARM, _ARM["arm"], _ARM["settings"]
    seconds, tracked = a["seconds"], a["tracked"]
    tokens = settings.steps * settings.tokens_per_step
    tok_s = [tokens / s for s in seconds]
    steps_peak = vm_hwm_mb() if tracked else None
    # The trainer's peak after loading spans its set-up and its steps; the same-shape peer's
    # set-up derives the derived trainer's shapes, which is not its own cost, so only its steps
    # count there. The whole-process peak spans every phase, loading included.
    train_peak = (None if not tracked else steps_peak if arm.derived_shape
                  else max(a["setup_peak"], steps_peak))
    process_peak = whole_process_peak([a["load_peak"], a["setup_peak"], steps_peak,
                                       ru_maxrss_mb()])
    return {
        "arm": arm.name, "trainer": arm.trainer, **a["info"],
        "model_sha256": a["model_sha256"], "data_sha256": a["data_sha256"],
        "n_params": a["n_params"],
        "trainable_params": sum(p.numel() for p in a["trainer"].params),
        "repeat_seconds": seconds, "tok_s": tok_s,
        "tok_s_median": statistics.median(tok_s), "tok_s_min": min(tok_s),
        "tok_s_max": max(tok_s), "step_seconds_median": statistics.median(seconds) / settings.steps,
        "peak_mb": process_peak, "peak_mb_scope": "process",
        "train_peak_mb": train_peak if train_peak is not None else process_peak,
        "process_peak_mb": process_peak, "load_peak_mb": a["load_peak"],
        "setup_peak_mb": a["setup_peak"], "steps_peak_mb": steps_peak,
        "all_finite": all(math.isfinite(x) for x in a["losses"]),
        "losses": [round(float(x), 6) for x in a["losses"]],  # (recompute: the same numbers)
        "load_seconds": a["load_seconds"], "wall_seconds": time.perf_counter() - a["wall"],
    }


def measure_quality(cfg: RunConfig, arm: Arm, settings: BenchSettings, runs_dir: Path) -> dict:
    """Train `arm` on the equal token budget with the shared loop; its validation curve."""
    wall = time.perf_counter()
    loaded, splits = _load(cfg)
    mean_len = sum(len(e.input_ids) for e in splits.train) / len(splits.train)
    baseline_steps = settings.quality_tokens / (mean_len * settings.batch_size)
    # Quick: evaluated before and after training only (the loop always evaluates its last step).
    every = 10**9 if settings.quick else max(1, round(baseline_steps / QUALITY_EVALS))
    budget = replace(cfg.budget, max_tokens=settings.quality_tokens, max_steps=None,
                     eval_every=every,
                     eval_examples=min(cfg.budget.eval_examples, QUALITY_EVAL_EXAMPLES))
    # Equal budgets: the derived trainer's certificate must not stop it early.
    trainer_cfg = _trainer_config(arm, loaded.model, certificate=False)
    qcfg = replace(cfg, trainer=trainer_cfg, budget=budget, runs_dir=str(runs_dir / arm.name))
    quiet = Console(file=io.StringIO())
    outcome = run_trainer(qcfg, loaded, splits, loaded.tokenizer.pad_token_id, quiet)
    r, extra = outcome.result, outcome.extra_metrics
    return {
        "arm": arm.name, "trainer": arm.trainer, "tokens": r.tokens, "steps": r.steps,
        "train_seconds": r.train_seconds, "eval_seconds": r.eval_seconds,
        "wall_seconds": time.perf_counter() - wall, "stop_reason": r.stop_reason,
        "val_loss_initial": r.evals[0].val_loss, "val_loss_final": r.evals[-1].val_loss,
        "eval_every": budget.eval_every, "eval_examples": budget.eval_examples,
        "curve": [{"tokens": e.tokens, "seconds": e.seconds, "val_loss": e.val_loss}
                  for e in r.evals],
        "setup_seconds": extra.get("setup_seconds", 0.0),
        "tuning_tokens": extra.get("tuning_tokens", r.tokens),
        "tuning_seconds": extra.get("tuning_seconds", r.train_seconds),
        "best_lr": extra.get("best_lr"), "grid_points": extra.get("grid_points"),
        "batch_size": outcome.hyperparameters.get("batch_size"),
    }


def fixed_batches(examples, count: int, batch_size: int, seq_len: int) -> list[Batch]:
    """`count` batches of `batch_size` rows of exactly `seq_len` tokens: the training examples'
    tokens packed in order (cycled if too few), loss on every token but each row's first."""
    stream = [t for ex in examples for t in ex.input_ids]
    need = count * batch_size * seq_len
    stream = (stream * math.ceil(need / len(stream)))[:need]
    ids = torch.tensor(stream, dtype=torch.long).view(count, batch_size, seq_len)
    out = []
    for x in ids:  # (B, T)
        labels = x.clone()
        labels[:, 0] = IGNORE_INDEX
        out.append(Batch(input_ids=x.contiguous(), labels=labels,
                         attention_mask=torch.ones_like(x), n_tokens=batch_size * (seq_len - 1)))
    return out


# ---------------------------------------------------------------------------------------------
# Trainers


def _trainer_config(arm: Arm, model, rows_per_pass: int | None = None,
                    certificate: bool = True):
    """The arm's committed trainer option; all_linear swaps q/v for every block Linear.

    For the derived trainer, ``rows_per_pass`` sets its micro-batch (rows per forward pass,
    including its set-up's noise probe) to the rows the peers' steps pass at once, so that peak
    memories compare passes of the same size. The gradient of a step is the same sum over its
    micro-batches up to rounding, but the option is not only a memory one: the residual scales
    (row 15) are measured on the first ``micro_batch`` training examples, and the dropout masks
    are drawn pass by pass, so the bench's derived arms differ from the committed trainer there
    (the row records the micro-batch as ``derived_micro_batch``). ``certificate=False`` turns
    its stopping certificate off.
    """
    overrides: dict = {}
    if arm.trainer in DERIVED_READINGS:
        overrides["certificate"] = certificate
        if rows_per_pass:
            overrides["micro_batch"] = rows_per_pass
    if arm.all_linear:
        overrides["target_modules"] = sorted({name.rsplit(".", 1)[-1]
                                              for name in candidate_linears(model)})
    return load_trainer_option(arm.trainer, overrides or None)


def _build_trainer(cfg: RunConfig, arm: Arm, loaded, splits, pad_id: int, rows_per_pass: int,
                   first_and_later: bool = False):
    """A ready trainer and what to say about its adapters (rank, targets, set-up cost).

    ``first_and_later``: a derived reading sets up twice on an empty set-up cache of its own,
    as the first seed of an experiment does (everything computed) and then as every later
    seed does (the seed-independent steps read back); the later set-up's trainer is returned
    (the same trainer bit for bit, ``test_trial_rows_record_the_cache_and_stay_bitwise``)."""
    trainer_cfg = _trainer_config(arm, loaded.model, rows_per_pass)
    quiet = Console(file=io.StringIO())
    if arm.stock:  # the stock recipe: the learning rate is the only setting it takes from here
        trainer = StockPeftTrainer(loaded.model, trainer_cfg.lr, rows_per_pass)
        return trainer, {"adapters": trainer.adapters, "optimizer": "adamw", "lr": trainer_cfg.lr}
    if arm.trainer in DERIVED_READINGS:
        run_cfg, first = replace(cfg, trainer=trainer_cfg), {}
        if not first_and_later:
            setup = setup_derived(run_cfg, loaded, splits, pad_id, quiet)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-setup-cache-") as runs:
                run_cfg = replace(run_cfg, runs_dir=runs)
                cold = setup_derived(run_cfg, loaded, splits, pad_id, quiet)
                cold.trainer.ops.detach()
                loaded.model.eval()  # (as loaded: the set-up left it in training mode)
                first = {"setup_seconds_first": cold.setup_seconds,
                         "setup_phases_first": cold.phase_seconds,
                         "setup_cache_first": cold.cache}
                del cold
                setup = setup_derived(run_cfg, loaded, splits, pad_id, quiet)
        ranks = [s.rank for s in setup.trainer.adapters.specs.values()]
        return setup.trainer, {
            "adapters": f"derived: rank {min(ranks)}-{max(ranks)} on {len(ranks)} matrices",
            "derive_seconds": setup.derive_seconds, "setup_seconds": setup.setup_seconds,
            "derived_batch_size": setup.trainer.batch_size, "rank_total": sum(ranks),
            "derived_micro_batch": setup.trainer.micro_batch,
            "setup_phases": setup.phase_seconds,
            # hit / partial / miss of the seed-independent set-up cache (runner.derived.cache):
            # a warm set-up is what every seed after the first pays
            "setup_cache": setup.cache,
            **first,
        }
    patterns, adapters = None, None
    if arm.derived_shape:  # the shapes come from the derivation (not timed: not this arm's cost)
        dcfg, n_train = load_trainer_option("derived"), len(splits.train)
        derived = derive_for_model(loaded.model, n_train, math.ceil(n_train / dcfg.micro_batch),
                                   cfg.hardware.dtype.value, dcfg.erank_variant)
        patterns = derived.peft_patterns()
        ranks = list(patterns["rank_pattern"].values())
        adapters = (f"derived shape: rank {min(ranks)}-{max(ranks)} on {len(ranks)} matrices, "
                    "alpha = rank")
    torch.manual_seed(cfg.seed)
    model = attach_lora(loaded.model, trainer_cfg, patterns)
    targets = "/".join(t.removesuffix("_proj") for t in trainer_cfg.target_modules)
    return BaselineTrainer(model, trainer_cfg, total_steps=1_000_000), {
        "adapters": adapters or f"r={trainer_cfg.r} alpha={trainer_cfg.lora_alpha} on {targets}",
        "optimizer": trainer_cfg.optimizer, "lr": trainer_cfg.lr,
    }


def _load(cfg: RunConfig):
    """The model and the data splits, without the retention set: the bench reports validation
    loss only, and on SmolLM2-135M each evaluation of a retention set as large as the
    validation set would double the quality runs' evaluation time (about 10 s per point)."""
    data_path, _ = check_data_paths(cfg)
    loaded = load_model(cfg.model, dtype=cfg.hardware.dtype.value, device=cfg.hardware.device)
    splits = load_splits(data_path, loaded.tokenizer, max_seq_len=cfg.data.max_seq_len,
                         val_fraction=cfg.data.val_fraction, retention_path=None,
                         max_examples=cfg.data.max_examples)
    return loaded, splits


def _count_params(model, extra) -> int:
    """Every parameter once (tied embeddings once; the derived adapters live beside the model)."""
    seen = {id(p): p for p in model.parameters()}
    seen.update({id(p): p for p in extra})
    return sum(p.numel() for p in seen.values())


# ---------------------------------------------------------------------------------------------
# Row and output


def _bench_row(cfg, hw, provenance, settings, peak, throughput, quality, summary, started,
               wall) -> dict:
    return {
        "schema_version": 1,
        "run_id": new_run_id(cfg.experiment, "bench", cfg.seed, config_hash(cfg)),
        "experiment": cfg.experiment, "model_id": cfg.model.id,
        "model_sha256": throughput[0]["model_sha256"], "data_id": cfg.data.id,
        "data_sha256": throughput[0]["data_sha256"],
        **hw.as_row(), "seed": cfg.seed, **provenance.as_row(),
        "started_at": started, "ended_at": utc_now(),
        "wall_seconds": time.perf_counter() - wall, "settings": asdict(settings),
        "tokens_per_step": settings.tokens_per_step, "baseline": BASELINE,
        "flops_formula": FLOPS_FORMULA, "peak_matmul": peak,
        "throughput": throughput, "quality": quality, "summary": summary,
    }


def write_bench_row(results_dir: str | Path, row: dict) -> Path:
    """`<results_dir>/bench/<run id>.json`, written atomically and never over another row."""
    folder = Path(results_dir) / BENCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{row['run_id']}.json"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(row, indent=2, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, final)  # atomic; FileExistsError rather than overwrite
    finally:
        os.unlink(tmp)
    return final


def _progress() -> Progress:
    return Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=Console(stderr=True))
