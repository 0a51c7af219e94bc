"""task=export's GGUF: the merged float32 weights of a Llama-family model in one GGUF file.

Written with gguf-py's `GGUFWriter` as llama.cpp's converter lays a Llama out: tensors under
llama.cpp's names (`gguf.get_tensor_name_map`), q_proj and k_proj rows reordered from Hugging
Face's rotary layout (two halves per head) to llama.cpp's (interleaved pairs), and the
architecture's hyperparameters as `llama.*` keys. The tokenizer is not converted: the file holds
the model, and the `hf/` folder beside it holds the tokenizer (llama.cpp's
`convert_hf_to_gguf.py hf/` writes a file with both).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from runner.errors import ModelError

GGUF_ARCHITECTURES = ("llama",)


def write_gguf(path: Path, hf: Path, base_id: str) -> None:
    """Write the merged model of the Hugging Face folder `hf` to `path`."""
    config = json.loads((hf / "config.json").read_text())
    if config.get("model_type") not in GGUF_ARCHITECTURES:
        raise ModelError(f"export gguf: model_type '{config.get('model_type')}' is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)}); export hf and convert "
                         "it with llama.cpp's convert_hf_to_gguf.py")
    tensors = read_tensors(hf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hyperparameters(writer, config, base_id)
    for name in sorted(tensors):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"export gguf: tensor {name} has no llama.cpp name")
        writer.add_tensor(target, to_gguf_layout(name, tensors[name], config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_tensors(hf: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(hf.glob("model*.safetensors")):
        tensors.update(load_file(shard))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def add_hyperparameters(writer, config: dict, base_id: str) -> None:
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(f"{base_id} (LoRA merged)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def to_gguf_layout(name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    """q_proj / k_proj rows in llama.cpp's rotary order; every other tensor as it is."""
    heads = config["num_attention_heads"]
    if name.endswith("self_attn.q_proj.weight"):
        return rotary_rows(weight, heads)
    if name.endswith("self_attn.k_proj.weight"):
        return rotary_rows(weight, config.get("num_key_value_heads") or heads)
    return weight


def rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [first half; second half] -> interleaved pairs (llama.cpp's converter)."""
    out_rows = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(heads, 2, out_rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2).reshape(weight.shape))


def from_gguf_layout(name: str, weight: np.ndarray, config: dict) -> np.ndarray:
    """The inverse of `to_gguf_layout` (what transformers does when it reads a llama GGUF)."""
    heads = config["num_attention_heads"]
    if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        if name.endswith("k_proj.weight"):
            heads = config.get("num_key_value_heads") or heads
        out_rows = weight.shape[0]
        return np.ascontiguousarray(
            weight.reshape(heads, out_rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))
    return weight
