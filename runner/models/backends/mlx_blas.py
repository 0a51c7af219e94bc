"""MLX on a Linux CPU: run its BLAS and LAPACK calls on torch's kernels (MKL or OpenBLAS).

Why: the Linux ``mlx[cpu]`` wheels bundle the netlib *reference* BLAS and LAPACK
(``mlx_cpu.libs/libblas-*.so.3.10.0``, ``liblapack-*.so.3.10.0``). MLX's float32 matmul on the
CPU is ``cblas_sgemm``, and the reference implementation is a triple loop: about 1.4 GFLOP/s
on one core, 25x slower than an optimised sgemm (576x576 @ 576x512: 0.12 s against 0.005 s).
With it an MLX training step of SmolLM2-135M took minutes where torch takes seconds; nothing
in our code (graph size, evaluation points, dtypes) was the cause: the time was all in sgemm.

The fix: torch's ``libtorch_cpu.so`` (MKL in the x86-64 wheels) exports the Fortran BLAS and
LAPACK entry points, ``sgemm_``, ``dgemm_``, ``ssyevd_``, ``dsyevd_``, ``sgesdd_``, ... with
32-bit integers (torch calls them itself with ``int``), which is the interface the reference
libraries use. The reference ``cblas_sgemm`` is a wrapper that calls ``sgemm_``, and MLX calls
the LAPACK routines by those names; the dynamic linker looks such symbols up in the global
scope first. So re-opening the already loaded ``libtorch_cpu.so`` with ``RTLD_GLOBAL`` before
``mlx.core`` is first imported makes every MLX BLAS/LAPACK call run torch's kernels: the same
matmul then takes 0.005 s, and a float64 576x576 ``eigh`` 0.03 s instead of 0.27 s. MLX's
libraries bind their symbols when they are loaded (``BIND_NOW``), so this must come first: it
is called by ``runner.models.backends`` on import, by ``runner.hardware`` before it imports MLX, and
by tests/conftest.py.

Threads: MLX makes its BLAS/LAPACK calls from its own stream threads. torch's MKL keeps a
thread count per thread and ``torch.set_num_threads(n)`` sets only the calling thread's, so
without more MLX's calls run on MKL's process-wide count, OpenMP's default (every core, or
``OMP_NUM_THREADS`` as it was when libgomp loaded), and multi-threaded MKL results are not
bitwise reproducible (MKL's CNR mode is off): two identical MLX runs on ``hardware.threads=1``
then differ in the last bits of their gradients. :func:`set_threads` sets that process-wide
count (``mkl_serv_set_num_threads``, which MKL's public ``mkl_set_num_threads`` calls; torch's
static MKL does not export the public name) and turns MKL's dynamic thread count off. Without
those entry points (a torch built on another BLAS) MLX keeps its reference BLAS, which is
single-threaded.

Scope: Linux only (MLX on macOS uses Accelerate), and only while ``mlx.core`` is not imported
yet. Only libraries loaded afterwards can bind to torch's exported symbols; among the
installed extension libraries only MLX's (libmlx, its libblas and liblapack, its core module)
have undefined symbols that ``libtorch_cpu.so`` defines. ``MODELCYPHER_MLX_REFERENCE_BLAS=1``
turns it off (to measure the difference).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

_STATE: dict[str, bool] = {}
_TORCH_LIB: list[ctypes.CDLL] = []  # libtorch_cpu.so once use_torch_blas took effect


def use_torch_blas() -> bool:
    """Make torch's BLAS/LAPACK symbols global before MLX loads; True if MLX will use them.
    Idempotent; a no-op (False) off Linux, without MLX installed, once ``mlx.core`` is
    imported, without torch's ``sgemm_`` or MKL's thread control, or with
    ``MODELCYPHER_MLX_REFERENCE_BLAS=1``."""
    if "done" in _STATE:
        return _STATE["done"]
    ok = False
    if (sys.platform.startswith("linux") and "mlx.core" not in sys.modules
            and os.environ.get("MODELCYPHER_MLX_REFERENCE_BLAS") != "1"
            and importlib.util.find_spec("mlx") is not None):
        import torch

        lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
        try:
            local = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
            if all(hasattr(local, f) for f in ("sgemm_", "dsyevd_", "mkl_serv_set_num_threads",
                                               "mkl_serv_set_dynamic")):
                ctypes.CDLL(lib, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
                _TORCH_LIB.append(local)
                ok = True
        except OSError:  # not loaded under that path (a torch build without libtorch_cpu.so)
            ok = False
    _STATE["done"] = ok
    return ok


def set_threads(threads: int) -> None:
    """Run every BLAS/LAPACK call MLX makes on exactly ``threads`` threads: MKL's process-wide
    count, which MLX's stream threads use (and any other thread that set no count of its own).
    A no-op unless :func:`use_torch_blas` took effect."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    if _TORCH_LIB:
        lib = _TORCH_LIB[0]
        lib.mkl_serv_set_dynamic(ctypes.c_int(0))  # else MKL may use fewer threads when busy
        lib.mkl_serv_set_num_threads(ctypes.c_int(threads))
