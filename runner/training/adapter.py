"""The saved adapter: PEFT's files, naming the base model by its id, and a model card.

Every trainer's adapter (the baselines' PEFT LoRA and the derived trainer's export, see
runner.derived.export) is saved here, so the folder travels: `adapter_config.json` names the
base model by the id a user can load it from (`base_model_id`: the hub id of a named model,
the model's own name for `model=hf`), never the cache directory of the machine that trained it;
and `README.md` is a model card generated from the trial's ledger row (`model_card`), with
floats rounded so the same row always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from runner.config.schema import ModelConfig
from runner.models.loading import HUB_IDS, model_id_of

CARD_FILE = "README.md"
CONFIG_FILE = "adapter_config.json"
# Named configs whose weights come from somewhere other than model.path: the hub id of the
# model they hold (the embedded GGUF is a quantization of this checkpoint).
BASE_MODEL_IDS = {"smollm2_135m": "HuggingFaceTB/SmolLM2-135M-Instruct", **HUB_IDS}


def base_model_id(model: ModelConfig) -> str:
    """The id an adapter records as `base_model_name_or_path`: the hub id of a named model,
    else the id the trial records (`model=hf`: the hub id, file stem or directory name)."""
    return BASE_MODEL_IDS.get(model.id) or model_id_of(model)


def save_adapter(model, adapter_dir: Path, base_id: str) -> None:
    """PEFT's `save_pretrained` into a temporary folder beside `adapter_dir`, with
    `base_model_name_or_path` set to `base_id`, then renamed into place (a kill mid-write leaves
    no half-written adapter). The model card follows once the trial's row exists
    (`write_model_card`)."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}-", dir=adapter_dir.parent))
    try:
        # Set in the file only: PEFT's save looks the recorded base model up (on the hub when it
        # is no local path) to see whether the embeddings changed.
        model.save_pretrained(tmp)
        set_base_model(tmp, base_id)
        (tmp / CARD_FILE).unlink(missing_ok=True)  # PEFT's stub names the cache path; see below
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_base_model(adapter_dir: Path, base_id: str) -> None:
    path = Path(adapter_dir) / CONFIG_FILE
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_id
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(adapter_dir: Path, row: dict, trial_path: Path | None = None) -> Path:
    """Write the model card of a trial's adapter (atomically: temp file + rename)."""
    path = Path(adapter_dir) / CARD_FILE
    fd, tmp = tempfile.mkstemp(prefix=".card-", suffix=".md", dir=adapter_dir)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(model_card(row, trial_path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# The model card


def model_card(row: dict, trial_path: Path | str | None = None) -> str:
    """The README.md of a trial's adapter, from its ledger row alone (byte-stable)."""
    base = base_model_id_of_row(row)
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "tags:", "- lora", "- modelcypher",
        "---", "", f"# LoRA adapter of trial `{row['run_id']}`", "",
        "Trained by ModelCypher (`python -m runner`). Generated from the trial's ledger record"
        + (f" `{trial_path}`" if trial_path else "") + "; the ledger is the source of truth.",
        "", "| | |", "|---|---|",
        f"| trial | `{row['run_id']}` |",
        f"| experiment | {row.get('experiment')} |",
        f"| base model | `{base}` (config `{row.get('model_id')}`, {row.get('model_type')}) |",
        f"| model sha256 | `{row.get('model_sha256')}` |",
        f"| data | {row.get('data_id')} (sha256 `{row.get('data_sha256')}`) |",
        f"| trainer | {row.get('arm')} |",
        f"| seed | {row.get('seed')} |",
        f"| hardware | {row.get('hardware')} ({row.get('backend')}, {row.get('dtype')}) |",
        f"| config hash | `{row.get('config_hash')}` |",
        f"| git commit | `{row.get('git_commit')}` |",
        f"| stop reason | {row.get('stop_reason')} |",
        "", *_claims_section(row), "", *_hyperparameters_section(row), "",
        *_results_section(row), "", *_usage_section(base), "",
    ]
    return "\n".join(lines)


def base_model_id_of_row(row: dict) -> str:
    model = (row.get("config") or {}).get("model") or {}
    model_id = str(model.get("id") or row.get("model_id"))
    return BASE_MODEL_IDS.get(model_id) or str(row.get("model_id"))


def _claims_section(row: dict) -> list[str]:
    lines = ["## Claims"]
    if not row.get("claim_id"):
        return [*lines, "", "None: no claim's pre-registered rule asked for this trial."]
    rule = str(row.get("rule_hash") or "")
    return [*lines, "",
            f"- `{row['claim_id']}` (arm `{row.get('claim_arm') or row.get('arm')}`, rule "
            f"`{rule[:12]}`): the verdict is decided over every trial of the rule, after this "
            "one was recorded. It is kept in the ledger (`results/claims.json`) and published in "
            "`docs/claims.md` (`make results` regenerates both). Trials of other claims that "
            "reuse this one are ledger rows with `shared_from` set to this trial's id."]


def _hyperparameters_section(row: dict) -> list[str]:
    derived = ((row.get("derived") or {}).get("derived")) or {}
    if derived:
        lines = ["## Derived hyperparameters", "",
                 "Each value is derived from the base model's weights (docs/derivations.md); "
                 "per-module values are summarised (the trial record holds each one).", "",
                 "| row | hyperparameter | value | source |", "|---|---|---|---|"]
        for key in sorted(derived, key=lambda k: (len(k), k)):
            entry = derived[key]
            lines.append(f"| {key} | {entry.get('name')} | {_summary(entry.get('value'))} | "
                         f"{str(entry.get('source', '')).replace('|', '/')} |")
        hyper = row.get("hyperparameters") or {}
        if hyper:
            lines += ["", "Trainer settings: " + ", ".join(
                f"{k}={_fmt(v)}" for k, v in sorted(hyper.items())) + "."]
        return lines
    hyper = row.get("hyperparameters") or {}
    lines = ["## Hyperparameters", "", "| name | value |", "|---|---|"]
    return lines + [f"| {k} | {_fmt(v)} |" for k, v in sorted(hyper.items())]


def _results_section(row: dict) -> list[str]:
    m = row.get("metrics") or {}
    keys = ("steps", "tokens", "val_loss_initial", "val_loss_final", "val_loss_best",
            "retention_loss_initial", "retention_loss_final", "adapter_reload_max_abs_diff")
    return ["## Results", "", "| metric | value |", "|---|---|",
            *(f"| {k} | {_fmt(m[k])} |" for k in keys if m.get(k) is not None)]


def _usage_section(base: str) -> list[str]:
    return ["## Use", "", "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            'model = PeftModel.from_pretrained(base, "<this folder>")',
            "```", "",
            "A merged Hugging Face folder and an mlx-lm folder: `python -m runner task=export "
            "model=<the training model option> task.adapter=<this folder>`."]


def _fmt(value: Any) -> str:
    """Floats to 4 significant digits (byte-stable across machines); the rest as written."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _summary(value: Any) -> str:
    """A derived value: a number or word as is; a per-module list as its range and median."""
    if not isinstance(value, list | tuple):
        return _fmt(value)
    numbers = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
    if value and len(numbers) == len(value):
        median = float(statistics.median(numbers))
        return (f"{len(value)} modules: {_fmt(min(numbers))} to {_fmt(max(numbers))}, "
                f"median {_fmt(median)}")
    if len(value) <= 4:
        return _fmt(list(value))
    return f"{len(value)} entries"
