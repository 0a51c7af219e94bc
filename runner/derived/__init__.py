"""The derived trainer, written once for every backend (torch, MLX, JAX).

spec (adapter specs, measured records), step (the reading's S rule), trainer (the step,
curvature, checkpoints), certificate, setup, run, export; per backend only its ops:
torch_ops (+ torch_dropout), array_ops (MLX/JAX shared), mlx_ops, jax_ops.
"""

from runner.derived.run import run_derived
from runner.derived.setup import DerivedSetup, derive_for_model, setup_derived
from runner.derived.step import READINGS, is_derived
from runner.derived.torch_ops import candidate_linears

__all__ = ["READINGS", "DerivedSetup", "candidate_linears", "derive_for_model", "is_derived",
           "run_derived", "setup_derived"]
