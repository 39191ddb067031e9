"""``ray_map``: a ``twin.parallel.Mapper`` that fans jobs out as Ray tasks.

Use it wherever a mapper is taken — ``placement.verify.verify_plans(..., mapper=ray_map())`` runs a
plan's twin verification over every CPU of the cluster this process is connected to::

    ray.init(...)                       # or orchestrator.control.deploy.connect(address)
    verified = verify_plans(plans, profile, mapper=ray_map(batch_size=4))

``batch_size`` jobs go into one task: a task costs about a millisecond of scheduling and
(de)serialisation, and grouping amortises it when the jobs are many and small (short twin runs).
At most ``max_in_flight`` tasks are outstanding (default: the cluster's CPUs / ``num_cpus``), so
the driver never queues thousands of tasks ahead and a failure stops the rest early. Results
come back in job order; ``progress(done_jobs, total_jobs)`` is called after each finished task.
A job's exception is re-raised in the caller (its own type, when it can be pickled) with a note
naming the job's index and the remote traceback.

Waits are bounded: a cluster with no CPU free for a task within ``free_wait_s`` (every CPU
reserved by replicas), tasks
that do not finish for ``stall_timeout_s`` and tasks that die with their worker or node make the
jobs left run in the calling process instead; ``on_fallback(reason)`` says so. A controller that
waits on twin tasks therefore never wedges.

The remote function is defined on first use, so importing this module needs no running Ray.
"""

from __future__ import annotations

import contextlib
import functools
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twin.parallel import Mapper, Progress

DEFAULT_STALL_TIMEOUT_S = 60.0  # no twin task finished for this long: run the rest here
# How long a call waits for a CPU to show free before it runs the jobs itself. Ray's view of the
# free CPUs lags the tasks that just finished (the raylet reports every ~100 ms, later on a busy
# host), so a call right after another one can read 0 free for a moment.
DEFAULT_FREE_WAIT_S = 5.0
FREE_POLL_S = 0.05

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


def _raise_failure(failure: tuple[int, Any, str], total: int, where: str, tb_label: str) -> None:
    """Re-raise a job's failure from ``_run_batch`` with a note naming the job and where it
    ran; a ``FanoutError`` when its own exception could not be brought back."""
    index, exc, tb = failure
    what = f"ray_map: raised by job {index} (of {total}) {where}; {tb_label}:\n{tb}"
    if exc is None:
        raise FanoutError(what, index)
    exc.add_note(what)
    raise exc


def _free_cpus_within(need: float, wait_s: float) -> float:
    """The cluster's free CPUs, polled for up to ``wait_s`` until ``need`` show free; no wait
    when the cluster has fewer than ``need`` CPUs in all (they can never be free)."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        free = float(ray.available_resources().get("CPU", 0.0))
        if free >= need or time.monotonic() >= deadline:
            return free
        if float(ray.cluster_resources().get("CPU", 0.0)) < need:
            return free
        time.sleep(FREE_POLL_S)


@functools.cache
def _remote_batch() -> Any:
    import ray

    return ray.remote(_run_batch)


def ray_map(
    *, batch_size: int = 1, max_in_flight: int | None = None, num_cpus: float = 1,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S, free_wait_s: float = DEFAULT_FREE_WAIT_S,
    on_fallback: Callable[[str], None] | None = None,
) -> Mapper:
    """A mapper running ``fn`` over the jobs as Ray tasks of ``batch_size`` jobs each, at most
    ``max_in_flight`` tasks outstanding (default: cluster CPUs / ``num_cpus``), each task asking
    for ``num_cpus`` CPUs. Needs ``ray.is_initialized()`` when called.

    It never waits without bound: when the cluster has no ``num_cpus`` free within
    ``free_wait_s`` (replicas reserved them all; at once when it has fewer CPUs in all), when
    no task finishes for ``stall_timeout_s`` (tasks that cannot be scheduled, a lost node) or
    when a task dies (not a job's own exception, which is raised), the jobs left run in this
    process instead, and ``on_fallback(reason)`` says why."""
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
    if not stall_timeout_s > 0:
        raise ValueError(f"stall_timeout_s: must be > 0, got {stall_timeout_s!r}")
    if not free_wait_s >= 0:
        raise ValueError(f"free_wait_s: must be >= 0, got {free_wait_s!r}")

    def mapper(
        fn: Callable[[J], R], jobs: Sequence[J], progress: Progress | None = None
    ) -> list[R]:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                "ray_map: Ray is not initialised in this process; call ray.init(...) (or "
                "orchestrator.control.cluster.connect(address)) first, or use "
                "twin.parallel.process_map"
            )
        jobs = list(jobs)
        total = len(jobs)
        if total == 0:
            return []
        results: list[Any] = [None] * total
        done = 0
        told = False

        def local(starts: Sequence[int], why: str) -> None:
            """Run the batches at ``starts`` in this process (the bounded-wait fallback); the
            first fallback of a call is reported, the rest of that call would repeat it."""
            nonlocal done, told
            if on_fallback and not told:
                on_fallback(why)
                told = True
            for s in starts:
                chunk = jobs[s:s + batch_size]
                out, failure = _run_batch(fn, s, chunk)
                if failure is not None:
                    _raise_failure(failure, total, f"run in this process ({why})", "traceback")
                results[s:s + len(chunk)] = out
                done += len(chunk)
                if progress:
                    progress(done, total)

        starts = list(range(0, total, batch_size))
        free = _free_cpus_within(num_cpus, free_wait_s) if num_cpus > 0 else 0.0
        if num_cpus > 0 and free < num_cpus:
            local(starts, f"no CPU free for twin tasks ({free:g} available after waiting up "
                          f"to {free_wait_s:g} s, each needs {num_cpus:g}): ran {total} twin "
                          "run(s) in this process")
            return results
        limit = max_in_flight
        if limit is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            limit = max(1, int(cpus / num_cpus) if num_cpus > 0 else int(cpus))
        remote = _remote_batch().options(num_cpus=num_cpus)
        fn_ref = ray.put(fn)  # shipped once, not with every task
        pending: dict[Any, int] = {}  # task ref -> index of its first job
        next_batch = 0
        try:
            while next_batch < len(starts) or pending:
                while next_batch < len(starts) and len(pending) < limit:
                    s = starts[next_batch]
                    pending[remote.remote(fn_ref, s, jobs[s:s + batch_size])] = s
                    next_batch += 1
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=stall_timeout_s)
                if not ready:  # nothing finished for a whole stall: stop waiting on the cluster
                    left = sorted(pending.values()) + starts[next_batch:]
                    next_batch = len(starts)
                    for ref in list(pending):
                        with contextlib.suppress(Exception):
                            ray.cancel(ref)
                    pending.clear()
                    local(left, f"no twin task finished within {stall_timeout_s:g} s (tasks "
                                f"not scheduled or a node lost): ran {len(left)} batch(es) in "
                                "this process")
                    break
                for ref in ready:
                    s = pending.pop(ref)
                    n = min(batch_size, total - s)
                    try:
                        out, failure = ray.get(ref)
                    except Exception as exc:  # the task itself died (worker or node lost)
                        local([s], f"the twin task running job {s} failed "
                                   f"({type(exc).__name__}); ran it in this process")
                        continue
                    if failure is not None:
                        _raise_failure(failure, total, "in a Ray task", "remote traceback")
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
