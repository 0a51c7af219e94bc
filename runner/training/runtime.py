"""Thread pools for work split over independent matrices (derivation, frames, adapter updates)."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def one_lapack_thread():
    """A context in which NumPy's and SciPy's BLAS/LAPACK run on one thread each: a pool of
    workers that each start a full team of BLAS threads oversubscribes the cores. torch's own
    threads are not affected."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool whose threads each run torch's operations on one thread of their own
    (torch, when loaded; other libraries are untouched).

    Why: under OpenMP every thread that starts a parallel region gets a team of its own, so a
    pool of w threads on a c-thread torch adds w x c threads; once OpenMP manages more threads
    than there are cores, libgomp puts idle threads to sleep at once, and every later operation
    of the process (the training step included) waits for its threads to wake. With one thread
    per worker the pool adds w threads and no team.

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
