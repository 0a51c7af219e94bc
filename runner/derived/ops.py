"""The derived trainer's backend operations, chosen by ``hardware.backend``."""

from __future__ import annotations

import importlib

from runner.derived.torch_ops import TorchOps

# The MLX and JAX modules import their optional dependency at module level.
_ARRAY_OPS = {"mlx": ("runner.derived.mlx_ops", "MlxOps"),
              "jax": ("runner.derived.jax_ops", "JaxOps")}


def make_ops(backend: str, model):
    """The backend's operations on ``model`` (torch: the model itself; MLX/JAX: a float32 copy
    of its weights)."""
    if backend == "torch":
        return TorchOps(model)
    if backend not in _ARRAY_OPS:
        raise ValueError(f"unknown backend {backend!r}; choose from torch, "
                         f"{', '.join(sorted(_ARRAY_OPS))}")
    module, cls = _ARRAY_OPS[backend]
    return getattr(importlib.import_module(module), cls)(model)
