"""Array-namespace helpers: one place that decides namespace, device and working dtype.

Everything in ``geometry`` goes through these helpers so that the same function runs on numpy,
torch, jax, array-api-strict and mlx arrays without importing any of them (mlx arrays get the
adapter in ``geometry/_mlx.py``, imported only when an mlx array is passed).
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
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


def one_lapack_thread():
    """A context in which NumPy's and SciPy's BLAS/LAPACK run on one thread each.

    For work split over matrices by a thread pool: one LAPACK thread per matrix avoids the
    oversubscription (each call starting as many spinning threads as there are cores, from every
    worker): beside one other job, the 210-matrix derivation of SmolLM2-135M took 126 s that
    way. torch's own threads are not affected.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool for work split over independent matrices, whose threads each run torch's
    operations on one thread of their own (torch, when loaded; other libraries are untouched).

    Why: under OpenMP every thread that starts a parallel region gets a team of its own, so a
    pool of w threads on a c-thread torch adds w x c threads. Once OpenMP manages more threads
    than there are cores, libgomp stops spinning its idle threads between regions and puts
    them to sleep at once (its "throttled" wait), and from then on every operation of the
    process, the training step's forward and backward included, waits for its threads to wake.
    On this 2-core CPU the derived trainer's update pool did that: its process then kept 1.7
    cores busy in the forward/backward instead of 1.9, and the step ran 10% slower. With one
    thread per worker the pool adds w threads and no team.

    ``torch.set_num_threads`` inside a worker sets that thread's OpenMP count, but also the
    default of threads started later; the caller's count is restored as that default once the
    workers have started.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return ThreadPoolExecutor(max_workers=workers)
    caller = torch.get_num_threads()
    started = threading.Barrier(workers + 1)

    def one_thread() -> None:
        torch.get_num_threads()  # torch's per-thread set-up first, or it later undoes the next line
        torch.set_num_threads(1)
        started.wait()

    pool = ThreadPoolExecutor(max_workers=workers, initializer=one_thread)
    for _ in range(workers):  # no thread is idle yet, so each submit starts one
        pool.submit(int)
    started.wait()
    torch.set_num_threads(caller)
    return pool


def eigvalsh(g: Array) -> Array:
    """Eigenvalues (ascending) of the symmetric matrix ``g``, in ``g``'s dtype and namespace.

    On a float64 host array (numpy, CPU torch) the solve is ``numpy.linalg.eigvalsh``: LAPACK's
    ``dsyevd`` (Householder tridiagonalisation, then the tridiagonal eigenvalues), as
    ``xp.linalg.eigvalsh`` computes them, but faster than torch's CPU eigvalsh, and it releases
    the GIL, so the matrices of a model share the derivation's threads (SciPy's ``eigh`` holds
    the GIL: on 40 Gram matrices of 576 x 576, 2 threads took 0.96 s with SciPy against 0.52 s
    with NumPy, 0.82 and 0.91 s on one thread). Elsewhere (GPU, jax, mlx, array-api-strict) it
    is the namespace's own ``eigvalsh``.
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
