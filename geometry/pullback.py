"""The pullback metric of the NB-LoRA map (the seed's DISPROVEN row "P = M M^T stays ~ I").

With Y and Z of the NB-LoRA map (:func:`geometry.readings.nb_lora_generator`), the seed's code
formed M = I + Z and used P = M M^T as a preconditioner, d = P g. Its falsification measured how
far P is from the identity, ||P - I||_F / sqrt(r), and found it small, i.e. the preconditioner
did nothing. Because Z = K + Y^T Y with K = X - X^T skew, the skew part cancels to first order:

    P - I = Z + Z^T + Z Z^T = 2 Y^T Y + Z Z^T,

so P departs from I through Y (every row of the stacked free factors below the first r) and
only at second order through K.
"""

from __future__ import annotations

import math

from geometry._xp import Array, device, namespace, require_matrix, to_float
from geometry.readings import nb_lora_generator


def pullback_metric(a_free: Array, b_free: Array) -> Array:
    """P = (I + Z)(I + Z)^T (r x r) of the NB-LoRA free parameters A~ (r x n_in), B~ (r x n_out).

    **Source**: the seed's code (SEED-SPEC.md, appendix "Pullback metric"), with Z of the
    NB-LoRA map of Wang, Dvijotham & Manchester (2025), arXiv 2501.19050.

        P = (I + Z)(I + Z)^T,  Z = (X - X^T) + Y^T Y

    **Invariants**: P is symmetric positive definite (``test_pullback_positive_definite``);
    P - I = 2 Y^T Y + Z Z^T (``test_pullback_skew_part_cancels``); P = I when Y = 0 and X is
    symmetric (``test_pullback_identity_when_z_vanishes``).
    """
    require_matrix(a_free, "a_free")
    require_matrix(b_free, "b_free")
    r = a_free.shape[0]
    if b_free.shape[0] != r:
        raise ValueError(f"a_free and b_free must share r (got {r}, {b_free.shape[0]})")
    if r > a_free.shape[1] + b_free.shape[1]:
        raise ValueError(f"need r <= n_in + n_out (got r={r}, {a_free.shape[1]} + "
                         f"{b_free.shape[1]})")
    xp = namespace(a_free, b_free)
    _, z = nb_lora_generator(a_free, b_free)
    m = xp.eye(r, dtype=z.dtype, device=device(z)) + z
    return m @ m.mT


def pullback_metric_deviation(a_free: Array, b_free: Array) -> float:
    """||P - I||_F / sqrt(r): the seed's measure of how far the preconditioner is from I.

    **Source**: the seed's falsification of the pullback metric (median 1.4e-3 on LFM2-350M,
    SEED-SPEC.md appendix). sqrt(r) = ||I_r||_F, so the value is relative to the identity.

    At the seed's start A~, B~ ~ N(0, s0^2) entrywise, Y^T Y ~ c I with
    c = s0^2 (n_in + n_out - r), so the deviation is about 2c + c^2 (the Z Z^T term adds c^2
    from (Y^T Y)^2 and O(s0^2 r) from K K^T).

    **Invariants**: >= 0 and 0 exactly when Y = 0 and X is symmetric
    (``test_pullback_identity_when_z_vanishes``); about 2c + c^2 at the seed's start
    (``test_pullback_deviation_at_seed_start``).
    """
    p = pullback_metric(a_free, b_free)
    xp = namespace(p)
    r = p.shape[0]
    diff = p - xp.eye(r, dtype=p.dtype, device=device(p))
    return to_float(xp.sqrt(xp.sum(diff * diff))) / math.sqrt(r)
