"""The bench's worker processes (each arm measured in a fresh process with its own threads and
peak memory) and the memory readings it takes inside them."""

from __future__ import annotations

import os
import resource
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

BENCH_MODULE = "runner.tasks.bench"  # what the forkserver imports once for every worker


@contextmanager
def worker_process(threads: int):
    """A fresh process of its own (its own peak memory, its own threads) that keeps its state
    between calls: a one-worker pool.

    It forks from a forkserver that has imported the bench module (torch, transformers, PEFT) once
    but run nothing, so it starts in a second instead of re-importing for ten.
    """
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([BENCH_MODULE])
    with thread_env(threads), ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        yield pool


@contextmanager
def thread_env(threads: int):
    """Children start their thread pools from the environment before torch is told."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    if threads:
        os.environ.update({k: str(threads) for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0: clear_refs 5); False if unable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return vm_hwm_mb() is not None
    except OSError:
        return False


def vm_hwm_mb() -> float | None:
    """Peak resident set since the last reset (VmHWM in /proc/self/status)."""
    try:
        return parse_vm_hwm_mb(Path("/proc/self/status").read_text())
    except OSError:
        return None


def parse_vm_hwm_mb(status: str) -> float | None:
    """VmHWM of a /proc/<pid>/status text, in MB (the kernel writes kB); None if absent."""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmHWM in unexpected unit {unit!r}")
            return int(value) / 1024.0
    return None


def whole_process_peak(readings: list[float | None]) -> float:
    """The process's peak over every phase, from the peaks read phase by phase (the peak is
    reset between phases, so no one reading spans them all); None readings (a phase whose peak
    could not be read apart) are skipped."""
    known = [r for r in readings if r is not None]
    if not known:
        raise ValueError("no memory reading to take the peak of")
    return max(known)
