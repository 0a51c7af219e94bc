"""Array-namespace helpers: one place that decides namespace, device and working dtype.

Everything in ``geometry`` goes through these helpers so that the same function runs on numpy,
torch, jax, array-api-strict and mlx arrays without importing any of them (mlx arrays get the
adapter in ``geometry/_mlx.py``, imported only when an mlx array is passed).
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

Array = Any


def as_array(x: Any) -> Array:
    """Return ``x`` unchanged if it is an array-API array, else a float64 numpy array.

    Lets small inputs (lists of singular values, Python floats) be passed directly.
    """
    if array_api_compat.is_array_api_obj(x):
        return x
    return np.asarray(x, dtype=np.float64)


def _is_mlx(x: Any) -> bool:
    """An ``mlx.core.array``, recognised without importing mlx."""
    return type(x).__module__ == "mlx.core"


def namespace(*arrays: Array):
    """The array-API namespace shared by ``arrays`` (``array_api_compat.array_namespace``;
    for mlx arrays, the adapter :data:`geometry._mlx.mlx_namespace`)."""
    if any(_is_mlx(a) for a in arrays):
        others = [a for a in arrays if not _is_mlx(a) and array_api_compat.is_array_api_obj(a)]
        if others:
            raise TypeError(f"cannot mix mlx arrays with {type(others[0]).__name__} arrays")
        from geometry._mlx import mlx_namespace

        return mlx_namespace
    return array_api_compat.array_namespace(*arrays)


def device(x: Array):
    """The device that holds ``x``."""
    if _is_mlx(x):
        from geometry._mlx import device as mlx_device

        return mlx_device(x)
    return array_api_compat.device(x)


def _supports(xp, dtype, dev) -> bool:
    try:
        probe = xp.asarray(0.0, dtype=dtype, device=dev)
    except (TypeError, RuntimeError, ValueError):
        return False
    return probe.dtype == dtype


def work_dtype(x: Array):
    """float64 where the device supports it (CPU, CUDA, x64 jax), else the input's float dtype.

    Spectra are computed in float64 when possible; on devices without float64 (Apple MPS, jax
    without x64) we fall back to the input's floating dtype (at least float32).
    """
    xp = namespace(x)
    dev = device(x)
    if _supports(xp, xp.float64, dev):
        return xp.float64
    if xp.isdtype(x.dtype, "real floating"):
        return x.dtype if x.dtype != xp.float16 else xp.float32
    return xp.float32


def to_work(x: Array) -> Array:
    """Cast ``x`` to :func:`work_dtype` (a no-op when it already is)."""
    xp = namespace(x)
    dt = work_dtype(x)
    return x if x.dtype == dt else xp.astype(x, dt)


def _on_host(x: Array) -> bool:
    """A numpy array or a CPU torch tensor: memory LAPACK can read without a copy."""
    if array_api_compat.is_numpy_array(x):
        return True
    return array_api_compat.is_torch_array(x) and x.device.type == "cpu"


def eigvalsh(g: Array) -> Array:
    """Eigenvalues (ascending) of the symmetric matrix ``g``, in ``g``'s dtype and namespace.

    On a float64 host array (numpy, CPU torch) the solve is ``numpy.linalg.eigvalsh`` (LAPACK's
    ``dsyevd``, as ``xp.linalg.eigvalsh`` computes it), which releases the GIL, so matrices
    analysed on several threads share the cores (SciPy's ``eigh`` holds it). Elsewhere (GPU,
    jax, mlx, array-api-strict) it is the namespace's own ``eigvalsh``.
    """
    xp = namespace(g)
    if _on_host(g) and g.dtype == xp.float64:
        host = g.detach().numpy() if array_api_compat.is_torch_array(g) else g
        return xp.asarray(np.linalg.eigvalsh(host), dtype=xp.float64, device=device(g))
    return xp.linalg.eigvalsh(g)


def host_eigh(a, subset: tuple[int, int]):
    """The eigenpairs of index ``subset = (lo, hi)`` (inclusive, counted from the smallest) of
    the symmetric numpy array ``a``, eigenvalues ascending: LAPACK's ``?syevr`` (MRRR) through
    SciPy, which computes only those eigenvectors. No finiteness check (callers pass Gram
    matrices of finite weights)."""
    from scipy.linalg import eigh

    return eigh(a, subset_by_index=list(subset), driver="evr", check_finite=False)


def to_float(x: Any) -> float:
    """A Python float from a 0-d array or number (one host transfer)."""
    return float(x)


def require_matrix(w: Array, name: str = "w") -> None:
    """ValueError unless ``w`` is a 2-D array with both dimensions >= 1."""
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D (got ndim={w.ndim})")
    if w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must have both dimensions >= 1 (got shape={tuple(w.shape)})")


def require_vector(s: Array, name: str = "s") -> None:
    """ValueError unless ``s`` is a non-empty 1-D array."""
    if s.ndim != 1 or s.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (got shape={tuple(s.shape)})")
