"""The parallel mappers: sequential, process pool, Ray tasks — same results, in job order."""

from __future__ import annotations

import math
import time

import pytest

from placement.analytic import AnalyticPredictor
from placement.context import PlacementContext
from placement.planner import make_plan
from placement.verify import verify_plans
from twin.parallel import process_map, sequential_map
from twin.profile import load_profile
from twin.workload import few_hot_workload, zipf_workload


def slow_square(x: int) -> int:
    """Later jobs finish first (the pool's completion order differs from the job order)."""
    time.sleep(0.02 * (5 - x) if x < 5 else 0.0)
    return x * x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def recorder(calls: list[tuple[list[float], list[tuple[int, int]]]]):  # noqa: ANN201
    """A sequential mapper that records the jobs' rates and the progress it reported."""

    def mapper(fn, jobs, progress=None):  # noqa: ANN001, ANN202
        log: list[tuple[int, int]] = []
        out = sequential_map(fn, jobs, lambda d, t: log.append((d, t)))
        calls.append(([j[1].total_rate_rps for j in jobs], log))
        return out

    return mapper


@pytest.mark.parametrize("mapper", [sequential_map, process_map(1), process_map(2),
                                    process_map(3)], ids=["sequential", "p1", "p2", "p3"])
def test_mappers_keep_job_order_and_report_progress(mapper):
    seen: list[tuple[int, int]] = []
    jobs = list(range(8))
    assert mapper(slow_square, jobs, lambda d, t: seen.append((d, t))) == [x * x for x in jobs]
    assert seen == [(i, 8) for i in range(1, 9)]
    assert mapper(slow_square, []) == []


@pytest.mark.parametrize("mapper", [sequential_map, process_map(2)], ids=["sequential", "p2"])
def test_mapper_reraises_the_jobs_exception_naming_its_index(mapper):
    with pytest.raises(ValueError, match="three is not allowed") as info:
        mapper(fails_on_three, list(range(6)))
    assert any("job 3 (of 6)" in note for note in info.value.__notes__)


def test_process_map_rejects_bad_worker_counts():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            process_map(bad)


@pytest.fixture(scope="module")
def two_plans():
    llama = load_profile("llama-3.1-8b-instruct")
    ctx = PlacementContext.for_profile(llama, AnalyticPredictor(llama))
    plans = [make_plan(zipf_workload(150, 30.0, seed=1), ctx),
             make_plan(few_hot_workload(60, 20.0, n_hot=3, hot_share=0.6, seed=2), ctx)]
    assert sum(len(p.groups) for p in plans) >= 3
    return llama, plans


def figures(plans):  # noqa: ANN001, ANN201 - a run's own wall time differs run to run
    return [{g.name: {k: v for k, v in g.verified.items() if k != "wall_s"} for g in p.groups}
            for p in plans]


def test_verify_plans_is_the_same_with_every_mapper(two_plans):
    llama, plans = two_plans
    calls: list = []
    seq = verify_plans(plans, llama, duration_s=120.0, seed=3, mapper=recorder(calls))
    # the mapper overrides workers; jobs come heaviest first, progress counts every group
    (rates, log), = calls
    n = sum(len(p.groups) for p in plans)
    assert len(rates) == n and rates == sorted(rates, reverse=True)
    assert log == [(i, n) for i in range(1, n + 1)]
    pooled = verify_plans(plans, llama, duration_s=120.0, seed=3, mapper=process_map(2))
    default = verify_plans(plans, llama, duration_s=120.0, seed=3, workers=2)
    assert all(p.is_verified for p in seq)
    assert figures(seq) == figures(pooled) == figures(default)
    assert all(g.verified["duration_s"] == 120.0 for p in seq for g in p.groups)


