"""task=model_info: per-layer geometry of a model and the 15 derived hyperparameters.

    python -m runner task=model_info model=smollm2_135m [task.top=20]

Loads the model, derives every hyperparameter from the weights of its decoder-block Linears
exactly as the derived trainer does (`runner.derived.derive_for_model`), prints two tables
(one row per matrix; one row per derivation with its provenance) and writes the same as JSON to
`<runs_dir>/model_info/<model id>-<sha12>.json`. Nothing is trained: records 8 (batch size) and
15 (residual scaling) need gradients / activations and are reported as deferred.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runner.config.paths import PROJECT_ROOT
from runner.config.schema import DerivedTrainerConfig, RunConfig
from runner.data import is_val, read_jsonl
from runner.derived import derive_for_model
from runner.hardware import setup_hardware
from runner.ledger import git_commit, utc_now
from runner.models.loading import load_model

# Records that cannot be computed from the weights alone, and why (printed and stored).
DEFERRED = {
    8: "deferred: needs per-batch gradients (the derived trainer measures the noise scale at init)",
    15: "deferred: needs block activations (the derived trainer uses a calibration batch at init)",
}


def model_info_task(cfg: RunConfig) -> dict:
    """Derive everything the weights determine, print it, and write it as JSON; return the dict."""
    console = _console()

    # 1. The data only sets N_train (rank cap, row 11) and N = batches per epoch (row 1).
    n_train, n_train_source = train_split_size(cfg)
    tcfg = cfg.trainer if isinstance(cfg.trainer, DerivedTrainerConfig) else DerivedTrainerConfig()
    batches_per_epoch = math.ceil(n_train / tcfg.micro_batch)

    # 2. Load the model and derive from every decoder-block Linear (timed: derivation only).
    hw = setup_hardware(cfg.hardware, backends=("torch",), task="model_info")
    loaded = load_model(cfg.model, dtype=hw.dtype, device=hw.device)
    started = time.perf_counter()
    derived = derive_for_model(loaded.model, n_train, batches_per_epoch, hw.dtype, tcfg.erank_variant)
    derive_seconds = time.perf_counter() - started

    # 3. The report: the bundle's own JSON plus what it was derived from.
    report = {
        "task": "model_info", "created_at": utc_now(), "git_commit": git_commit(),
        "model_id": loaded.model_id, "model_sha256": loaded.sha256, "model_type": loaded.model_type,
        "device": hw.device, "dtype": hw.dtype, "erank_variant": tcfg.erank_variant,
        "n_train": n_train, "n_train_source": n_train_source, "micro_batch": tcfg.micro_batch,
        "batches_per_epoch": batches_per_epoch,
        "batches_per_epoch_note": "ceil(n_train / micro_batch): provisional; the derived trainer "
                                  "recomputes record 1 with the measured batch size (record 8)",
        "derive_seconds": derive_seconds, "n_matrices": len(derived.layers),
        "n_targets": sum(g.target for g in derived.layers),
        **derived.to_dict(), "deferred": {str(k): v for k, v in DEFERRED.items()},
        "peft_patterns": derived.peft_patterns(),
    }

    # 4. Print, write, and say where.
    console.print(layer_table(derived.layers, cfg.task.top))
    console.print(records_table(derived.records))
    path = write_report(Path(cfg.runs_dir) / "model_info", f"{loaded.model_id}-{loaded.sha256[:12]}", report)
    console.print(f"{len(derived.layers)} matrices ({report['n_targets']} targets) derived in "
                  f"{derive_seconds:.2f}s; n_train={n_train} ({n_train_source}), "
                  f"N={batches_per_epoch} batches/epoch")
    console.print(f"wrote {path}")
    return report


# ---------------------------------------------------------------------------------------------
# Steps


def train_split_size(cfg: RunConfig) -> tuple[int, str]:
    """Records of the configured data file that fall in the train split (no tokenization).

    The same content-hash split and `max_examples` cut as `runner.data.load_splits`; a record
    that tokenizes to nothing trainable would make training fail, so this count is what the
    derived trainer sees.
    """
    path = _resolve(cfg.data.path)
    records = read_jsonl(path)
    if cfg.data.max_examples is not None:
        records = records[: cfg.data.max_examples]
    n = sum(not is_val(rec, cfg.data.val_fraction) for _, rec in records)
    return max(n, 1), (f"data={cfg.data.id}: {n} of {len(records)} records in the train split "
                       f"(val_fraction={cfg.data.val_fraction})")


def _resolve(path: str) -> str:
    """A relative data path is looked up in the working directory, then in the project root."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    candidate = PROJECT_ROOT / path
    return str(candidate) if candidate.exists() else path


def _console() -> Console:
    """Tables go to stdout; wide enough for full module names when not on a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def layer_table(layers, top: int) -> Table:
    """One row per matrix (first `top` rows, 0 = all)."""
    shown = layers if top <= 0 else layers[:top]
    title = f"per-layer geometry ({len(shown)} of {len(layers)} matrices)"
    table = Table(title=title)
    for col in ("matrix", "shape", "sigma_max", "stable rank", "erank (RV)", "k", "tail dims",
                "rank", "target"):
        table.add_column(col, justify="left" if col == "matrix" else "right")
    for g in shown:
        table.add_row(g.name, f"{g.shape[0]}x{g.shape[1]}", f"{g.sigma_max:.4g}",
                      f"{g.stable_rank:.2f}", f"{g.erank:.1f}", str(g.k), str(g.tail_dims),
                      str(g.rank), "yes" if g.target else "no")
    return table


def records_table(records) -> Table:
    """One row per derivation: value (summarised), formula, inputs and source."""
    table = Table(title="the 15 derived hyperparameters (docs/derivations.md)")
    for col in ("#", "knob", "value", "formula", "inputs", "source"):
        table.add_column(col, overflow="fold")
    for i, rec in sorted(records.items()):
        value = DEFERRED[i] if rec.value == "deferred" else summarize(rec.value)
        table.add_row(str(i), rec.name, value, rec.formula, _inputs(rec.inputs), rec.source)
    return table


def summarize(value: Any) -> str:
    """A short human reading of a record's value (per-layer tuples as ranges and counts)."""
    if isinstance(value, bool) or isinstance(value, str | int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        if not value:
            return "(none)"
        if all(isinstance(v, str) for v in value):
            return f"{len(value)} names" if len(value) > 4 else ", ".join(value)
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            lo, hi = min(value), max(value)
            return f"{lo:.4g} .. {hi:.4g} over {len(value)}"
        if all(isinstance(v, tuple) for v in value):
            return f"{len(value)} index ranges, e.g. {list(value[0])}"
    return str(value)


def _inputs(inputs: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in inputs.items())


def write_report(directory: Path, stem: str, report: dict) -> Path:
    """Write `report` as `<directory>/<stem>.json` atomically (temp file + os.replace)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{stem}.json"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
