"""task=export: a trained adapter made portable, merged into its base model.

    python -m runner task=export model=smollm2_135m task.adapter=runs/<run id>
    python -m runner task=export model=smollm2_135m task.adapter=runs/<run id> task.formats=[hf,mlx,gguf]

`task.adapter` is the trial's run folder (or its `adapter/`); `model=` is the option it was
trained on, checked against the base model its `adapter_config.json` names. The adapter is
loaded with PEFT onto the float32 base and merged (`merge_and_unload`); under `task.output`
(default `<runs_dir>/export/<trial id>`):

* `hf/`: the merged model as transformers saves it (safetensors) with its tokenizer and a model
  card; `AutoModelForCausalLM.from_pretrained` loads it.
* `mlx/`: the same weights with a config.json mlx-lm reads correctly (`mlx_lm.load`): the RoPE
  base (and scaling) at the top level, where mlx-lm looks, rather than under transformers'
  `rope_parameters`, where mlx-lm does not and would fall back to a base of 10000.
* `model.gguf` (format gguf): the merged float32 tensors under llama.cpp's names with the
  architecture's hyperparameters (gguf-py's writer; runner.tasks.export_gguf).
* `export.json`: what was exported from what, and each check below.

Every output is checked before anything is kept: the hf folder and the GGUF file are reloaded by
transformers and the mlx folder by mlx-lm (when installed), and their logits on a fixed probe batch must equal
the PEFT-wrapped model's within `LOGITS_TOLERANCE`. The export is written to a temporary folder
beside the output and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from runner import progress
from runner.config.schema import ExportFormat, ModelConfig, RunConfig
from runner.errors import ModelError
from runner.hardware import setup_hardware
from runner.ledger import git_commit, utc_now
from runner.models.loading import LoadedModel, load_model, sha256_file
from runner.models.tokenizers import ByteTokenizer
from runner.tasks.export_gguf import write_gguf
from runner.tasks.lora_svd import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    check_adapter_dir,
    read_adapter_config,
)
from runner.training.adapter import CARD_FILE, base_model_id

# Max |logit difference| an exported folder may show against the PEFT-wrapped model on the
# probe batch: merging changes the float32 summation order (W x + s B (A x) vs (W + s B A) x),
# which moves logits by about 1e-5; a wrong config (e.g. another RoPE base) moves them by >1.
LOGITS_TOLERANCE = 1e-3
PROBE_SHAPE = (2, 24)  # (batch, tokens) of the fixed probe
GGUF_FILE = "model.gguf"


def export_task(cfg: RunConfig) -> dict:
    """Merge the adapter at `task.adapter` into `model` and write each of `task.formats`."""
    console = progress.console()

    # 1. The adapter and the output folder first: bad paths fail before any model is loaded.
    adapter_dir = find_adapter(cfg.task.adapter)
    config = read_adapter_config(adapter_dir)
    formats = [ExportFormat(f) for f in dict.fromkeys(cfg.task.formats)]
    if not formats:
        raise AdapterError("task.formats: empty; give one or more of "
                           + ", ".join(f.value for f in ExportFormat))
    output = output_dir(cfg, adapter_dir)

    # 2. The base model the adapter was trained on, in float32 on the CPU.
    setup_hardware(cfg.hardware, backends=("torch",), task="export")
    with progress.phase(console, f"loading model {cfg.model.id}"):
        loaded = load_model(cfg.model, dtype="float32", device="cpu")
    base_id = base_model_id(cfg.model)
    check_base_model(config, cfg.model, base_id, loaded, adapter_dir)

    # 3. PEFT's model (the reference logits), then merged into the base weights.
    with progress.phase(console, f"merging {adapter_dir} into {base_id}"):
        peft_model = load_peft(loaded, adapter_dir)
        probe = probe_ids(loaded.model.config.vocab_size)
        reference = logits_of(peft_model, probe)
        merged = peft_model.merge_and_unload().eval()

    # 4. Each format into a temporary folder, checked, then renamed into place.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        checks = write_formats(tmp, formats, merged, loaded, adapter_dir, base_id,
                               probe, reference, console)
        manifest = {
            "task": "export", "created_at": utc_now(), "git_commit": git_commit(),
            "adapter": str(adapter_dir), "adapter_sha256": sha256_file(adapter_dir / WEIGHTS_FILE),
            "base_model": base_id, "model_id": loaded.model_id, "model_sha256": loaded.sha256,
            "formats": [f.value for f in formats], "probe_shape": list(PROBE_SHAPE),
            "logits_tolerance": LOGITS_TOLERANCE, "max_abs_logit_diff": checks,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name, diff in checks.items():
        console.print(f"{name}: max |logit diff| vs PEFT {diff:.2e}")
    if ExportFormat.mlx in formats and "mlx" not in checks:
        console.print("mlx: not checked here (mlx-lm is not installed: pip install -e '.[mlx]')")
    console.print(f"[bold]exported[/] {', '.join(f.value for f in formats)} to {output}")
    return {**manifest, "output": str(output)}


# ---------------------------------------------------------------------------------------------
# Inputs


def find_adapter(path: str | None) -> Path:
    """The adapter folder: `path` itself, or `path/adapter` when `path` is a trial's run folder."""
    if path and (Path(path).expanduser() / "adapter" / CONFIG_FILE).is_file() \
            and not (Path(path).expanduser() / CONFIG_FILE).is_file():
        return check_adapter_dir(str(Path(path) / "adapter"))
    return check_adapter_dir(path)