def test_ray_map_needs_a_running_ray(monkeypatch):
    import ray

    from orchestrator.control.fanout import ray_map

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process without Ray
    with pytest.raises(RuntimeError, match="ray.init"):
        ray_map()(abs, [1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        ray_map(batch_size=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        ray_map(max_in_flight=0)


@pytest.mark.integration
def test_ray_map_matches_sequential_map(ray_cluster, two_plans):
    from orchestrator.control.fanout import ray_map

    ray_cluster.wait_cpus_free(4)
    fell_back: list[str] = []
    jobs = [float(x) for x in range(23)]
    want = sequential_map(math.sqrt, jobs)
    for batch_size, in_flight in ((1, None), (4, None), (5, 2), (50, 1)):
        seen: list[tuple[int, int]] = []
        got = ray_map(batch_size=batch_size, max_in_flight=in_flight, on_fallback=fell_back.append)(
            math.sqrt, jobs, lambda d, t: seen.append((d, t))  # noqa: B023
        )
        assert got == want, (batch_size, in_flight)
        dones = [d for d, _ in seen]
        assert dones == sorted(dones) and seen[-1] == (23, 23)
        assert len(seen) == math.ceil(23 / batch_size)  # once per finished task
    assert ray_map()(math.sqrt, []) == []

    llama, plans = two_plans
    seq = verify_plans(plans, llama, duration_s=120.0, seed=3, mapper=sequential_map)
    fanned = verify_plans(plans, llama, duration_s=120.0, seed=3,
                          mapper=ray_map(batch_size=2, on_fallback=fell_back.append))
    assert figures(fanned) == figures(seq)
    assert fell_back == []  # the jobs ran as Ray tasks, not in this process


@pytest.mark.integration
def test_ray_map_names_the_failing_job(ray_cluster):
    from orchestrator.control.fanout import ray_map

    ray_cluster.wait_cpus_free(1)
    jobs = [1.0, 4.0, 9.0, 16.0, 25.0, -1.0, 36.0]  # sqrt(-1): ValueError in job 5
    for batch_size in (1, 3):
        with pytest.raises(ValueError, match="math domain error") as info:
            ray_map(batch_size=batch_size)(math.sqrt, jobs)
        assert any("job 5 (of 7)" in note for note in info.value.__notes__), batch_size


@pytest.mark.integration
def test_ray_map_never_waits_without_bound(ray_cluster):
    """No CPU free for a task (replicas reserved them all), or no task finishing within the
    stall timeout: the jobs run in the calling process and the fallback says why."""
    from orchestrator.control.fanout import ray_map

    why: list[str] = []
    got = ray_map(num_cpus=1000.0, on_fallback=why.append)(math.sqrt, [4.0, 9.0])
    assert got == [2.0, 3.0] and len(why) == 1 and "no CPU free" in why[0]
    why.clear()

    def slow_double(x: float) -> float:  # a closure: shipped by value to the Ray workers
        time.sleep(x)
        return 2 * x

    ray_cluster.wait_cpus_free(1)  # else the fallback would be "no CPU free", not the stall
    got = ray_map(stall_timeout_s=0.5, on_fallback=why.append)(slow_double, [2.0, 0.0])
    assert got == [4.0, 0.0] and len(why) == 1 and "within 0.5 s" in why[0]
    with pytest.raises(ValueError, match="stall_timeout_s"):
        ray_map(stall_timeout_s=0)

@pytest.mark.integration
def test_ray_map_waits_for_cpus_that_free_up(ray_cluster):
    """CPUs held for a while (a replica stopping, tasks that just finished and Ray's view of
    them lagging) are waited for up to ``free_wait_s``, not read as "none free" at once."""
    import threading

    import ray

    from orchestrator.control.fanout import ray_map

    @ray.remote(num_cpus=4)
    class Holder:
        def ready(self) -> bool:
            return True

    ray_cluster.wait_cpus_free(4)
    holder = Holder.remote()
    ray.get(holder.ready.remote())
    why: list[str] = []
    assert ray_map(free_wait_s=0, on_fallback=why.append)(math.sqrt, [4.0]) == [2.0]
    assert len(why) == 1 and "no CPU free" in why[0]
    why.clear()
    release = threading.Timer(1.0, ray.kill, args=(holder,))
    release.start()
    try:
        got = ray_map(free_wait_s=300, on_fallback=why.append)(math.sqrt, [4.0, 9.0])
    finally:
        release.join()
    assert got == [2.0, 3.0] and why == []  # ran as Ray tasks once the holder was gone
    with pytest.raises(ValueError, match="free_wait_s"):
        ray_map(free_wait_s=-1)
