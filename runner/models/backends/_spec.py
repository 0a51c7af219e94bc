"""Framework-neutral pieces shared by the JAX and MLX backends.

``ModelSpec`` holds the static (hashable) architecture description read from a
Hugging Face config; ``state_dict_to_numpy`` turns a torch state dict into
float32 numpy arrays keyed by the HF parameter names.  Nothing here imports
jax or mlx, and torch is only touched through duck typing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

IGNORE_INDEX = -100

SUPPORTED_ARCHS = ("llama", "lfm2")


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # "llama" | "lfm2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "conv"
    conv_kernel: int = 0  # LFM2 conv_L_cache

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _cfg(config: Any) -> Any:
    if isinstance(config, Mapping):
        return SimpleNamespace(**config)
    return config


def _rope_theta(cfg: Any) -> float:
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if isinstance(rp, Mapping):
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype not in (None, "default"):
            raise NotImplementedError(f"rope_type {rtype!r} is not supported by the array backends")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def spec_from_config(config: Any) -> ModelSpec:
    """Build a :class:`ModelSpec` from a HF ``LlamaConfig``/``Lfm2Config`` (or its dict)."""
    cfg = _cfg(config)
    arch = getattr(cfg, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"model_type {arch!r} not supported (have {SUPPORTED_ARCHS})")
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    n_layers = int(cfg.num_hidden_layers)
    if arch == "llama":
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            raise NotImplementedError("pretraining_tp > 1")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.hidden_act!r}")
        eps = float(cfg.rms_norm_eps)
        layer_types = ("full_attention",) * n_layers
        conv_kernel = 0
    else:
        eps = float(cfg.norm_eps)
        layer_types = tuple(getattr(cfg, "layer_types", None) or ())
        if not layer_types:
            full = set(getattr(cfg, "full_attn_idxs", None) or ())
            layer_types = tuple("full_attention" if i in full else "conv" for i in range(n_layers))
        conv_kernel = int(cfg.conv_L_cache)
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    return ModelSpec(
        arch=arch,
        vocab_size=int(cfg.vocab_size),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rope_theta=_rope_theta(cfg),
        norm_eps=eps,
        tie_word_embeddings=tie,
        layer_types=layer_types,
        conv_kernel=conv_kernel,
    )


def state_dict_to_numpy(state_dict: Mapping[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    """float32 numpy copies of the weights; drops buffers, resolves the tied lm_head.

    Keys keep the HF names (``model.layers.0.self_attn.q_proj.weight``); Linear weights
    keep the PyTorch ``(out, in)`` layout so adapter module names map one-to-one.
    LFM2 depthwise conv weights ``(H, 1, K)`` are squeezed to ``(H, K)``.
    """
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        if k.endswith("rotary_emb.inv_freq") or "original_inv_freq" in k:
            continue
        if hasattr(v, "detach"):
            v = v.detach().to("cpu")
            v = v.float().numpy() if v.is_floating_point() else v.numpy()
        arr = np.asarray(v, dtype=np.float32)
        if spec.arch == "lfm2" and k.endswith(".conv.conv.weight") and arr.ndim == 3:
            arr = arr[:, 0, :]
        out[k] = np.ascontiguousarray(arr)
    if spec.tie_word_embeddings or "lm_head.weight" not in out:
        out.pop("lm_head.weight", None)  # logits use model.embed_tokens.weight
    return out


def lm_head_key(weights: Mapping[str, Any]) -> str:
    return "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"


def final_norm_key(spec: ModelSpec) -> str:
    return "model.norm.weight" if spec.arch == "llama" else "model.embedding_norm.weight"


def split_adapters(adapters: Mapping[str, Any] | None):
    """``{name: (U, S, V, c)}`` -> (``{name: (U, S, V)}``, ``{name: c}``)."""
    usv, scale = {}, {}
    for name, a in (adapters or {}).items():
        if len(a) != 4:
            raise ValueError(f"adapter {name!r} must be (U, S, V, c), got {len(a)} items")
        u, s, v, c = a
        usv[name] = (u, s, v)
        scale[name] = c
    return usv, scale


def module_names(spec: ModelSpec) -> list[str]:
    """All Linear module names an adapter may target (HF naming)."""
    names = []
    for i, lt in enumerate(spec.layer_types):
        p = f"model.layers.{i}"
        if spec.arch == "llama":
            names += [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [f"{p}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
        else:
            if lt == "conv":
                names += [f"{p}.conv.in_proj", f"{p}.conv.out_proj"]
            else:
                names += [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")]
            names += [f"{p}.feed_forward.{m}" for m in ("w1", "w3", "w2")]
    names.append("lm_head")
    return names
