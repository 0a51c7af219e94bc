"""Non-torch compute backends (JAX, MLX) mirroring the torch adapted forward.

Submodules are imported lazily so that a missing optional dependency (``jax``,
``mlx``) only matters when that backend is requested::

    from runner.models.backends import get_backend
    jb = get_backend("jax")      # -> runner.models.backends.jax_llama
    mb = get_backend("mlx")      # -> runner.models.backends.mlx_models

Each backend module exposes ``params_from_torch(state_dict, config)``,
``logits(params, input_ids, attention_mask=None, adapters=None)``,
``masked_cross_entropy(logits, labels)`` and ``loss_and_grads(params, adapters, batch)``.
Both run the one model of :mod:`.array_forward`, written against the array API; each module
holds only its parameters, its :class:`~.array_forward.ForwardOps` and how it compiles.

Importing this package calls :func:`runner.models.backends.mlx_blas.use_torch_blas` (Linux, before
MLX is imported: MLX's CPU BLAS is the slow reference one; see that module).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._spec import IGNORE_INDEX, ModelSpec, module_names, spec_from_config
from .mlx_blas import use_torch_blas

# Before anything imports MLX: its CPU matmuls then run torch's BLAS (runner/models/backends/mlx_blas.py).
use_torch_blas()

_BACKENDS = {"jax": "jax_llama", "mlx": "mlx_models"}

__all__ = ["IGNORE_INDEX", "ModelSpec", "get_backend", "module_names", "spec_from_config"]


def get_backend(name: str) -> ModuleType:
    """Import and return the backend module for ``name`` ("jax" or "mlx")."""
    try:
        mod = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(_BACKENDS)}") from None
    return importlib.import_module(f"{__name__}.{mod}")