def output_dir(cfg: RunConfig, adapter_dir: Path) -> Path:
    """`task.output`, or `<runs_dir>/export/<trial id>`; never an existing path."""
    trial = adapter_dir.resolve().parent.name if adapter_dir.name == "adapter" else adapter_dir.name
    output = Path(cfg.task.output).expanduser() if cfg.task.output else (
        Path(cfg.runs_dir) / "export" / trial)
    if output.exists():
        raise AdapterError(f"task.output={output}: already exists; remove it or pass another "
                           "task.output=...")
    return output


def check_base_model(config: dict, model: ModelConfig, base_id: str, loaded: LoadedModel,
                     adapter_dir: Path) -> None:
    """The adapter must name the model it is merged into: by id, or (adapters saved before
    they named one) by the cached weights folder, which is named after the weights' hash."""
    recorded = config.get("base_model_name_or_path")
    if not recorded or recorded in (base_id, loaded.model_id):
        return
    if Path(recorded).name == loaded.weights_dir.name:
        return
    raise AdapterError(f"task.adapter={adapter_dir}: trained on base model {recorded}, but "
                       f"model={model.id} is {base_id}; pass the model option it was trained on")


def load_peft(loaded: LoadedModel, adapter_dir: Path):
    """PEFT's model: the adapter on the base; a misfit (other shapes, absent modules) is one line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(loaded.model, str(adapter_dir)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AdapterError(f"task.adapter={adapter_dir}: does not fit model {loaded.model_id} "
                           f"({first[:300]})") from None


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed batch of token ids (its own generator: the global random state is untouched)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=gen)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def check_logits(name: str, logits: torch.Tensor, reference: torch.Tensor) -> float:
    diff = float((logits - reference).abs().max())
    if not diff <= LOGITS_TOLERANCE:
        raise ModelError(f"export {name}: logits differ from the PEFT model by {diff:.3g} "
                         f"(> {LOGITS_TOLERANCE:g}); nothing was written")
    return diff


# ---------------------------------------------------------------------------------------------
# Formats


def write_formats(root: Path, formats: list[ExportFormat], merged, loaded: LoadedModel,
                  adapter_dir: Path, base_id: str, probe, reference, console) -> dict[str, float]:
    """Write every format under `root` (hf/ first: the others reuse its files); return the
    checked logit differences by format."""
    checks: dict[str, float] = {}
    hf = root / "hf"
    with progress.phase(console, "writing the merged Hugging Face folder"):
        write_hf(hf, merged, loaded, adapter_dir, base_id)
        checks["hf"] = check_logits("hf", logits_of(reload_hf(hf), probe), reference)
    if ExportFormat.mlx in formats:
        with progress.phase(console, "writing the mlx-lm folder"):
            write_mlx(root / "mlx", hf)
            mlx_logits = mlx_logits_of(root / "mlx", probe)
            if mlx_logits is not None:
                checks["mlx"] = check_logits("mlx", mlx_logits, reference)
    if ExportFormat.gguf in formats:
        with progress.phase(console, "writing model.gguf"):
            write_gguf(root / GGUF_FILE, hf, base_id)
            checks["gguf"] = check_logits("gguf", logits_of(reload_gguf(root), probe), reference)
    if ExportFormat.hf not in formats:
        shutil.rmtree(hf)
    return checks


def write_hf(folder: Path, merged, loaded: LoadedModel, adapter_dir: Path, base_id: str) -> None:
    merged.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(loaded.tokenizer, folder)
    (folder / CARD_FILE).write_text(merged_card(adapter_dir, base_id))


def reload_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                use_safetensors=True).eval()


def reload_gguf(root: Path):
    """The GGUF read back by transformers' own GGUF loader (an independent reader of the file)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF_FILE,
                                                dtype=torch.float32).eval()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The model's tokenizer in Hugging Face's files (the byte-level test tokenizer as its exact
    `tokenizers` equivalent, so every tool that reads a model folder can use it)."""
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_tokenizer_as_hf(tokenizer)
    tokenizer.save_pretrained(folder)


def merged_card(adapter_dir: Path, base_id: str) -> str:
    """The adapter's model card, introduced as the merged model's."""
    card = adapter_dir / CARD_FILE
    body = card.read_text() if card.is_file() else ""
    if body.startswith("---\n"):  # drop the adapter's front matter: this folder is no adapter
        body = body.split("\n---\n", 1)[-1]
    return "\n".join([
        "---", f"base_model: {base_id}", "tags:", "- modelcypher", "- merged-lora", "---", "",
        f"# {base_id} with the LoRA adapter `{adapter_dir}` merged in", "",
        "Written by `python -m runner task=export` (PEFT merge_and_unload, float32). The "
        "adapter's own card follows.", "", body.lstrip("\n"),
    ])


# ---------------------------------------------------------------------------------------------
# mlx-lm


def write_mlx(folder: Path, hf: Path) -> None:
    """The hf folder's files (weights hard-linked where the file system allows) with the config
    mlx-lm reads."""
    folder.mkdir()
    for item in sorted(hf.iterdir()):
        if item.name == "config.json":
            config = mlx_config(json.loads(item.read_text()))
            (folder / item.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif item.is_file():
            try:
                os.link(item, folder / item.name)
            except OSError:
                shutil.copy2(item, folder / item.name)


def mlx_config(config: dict) -> dict:
    """transformers' config.json as mlx-lm's model classes read it: transformers keeps the RoPE
    base and scaling under `rope_parameters`; mlx-lm reads `rope_theta` and `rope_scaling` at the
    top level (and silently uses a base of 10000 without them)."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if not rope:
        return out
    if any(isinstance(v, dict) for v in rope.values()):
        raise ModelError("export mlx: the model has RoPE parameters per layer type "
                         f"({', '.join(sorted(rope))}), which mlx-lm's config cannot hold")
    out["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items()
                               if k not in ("rope_theta", "partial_rotary_factor")}
    return out


