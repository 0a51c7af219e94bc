"""An array-API namespace over ``mlx.core``, for the subset of the standard ``geometry`` uses.

``mlx.core`` arrays advertise ``__array_namespace__`` but return ``mlx.core`` itself, whose
names and signatures differ from the array API (``concatenate`` for ``concat``, ``swapaxes``
for ``matrix_transpose``, ``linalg.svd(compute_uv=False)`` for ``svdvals``, linear algebra
only on the CPU stream, ...). :func:`geometry._xp.namespace` returns :data:`mlx_namespace`
for mlx arrays; this module is only imported when an mlx array is actually seen, so numpy,
torch and jax users never import mlx.

Precision: MLX supports float64 on the CPU stream only. Every ``linalg`` call here runs on
``mx.cpu`` (MLX's GPU has no LAPACK kernels), so float64 spectra work on Linux and on Apple
silicon alike; the elementwise float64 probe :func:`_float64_works` decides what
:func:`geometry._xp.work_dtype` reports on the default device (float32 on an Apple GPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import mlx.core as mx


def is_mlx_array(x) -> bool:
    return isinstance(x, mx.array)


@functools.cache
def _float64_works(device) -> bool:
    """Whether an elementwise float64 op runs on ``device`` (CPU: yes; Apple GPU: no)."""
    try:
        with mx.stream(device):
            probe = mx.array(1.0, dtype=mx.float64) + 1.0
            mx.eval(probe)
        return probe.dtype == mx.float64
    except (RuntimeError, ValueError, TypeError):
        return False


@mx.custom_function
def _inv(a):
    """A^{-1} on the CPU stream, differentiable: MLX's ``Inverse`` primitive has no VJP, so it is
    given the standard one, dA = -A^{-T} dY A^{-T} (Giles 2008, "Collected matrix derivative
    results", section 2.2.3), for maps that autodiff through an inverse (NB-LoRA's Cayley map)."""
    return mx.linalg.inv(a, stream=mx.cpu)


@_inv.vjp
def _inv_vjp(primals, cotangent, output):
    yt = mx.swapaxes(output, -1, -2)
    return -mx.matmul(mx.matmul(yt, cotangent, stream=mx.cpu), yt, stream=mx.cpu)


class EighResult(NamedTuple):
    eigenvalues: mx.array
    eigenvectors: mx.array


class SVDResult(NamedTuple):
    U: mx.array
    S: mx.array
    Vh: mx.array


class _Linalg:
    """``xp.linalg``: every decomposition on the CPU stream (the only one MLX implements)."""

    @staticmethod
    def eigvalsh(a):
        return mx.linalg.eigvalsh(a, stream=mx.cpu)

    @staticmethod
    def eigh(a):
        w, v = mx.linalg.eigh(a, stream=mx.cpu)
        return EighResult(w, v)

    @staticmethod
    def svdvals(a):
        return mx.linalg.svd(a, compute_uv=False, stream=mx.cpu)

    @staticmethod
    def svd(a, full_matrices: bool = True):
        u, s, vt = mx.linalg.svd(a, stream=mx.cpu)  # MLX returns the full U and V^T
        if not full_matrices:
            k = s.shape[-1]
            u, vt = u[..., :, :k], vt[..., :k, :]
        return SVDResult(u, s, vt)

    @staticmethod
    def qr(a, mode: str = "reduced"):
        if mode != "reduced":
            raise NotImplementedError("mlx qr: only mode='reduced'")
        return mx.linalg.qr(a, stream=mx.cpu)  # (Q, R); unpacks like the array API's tuple

    @staticmethod
    def inv(a):
        return _inv(a)

    @staticmethod
    def pinv(a):
        return mx.linalg.pinv(a, stream=mx.cpu)

    @staticmethod
    def vector_norm(x, axis=None, keepdims: bool = False, ord=2):
        if ord != 2:
            raise NotImplementedError("mlx vector_norm: only ord=2")
        return mx.sqrt(mx.sum(x * x, axis=axis, keepdims=keepdims))

    @staticmethod
    def matrix_norm(x, keepdims: bool = False, ord="fro"):
        if ord == "fro":
            return mx.sqrt(mx.sum(x * x, axis=(-2, -1), keepdims=keepdims))
        if ord == 2:
            s = mx.linalg.svd(x, compute_uv=False, stream=mx.cpu)
            return mx.max(s, axis=-1, keepdims=keepdims)
        raise NotImplementedError(f"mlx matrix_norm: ord={ord!r}")


class MlxNamespace:
    """The array-API names ``geometry`` uses, mapped onto ``mlx.core``.

    Names not defined here (``sqrt``, ``log``, ``sum``, ``max``, ``min``, ``mean``, ``where``,
    ``isfinite``, ``any``, ``all``, ``argmin``, ``argmax``, ``sort``, ``stack``, ``matmul``,
    ``ones_like``, ``zeros_like``, ``abs``, ``exp``, ...) have the array API's signature in
    ``mlx.core`` already and are forwarded unchanged.
    """

    __name__ = "geometry._mlx.mlx_namespace"
    linalg = _Linalg()
    float16, float32, float64, bfloat16 = mx.float16, mx.float32, mx.float64, mx.bfloat16
    int32, int64, bool = mx.int32, mx.int64, mx.bool_

    def __getattr__(self, name):
        return getattr(mx, name)

    # -- creation and dtypes --------------------------------------------------------------

    @staticmethod
    def asarray(obj, dtype=None, device=None, copy=None):
        if dtype is not None and dtype == mx.float64 and not _float64_works(device or mx.default_device()):
            raise TypeError(f"float64 is not supported on the MLX device {device}")
        if isinstance(obj, mx.array):
            return obj if dtype is None or obj.dtype == dtype else obj.astype(dtype)
        return mx.array(obj, dtype=dtype) if dtype is not None else mx.array(obj)

    @staticmethod
    def astype(x, dtype, copy: bool = True):
        return x.astype(dtype)

    @staticmethod
    def isdtype(dtype, kind) -> bool:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        for k in kinds:
            if k == "real floating" and mx.issubdtype(dtype, mx.floating):
                return True
            if k == "integral" and mx.issubdtype(dtype, mx.integer):
                return True
            if k == "bool" and dtype == mx.bool_:
                return True
            if k == "numeric" and dtype != mx.bool_:
                return True
            if not isinstance(k, str) and dtype == k:
                return True
        return False

    @staticmethod
    def finfo(dtype):
        return mx.finfo(dtype)

    @staticmethod
    def eye(n_rows, n_cols=None, k: int = 0, dtype=None, device=None):
        return mx.eye(n_rows, n_cols, k, dtype=dtype or mx.float32)

    @staticmethod
    def arange(start, stop=None, step=1, dtype=None, device=None):
        if stop is None:
            start, stop = 0, start
        return mx.arange(start, stop, step, dtype=dtype) if dtype is not None else \
            mx.arange(start, stop, step)

    @staticmethod
    def full_like(x, fill_value, dtype=None, device=None):
        return mx.full(x.shape, fill_value, dtype=dtype or x.dtype)

    # -- manipulation ---------------------------------------------------------------------

    @staticmethod
    def matrix_transpose(x):
        return mx.swapaxes(x, -1, -2)

    @staticmethod
    def concat(arrays, axis: int = 0):
        return mx.concatenate(list(arrays), axis=axis)

    @staticmethod
    def flip(x, axis=None):
        if axis is None:
            axis = tuple(range(x.ndim))
        axes = (axis,) if isinstance(axis, int) else axis
        for a in axes:  # reversed view by a negative-step slice on each axis
            index = [slice(None)] * x.ndim
            index[a] = slice(None, None, -1)
            x = x[tuple(index)]
        return x

    @staticmethod
    def clip(x, min=None, max=None):
        if min is None and max is None:
            return x
        return mx.clip(x, min, max)


mlx_namespace = MlxNamespace()


def device(x):
    """MLX arrays live in unified memory; the default device decides where ops run."""
    return mx.default_device()
