"""``ray_map``: a ``twin.parallel.Mapper`` that fans jobs out as Ray tasks.

Use it wherever a mapper is taken — ``placement.verify.verify_plans(..., mapper=ray_map())`` runs a
plan's twin verification over every CPU of the cluster this process is connected to::

    ray.init(...)                       # or orchestrator.deploy.connect(address)
    verified = verify_plans(plans, profile, mapper=ray_map(batch_size=4))

``batch_size`` jobs go into one task: a task costs about a millisecond of scheduling and
(de)serialisation, and grouping amortises it when the jobs are many and small (short twin runs).
At most ``max_in_flight`` tasks are outstanding (default: the cluster's CPUs / ``num_cpus``), so
the driver never queues thousands of tasks ahead and a failure stops the rest early. Results
come back in job order; ``progress(done_jobs, total_jobs)`` is called after each finished task.
A job's exception is re-raised in the caller (its own type, when it can be pickled) with a note
naming the job's index and the remote traceback.

The remote function is defined on first use, so importing this module needs no running Ray.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twin.parallel import Mapper, Progress

J = TypeVar("J")
R = TypeVar("R")


class FanoutError(RuntimeError):
    """A job or task of ``ray_map`` failed and its own exception could not be brought back."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def _run_batch(fn: Callable[[Any], Any], start: int, batch: list[Any]) -> tuple[list[Any], Any]:
    """Runs in a Ray worker: ``fn`` over ``batch`` (jobs ``start``, ``start + 1``, ...).

    Returns ``(results, None)``, or ``(results so far, (index, exception | None, traceback))``
    for the first job that raised (the exception only if it survives pickling).
    """
    out = []
    for k, job in enumerate(batch):
        try:
            out.append(fn(job))
        except Exception as exc:
            from ray import cloudpickle

            tb = traceback.format_exc()
            try:
                cloudpickle.dumps(exc)
            except Exception:
                exc = None  # type: ignore[assignment]
            return out, (start + k, exc, tb)
    return out, None


@functools.cache
def _remote_batch() -> Any:
    import ray

    return ray.remote(_run_batch)


def ray_map(
    *, batch_size: int = 1, max_in_flight: int | None = None, num_cpus: float = 1
) -> Mapper:
    """A mapper running ``fn`` over the jobs as Ray tasks of ``batch_size`` jobs each, at most
    ``max_in_flight`` tasks outstanding (default: cluster CPUs / ``num_cpus``), each task asking
    for ``num_cpus`` CPUs. Needs ``ray.is_initialized()`` when called."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ValueError(
            f"max_in_flight: must be a positive integer or None, got {max_in_flight!r}"
        )
    if not num_cpus >= 0:
        raise ValueError(f"num_cpus: must be >= 0, got {num_cpus!r}")

    def mapper(
        fn: Callable[[J], R], jobs: Sequence[J], progress: Progress | None = None
    ) -> list[R]:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "ray_map: Ray is not initialised in this process; call ray.init(...) (or "
                "orchestrator.deploy.connect(address)) first, or use twin.parallel.process_map"
            )
        jobs = list(jobs)
        total = len(jobs)
        if total == 0:
            return []
        limit = max_in_flight
        if limit is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            limit = max(1, int(cpus / num_cpus) if num_cpus > 0 else int(cpus))
        remote = _remote_batch().options(num_cpus=num_cpus)
        fn_ref = ray.put(fn)  # shipped once, not with every task
        starts = list(range(0, total, batch_size))
        results: list[Any] = [None] * total
        pending: dict[Any, int] = {}  # task ref -> index of its first job
        next_batch = 0
        done = 0
        try:
            while next_batch < len(starts) or pending:
                while next_batch < len(starts) and len(pending) < limit:
                    s = starts[next_batch]
                    pending[remote.remote(fn_ref, s, jobs[s:s + batch_size])] = s
                    next_batch += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    s = pending.pop(ref)
                    n = min(batch_size, total - s)
                    try:
                        out, failure = ray.get(ref)
                    except Exception as exc:  # the task itself failed (worker died, ...)
                        last = f"-{s + n - 1}" if n > 1 else ""
                        raise FanoutError(
                            f"ray_map: the task running job {s}{last} (of {total}) failed: "
                            f"{type(exc).__name__}: {exc}", s
                        ) from exc
                    if failure is not None:
                        index, exc, tb = failure
                        where = f"ray_map: raised by job {index} (of {total}) in a Ray task"
                        if exc is None:
                            raise FanoutError(f"{where}; remote traceback:\n{tb}", index)
                        exc.add_note(f"{where}; remote traceback:\n{tb}")
                        raise exc
                    results[s:s + n] = out
                    done += n
                    if progress:
                        progress(done, total)
        finally:
            for ref in pending:  # only left over when a job failed or the caller was interrupted
                with contextlib.suppress(Exception):  # best effort: it may have just finished
                    ray.cancel(ref)
        return results

    mapper.__qualname__ = (
        f"ray_map(batch_size={batch_size}, max_in_flight={max_in_flight}, num_cpus={num_cpus})"
    )
    return mapper
