"""The thread pools of runner/training/runtime.py."""

from __future__ import annotations

import threading

import numpy as np
import torch

import geometry
from runner.training.runtime import one_lapack_thread, worker_pool


def test_worker_pool_threads_run_torch_on_one_thread():
    """The pool's threads each run torch on one thread (no OpenMP team per worker), and neither
    the caller's count nor that of threads started afterwards changes."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with worker_pool(2) as pool:
            in_workers = set(pool.map(lambda _: torch.get_num_threads(), range(8)))
            assert torch.get_num_threads() == 2
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(before)
    assert in_workers == {1}
    assert later == [2]


def test_derivation_on_a_pool_equals_the_serial_one():
    """derive_hyperparameters maps its per-matrix analysis with the given map: a pool's map
    gives the same records, in the same order, as the builtin one."""
    rng = np.random.default_rng(0)
    weights = {f"m.layers.{i}.w": rng.standard_normal((24, 16)) * np.linspace(3, 0.1, 16)
               for i in range(4)}
    kw = {"n_train": 50, "batches_per_epoch": 10, "dtype_eps": 2.0**-23}
    serial = geometry.derive_hyperparameters(weights, **kw)
    with one_lapack_thread(), worker_pool(2) as pool:
        pooled = geometry.derive_hyperparameters(weights, **kw, map_fn=pool.map)
    assert pooled.to_dict() == serial.to_dict()
