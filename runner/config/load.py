"""Convert the composed Hydra config into typed dataclasses, once, with one-line errors."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geometry.derivations import ErankVariant
from runner.config.paths import CONF_DIR
from runner.config.schema import (
    BASELINE_OPTIMIZERS,
    TRAINER_SCHEMAS,
    BudgetConfig,
    LoraBaselineConfig,
    RunConfig,
    TrainerConfig,
)
from runner.errors import ConfigError
from runner.models.loading import check_model_config

# Why a key is rejected on the derived trainer: these knobs are what it derives.
DERIVED_KNOBS = {
    "lr", "learning_rate", "r", "rank", "lora_alpha", "alpha", "warmup_ratio", "warmup_steps",
    "schedule", "max_grad_norm", "clip", "weight_decay", "lora_dropout", "dropout", "momentum",
    "betas", "eps", "target_modules", "batch_size",
}


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Return the typed RunConfig for a composed config, or raise ConfigError naming the key."""
    trainer_name = _trainer_name(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing required value ({_missing_hint(cfg, missing[0])})")
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(config_error_line(err)) from None
    assert isinstance(run_cfg, RunConfig)
    schema = TRAINER_SCHEMAS[trainer_name]
    if not isinstance(run_cfg.trainer, schema):
        raise ConfigError(f"trainer: option '{trainer_name}' must use the schema {schema.__name__}")
    _check_values(run_cfg)
    return run_cfg


def _trainer_name(cfg: DictConfig) -> str:
    name = OmegaConf.select(cfg, "trainer.name", throw_on_missing=False)
    if name not in TRAINER_SCHEMAS:
        known = ", ".join(sorted(TRAINER_SCHEMAS))
        raise ConfigError(f"trainer.name: unknown trainer '{name}' (known: {known})")
    return str(name)


def _missing_hint(cfg: DictConfig, key: str) -> str:
    return f"set it in the config or on the command line: {key}=..."


ERANK_VARIANTS = get_args(ErankVariant)  # the effective-rank formulas geometry/ implements


def refuse_failed(checks: list[tuple[str, bool, str]], where: str = "") -> None:
    """Raise a one-line ConfigError for the first (key, ok, why) that is not ok; ``where``
    prefixes it (the trainer option or claim the values came from)."""
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{where}{key}: {why}")


def budget_checks(b: BudgetConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, why) for the budget's ranges."""
    return [
        ("budget.max_tokens", b.max_tokens > 0, "must be > 0"),
        ("budget.max_steps", b.max_steps is None or b.max_steps > 0,
         "must be > 0 (or null: the token budget alone)"),
        ("budget.eval_every", b.eval_every > 0, "must be > 0"),
        ("budget.eval_examples", b.eval_examples > 0, "must be > 0"),
        ("budget.eval_batch_size", b.eval_batch_size > 0, "must be > 0"),
    ]


def trainer_checks(t: TrainerConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, why) for every trainer option whose range types cannot express: a PEFT LoRA
    baseline's, or the derived trainer's memory and calibration options."""
    if not isinstance(t, LoraBaselineConfig):
        return [
            ("trainer.micro_batch", getattr(t, "micro_batch", 1) > 0, "must be > 0"),
            ("trainer.noise_examples", getattr(t, "noise_examples", 2) >= 2,
             "must be >= 2 (the noise-scale estimate needs the gradients of at least 2 "
             "examples)"),
            ("trainer.erank_variant", getattr(t, "erank_variant", "roy_vetterli")
             in ERANK_VARIANTS, f"must be one of {', '.join(ERANK_VARIANTS)}"),
        ]
    return [
        ("trainer.optimizer", t.optimizer in BASELINE_OPTIMIZERS,
         f"must be one of {', '.join(BASELINE_OPTIMIZERS)}"),
        ("trainer.lr", t.lr > 0, "must be > 0"),
        ("trainer.lr_grid", all(x > 0 for x in t.lr_grid), "every learning rate must be > 0"),
        ("trainer.r", t.r >= 1, "must be >= 1"),
        ("trainer.lora_alpha", t.lora_alpha > 0, "must be > 0"),
        ("trainer.lora_dropout", 0.0 <= t.lora_dropout < 1.0, "must be in [0, 1)"),
        ("trainer.target_modules", len(t.target_modules) > 0, "must name at least one module"),
        ("trainer.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("trainer.betas", len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas),
         "must be two values in [0, 1)"),
        ("trainer.eps", t.eps > 0, "must be > 0"),
        ("trainer.momentum", 0.0 <= t.momentum < 1.0, "must be in [0, 1)"),
        ("trainer.warmup_ratio", 0.0 <= t.warmup_ratio <= 1.0, "must be in [0, 1]"),
        ("trainer.max_grad_norm", t.max_grad_norm is None or t.max_grad_norm > 0,
         "must be > 0 (or null: no clipping)"),
    ]


def _check_values(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    budget_keys = {f.name for f in fields(BudgetConfig)}
    checks = [
        ("data.val_fraction", 0.0 < cfg.data.val_fraction < 1.0, "must be in (0, 1)"),
        ("data.max_seq_len", cfg.data.max_seq_len >= 8, "must be >= 8"),
        ("data.generation_examples", cfg.data.generation_examples is None
         or cfg.data.generation_examples >= 1, "must be >= 1"),
        ("data.max_new_tokens", cfg.data.max_new_tokens is None or cfg.data.max_new_tokens >= 1,
         "must be >= 1"),
        ("data.max_examples", cfg.data.max_examples is None or cfg.data.max_examples >= 1,
         "must be >= 1 (or null: every record)"),
        *budget_checks(cfg.budget),
        ("trainer.batch_size", getattr(cfg.trainer, "batch_size", 1) > 0, "must be > 0"),
        *trainer_checks(cfg.trainer),
        ("hardware.threads", cfg.hardware.threads >= 0, "must be >= 0"),
        ("claims", cfg.task.name.value != "claims" or bool(cfg.claims),
         "task=claims needs at least one claim id (conf/claim/<id>.yaml)"),
        ("task.trials", cfg.task.trials >= 1, "must be >= 1"),
        ("tracking.mode", cfg.tracking.mode in ("offline", "disabled"),
         "must be 'offline' or 'disabled' (nothing leaves the machine; `wandb sync` uploads)"),
        ("claim_overrides.trials", (cfg.claim_overrides.trials or 1) >= 1, "must be >= 1"),
        ("claim_overrides.budget", set(cfg.claim_overrides.budget) <= budget_keys,
         f"keys must be among {', '.join(sorted(budget_keys))}"),
    ]
    check_model_config(cfg.model)
    refuse_failed(checks)


def config_error_line(err: BaseException) -> str:
    """Condense a Hydra/OmegaConf error into one line that names the key."""
    omega = _find_omegaconf_error(err)
    if omega is not None and getattr(omega, "full_key", None):
        key = omega.full_key
        msg = _first_line(getattr(omega, "msg", None) or str(omega))
        line = f"{key}: {msg}"
        leaf = key.rsplit(".", 1)[-1]
        object_type = getattr(omega, "object_type", None)
        if getattr(object_type, "__name__", "") == "DerivedTrainerConfig" and leaf in DERIVED_KNOBS:
            line += " (the derived trainer has no such option: it derives it from the weights)"
        elif "not in" in msg:
            valid = _valid_keys(omega)
            if valid:
                line += f" (valid keys: {', '.join(valid)})"
        return line
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    line = lines[0]
    if "Available options" in text:
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [
            ln for ln in lines[idx + 1 :] if re.fullmatch(r"[\w./-]+", ln) and not ln.startswith("base_")
        ]
        line += f" (available: {', '.join(options)})"
    elif len(lines) > 1 and not line.endswith("."):
        line += f": {lines[1]}"
    return line


def _find_omegaconf_error(err: BaseException | None) -> OmegaConfBaseException | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OmegaConfBaseException):
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else text


def _valid_keys(err: OmegaConfBaseException) -> list[str]:
    object_type = getattr(err, "object_type", None)
    if isinstance(object_type, type) and hasattr(object_type, "__dataclass_fields__"):
        return [f.name for f in fields(object_type)]
    return []


def trainer_options(trainer: TrainerConfig) -> dict:
    """The trainer's options as a plain dict (for the ledger)."""
    return OmegaConf.to_container(OmegaConf.structured(trainer), resolve=True, enum_to_str=True)


def load_trainer_option(name: str, overrides: dict | None = None) -> TrainerConfig:
    """Typed trainer config for `conf/trainer/<name>.yaml` plus overrides, without Hydra.

    Used where one job runs several arms (claims, benchmarks): each arm names a trainer option.
    """
    path = CONF_DIR / "trainer" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"trainer={name}: no such trainer option (known: {known})")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    trainer_name = str(raw.get("name", name))
    if trainer_name not in TRAINER_SCHEMAS:
        raise ConfigError(f"trainer={name}: unknown trainer name '{trainer_name}'")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TRAINER_SCHEMAS[trainer_name]), raw,
                                 overrides or {})
        trainer = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        line = config_error_line(err)
        raise ConfigError(f"trainer={name}: {line}") from None
    refuse_failed(trainer_checks(trainer), f"trainer={name}: ")  # an arm's overrides too
    return trainer