def mlx_logits_of(folder: Path, probe: torch.Tensor) -> torch.Tensor | None:
    """The logits mlx-lm computes from the folder, or None when mlx-lm is not installed."""
    try:
        import mlx.core as mx
        from mlx_lm import load
    except ImportError:
        return None
    import numpy as np

    model, _ = load(str(folder))
    logits = model(mx.array(probe.numpy()))
    return torch.from_numpy(np.array(logits.astype(mx.float32)))


# ---------------------------------------------------------------------------------------------
# The byte-level tokenizer as a Hugging Face tokenizer


def byte_tokenizer_as_hf(tokenizer: ByteTokenizer):
    """A `PreTrainedTokenizerFast` that encodes and decodes exactly as `ByteTokenizer`: byte b is
    token b (spelled as GPT-2's printable stand-in for b, as byte-level BPE does, with no merges),
    the special tokens follow, and BOS is prepended as `encode(add_special_tokens=True)` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    char_of = _bytes_to_unicode()
    vocab = {char_of[b]: b for b in range(256)}
    for token in tokenizer.all_special_tokens:
        vocab[token] = tokenizer.convert_tokens_to_ids(token)
    fast = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens(list(tokenizer.all_special_tokens))
    bos = tokenizer.bos_token
    fast.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token=bos, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token, chat_template=tokenizer.chat_template)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
