"""Pick and prepare the compute device; describe it for the ledger.

`hardware=<name>` (conf/hardware/) names a backend and a device:

| backend | device | present when |
|---|---|---|
| torch | cpu | always |
| torch | cuda, cuda:N | `torch.cuda.is_available()` |
| torch | mps | `torch.backends.mps.is_available()` |
| mlx | auto, cpu, gpu | `mlx.core` imports; gpu needs Metal (auto: gpu if Metal, else cpu) |
| jax | cpu, gpu, tpu | jax imports and `jax.devices(device)` lists one |

Absent hardware raises `HardwareUnavailable` with a one-line reason. Outside a sweep that ends
the run with that line (exit 2); inside a Hydra multirun, task=train and task=claims record
SKIPPED trial rows instead (`in_sweep`), so the other jobs of the sweep go on.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from runner.config.schema import Backend, HardwareConfig, RunConfig
from runner.errors import ConfigError, HardwareUnavailable

ALL_BACKENDS = ("torch", "mlx", "jax")


@dataclass(frozen=True)
class HardwareInfo:
    name: str
    backend: str
    device: str  # the device that runs (mlx's `auto` resolved to cpu or gpu)
    dtype: str
    threads: int

    def as_row(self) -> dict:
        return {"hardware": self.name, "backend": self.backend, "device": self.device,
                "dtype": self.dtype, "threads": self.threads}

    @property
    def torch_device(self) -> str:
        """Where torch puts the weights: the device itself for torch, else the CPU (mlx and
        jax read the weights from torch tensors and compute on their own device)."""
        return self.device if self.backend == "torch" else "cpu"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _value(x) -> str:
    return getattr(x, "value", x)


def setup_hardware(cfg: HardwareConfig, *, backends: tuple[str, ...] = ALL_BACKENDS,
                   task: str = "train") -> HardwareInfo:
    """Check the requested hardware exists here and configure threads; raise if it does not.

    `backends`: the backends the calling task can run on (task=model_info, lora_svd and bench
    are torch code: they pass ("torch",)).
    """
    backend = _value(cfg.backend)
    if backend not in backends:
        raise HardwareUnavailable(
            f"hardware={cfg.name}: task={task} runs on backend {' or '.join(backends)} only, "
            f"not {backend}")
    if getattr(cfg, "recompute", False) and backend != Backend.torch.value:
        raise ConfigError(f"hardware.recompute: the torch backend only (hardware={cfg.name} "
                          f"runs {backend}, which keeps every activation)")
    threads = cfg.threads or usable_cores()
    import torch  # weights and data are loaded through torch on every backend

    torch.set_num_threads(threads)
    if backend == Backend.torch.value:
        device = _torch_device(cfg)
    elif backend == Backend.mlx.value:
        device = _mlx_device(cfg)
    else:
        device = _jax_device(cfg)
    return HardwareInfo(cfg.name, backend, device, _value(cfg.dtype), threads)


def _torch_device(cfg: HardwareConfig) -> str:
    import torch

    # the option that asked for the device: the group, or a device set apart from it
    where = f"hardware={cfg.name}" if cfg.device == cfg.name else f"hardware.device={cfg.device}"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HardwareUnavailable(f"{where}: no CUDA device on this machine")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise HardwareUnavailable(f"{where}: no Apple MPS device on this machine")
    return cfg.device


def _mlx_device(cfg: HardwareConfig) -> str:
    from runner.models.backends.mlx_blas import use_torch_blas

    use_torch_blas()  # before MLX loads: its Linux CPU BLAS is the reference one
    try:
        import mlx.core as mx
    except ImportError as err:
        raise HardwareUnavailable(
            f"hardware={cfg.name}: MLX is not installed ({err}; pip install 'modelcypher[mlx]')"
        ) from None
    metal = bool(mx.metal.is_available())
    device = cfg.device if cfg.device != "auto" else ("gpu" if metal else "cpu")
    if device not in ("cpu", "gpu"):
        raise HardwareUnavailable(
            f"hardware={cfg.name}: MLX device must be auto, cpu or gpu, not '{cfg.device}'")
    if device == "gpu" and not metal:
        raise HardwareUnavailable(f"hardware={cfg.name}: no Metal GPU for MLX on this machine")
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return device


def _jax_device(cfg: HardwareConfig) -> str:
    try:
        import jax
    except ImportError as err:
        raise HardwareUnavailable(
            f"hardware={cfg.name}: JAX is not installed ({err}; pip install 'modelcypher[jax]')"
        ) from None
    kind = cfg.device.split(":")[0]
    try:
        devices = jax.devices(kind)
    except RuntimeError:  # "Unknown backend: 'gpu' requested, but no platforms ..."
        devices = []
    index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
    if len(devices) <= index:
        raise HardwareUnavailable(f"hardware={cfg.name}: JAX has no {cfg.device} device on "
                                  "this machine")
    jax.config.update("jax_default_device", devices[index])
    return cfg.device


def resolved(cfg: RunConfig, hw: HardwareInfo) -> RunConfig:
    """`cfg` with the device that actually runs (mlx `auto` -> cpu or gpu), so the config hash
    tells an MLX CPU trial from an MLX GPU one."""
    if cfg.hardware.device == hw.device:
        return cfg
    return replace(cfg, hardware=replace(cfg.hardware, device=hw.device))


def in_sweep() -> bool:
    """True inside a Hydra multirun job (`python -m runner -m ...`, any launcher)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra context (library use, tests)
        return False


# ---------------------------------------------------------------------------------------------
# The CPU and BLAS a trial ran on (the ledger records them beside the device)


@functools.cache
def cpu_facts() -> dict[str, Any]:
    """{"cpu_model", "cpu_cores", "blas"}: what a reviewer needs to compare timings and
    floating-point results across machines (BLAS kernels differ in summation order)."""
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count() or 0, "blas": blas_info()}


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, sysctl on macOS, else platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def blas_info() -> dict[str, str]:
    """The BLAS behind torch (`torch.__config__.show()`) and numpy (`np.show_config`)."""
    import numpy as np
    import torch

    out = {}
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    if match:
        out["torch"] = match.group(1)
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out["numpy"] = " ".join(str(deps.get(k)) for k in ("name", "version") if deps.get(k))
    except (KeyError, TypeError, ValueError):
        pass
    return out
