"""Running one job per case on a process pool, with a progress bar."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar

import SimpleITK as sitk
from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _single_threaded_worker() -> None:
    # Each process works on one case; threads inside it would only compete with the other workers.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def map_cases(job: Callable[[Item], Result], items: Sequence[Item], workers: int | None, desc: str) -> list[Result]:
    """``[job(item) for item in items]`` with ``workers`` processes (None: one per core), in item order.

    ``job`` must be a module-level function (it is pickled). The first exception raised by a job is
    re-raised here; jobs not yet started are cancelled.
    """
    workers = min(workers or available_cores(), len(items))
    with tqdm(total=len(items), desc=desc, unit="case") as bar:  # closed (a finished line) even on error
        if workers <= 1:
            results = []
            for item in items:
                results.append(job(item))
                bar.update()
            return results
        with ProcessPoolExecutor(workers, initializer=_single_threaded_worker) as pool:
            futures = [pool.submit(job, item) for item in items]
            try:
                for future in as_completed(futures):
                    future.result()  # raises the job's exception
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
            return [future.result() for future in futures]
