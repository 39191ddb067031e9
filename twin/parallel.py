"""One parallel-map abstraction for fanning out independent runs (twin runs, mostly).

A ``Mapper`` is called as ``mapper(fn, jobs, progress)`` and returns ``[fn(j) for j in jobs]``
— results in job order whatever order they finished in — calling ``progress(done, total)``
(counted in jobs) as results come in. Three exist:

* ``sequential_map``: in this process, one after the other;
* ``process_map(workers)``: a ``ProcessPoolExecutor`` of ``workers`` processes (1 = sequential);
* ``orchestrator.control.fanout.ray_map(...)``: Ray tasks over a cluster (needs a running Ray).

Jobs are submitted in the order given, so a caller that wants the heaviest first (to keep the
pool busy to the end) sorts them before calling. ``fn`` and the jobs must be picklable for the
process and Ray mappers (a module-level function and plain data). When a job raises, its
exception is re-raised with a note naming the job's index; the remaining jobs are cancelled.

No Ray and no vLLM here: ``twin`` and ``placement`` use it as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Protocol, TypeVar

J = TypeVar("J")
R = TypeVar("R")

Progress = Callable[[int, int], None]


class Mapper(Protocol):
    """``mapper(fn, jobs, progress=None) -> [fn(j) for j in jobs]`` in job order."""

    def __call__(
        self, fn: Callable[[J], R], jobs: Sequence[J], progress: Progress | None = None
    ) -> list[R]: ...


def job_failed(exc: BaseException, index: int, total: int, where: str) -> BaseException:
    """``exc`` with a note naming the job that raised it (for the mappers to re-raise)."""
    exc.add_note(f"{where}: raised by job {index} (of {total})")
    return exc


def sequential_map(
    fn: Callable[[J], R], jobs: Sequence[J], progress: Progress | None = None
) -> list[R]:
    """``[fn(j) for j in jobs]`` in this process, reporting progress after each job."""
    out: list[R] = []
    total = len(jobs)
    for i, job in enumerate(jobs):
        try:
            out.append(fn(job))
        except Exception as exc:
            job_failed(exc, i, total, "sequential_map")
            raise
        if progress:
            progress(i + 1, total)
    return out


def process_map(workers: int) -> Mapper:
    """A mapper running jobs in a pool of ``workers`` processes (capped at the number of jobs;
    1 or a single job runs sequentially in this process)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")

    def mapper(
        fn: Callable[[J], R], jobs: Sequence[J], progress: Progress | None = None
    ) -> list[R]:
        jobs = list(jobs)
        n = min(workers, len(jobs))
        if n <= 1:
            return sequential_map(fn, jobs, progress)
        results: list[R | None] = [None] * len(jobs)
        with ProcessPoolExecutor(max_workers=n) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            done_count = 0
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in sorted(done, key=futures.__getitem__):
                    exc = fut.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        raise job_failed(exc, futures[fut], len(jobs), "process_map")
                    results[futures[fut]] = fut.result()
                    done_count += 1
                    if progress:
                        progress(done_count, len(jobs))
        return results  # type: ignore[return-value]

    mapper.__qualname__ = f"process_map({workers})"
    return mapper
