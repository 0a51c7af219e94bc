"""Pick and prepare the compute device; describe it for the ledger."""

from __future__ import annotations

import os
from dataclasses import dataclass

from runner.errors import HardwareUnavailable
from runner.schema import Backend, HardwareConfig


@dataclass(frozen=True)
class HardwareInfo:
    name: str
    backend: str
    device: str
    dtype: str
    threads: int

    def as_row(self) -> dict:
        return {"hardware": self.name, "backend": self.backend, "device": self.device,
                "dtype": self.dtype, "threads": self.threads}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_hardware(cfg: HardwareConfig) -> HardwareInfo:
    """Check the requested hardware exists here and configure threads; raise if it does not."""
    threads = cfg.threads or usable_cores()
    if cfg.backend is not Backend.torch:
        raise HardwareUnavailable(
            f"hardware={cfg.name}: backend '{cfg.backend.value}' cannot run task=train in this "
            "build (torch only)"
        )
    import torch

    torch.set_num_threads(threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HardwareUnavailable(f"hardware={cfg.name}: no CUDA device on this machine")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise HardwareUnavailable(f"hardware={cfg.name}: no Apple MPS device on this machine")
    return HardwareInfo(cfg.name, cfg.backend.value, cfg.device, cfg.dtype.value, threads)
