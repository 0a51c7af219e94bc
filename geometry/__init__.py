"""ModelCypher geometry: pure math over array-API arrays (numpy, torch, jax, ...).

No framework imports and no I/O: every function takes arrays and numbers and returns arrays,
Python numbers and frozen dataclasses. See docs/derivations.md for the 15 derivations.
"""

from geometry.alignment import (
    ProcrustesFit,
    cka,
    procrustes,
    procrustes_pinv_map,
    twonn_intrinsic_dimension,
)
from geometry.derivations import (
    FLOAT32_EPS,
    DerivedHyperparameters,
    LayerGeometry,
    analyze_layer,
    clipping_rule,
    critical_batch_size,
    derive_hyperparameters,
    epsilon_floor,
    init_indices,
    is_target_module,
    lora_dropout,
    lora_rank,
    lora_scale_bound,
    momentum_rule,
    residual_scale,
    schedule_rule,
    stopping_rule,
    warmup_rule,
    weight_decay_ratio,
)
from geometry.mass import MassStep, mass_ceiling, mass_step_size
from geometry.noise_scale import NoiseScale, gradient_noise_scale, per_sample_noise_scale
from geometry.provenance import Derived
from geometry.records import DerivedRecords
from geometry.spectra import (
    StructuralRank,
    effective_rank,
    effective_rank_squared,
    gram_singular_values,
    noise_floor,
    singular_values,
    spectral_decay,
    spectral_knee,
    stable_rank,
    structural_rank,
    tail_dims,
    top_singular_value_power,
    top_singular_values,
)
from geometry.stiefel import (
    cayley_displacement,
    cayley_retract,
    orthogonality_error,
    stiefel_project,
)
from geometry.stopping import (
    Criterion,
    StoppingCertificate,
    generation_drift,
    gradient_stationarity,
    predicted_improvement,
    stopping_certificate,
    two_window_test,
    validation_ci_half_width,
    validation_stability,
)
from geometry.subspaces import (
    FactoredSVD,
    factored_svd,
    principal_angle_cosines,
    random_subspace_overlap,
    subspace_overlap,
)

__all__ = [
    "FLOAT32_EPS", "Criterion", "Derived", "DerivedHyperparameters", "DerivedRecords", "LayerGeometry", "MassStep",
    "FactoredSVD", "NoiseScale", "ProcrustesFit", "StoppingCertificate", "StructuralRank", "analyze_layer",
    "cayley_displacement", "cayley_retract", "cka", "clipping_rule", "critical_batch_size", "derive_hyperparameters",
    "effective_rank", "effective_rank_squared", "epsilon_floor", "factored_svd", "generation_drift",
    "gradient_noise_scale", "gradient_stationarity", "gram_singular_values", "init_indices",
    "is_target_module", "lora_dropout", "lora_rank", "lora_scale_bound", "mass_ceiling",
    "mass_step_size", "momentum_rule", "noise_floor", "orthogonality_error",
    "per_sample_noise_scale", "predicted_improvement", "principal_angle_cosines", "procrustes", "procrustes_pinv_map",
    "random_subspace_overlap", "residual_scale", "schedule_rule", "singular_values", "spectral_decay", "spectral_knee",
    "stable_rank", "stiefel_project", "stopping_certificate", "stopping_rule", "structural_rank",
    "subspace_overlap",
    "tail_dims", "top_singular_value_power", "top_singular_values", "twonn_intrinsic_dimension",
    "two_window_test", "validation_ci_half_width", "validation_stability", "warmup_rule",
    "weight_decay_ratio",
]
