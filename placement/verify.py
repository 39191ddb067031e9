"""Verify a plan with full twin runs: every replica group, one hour, in parallel processes.

Placement decides with a fast predictor; the twin is the ground truth. Each group's replica
(copies are identical, so one run stands for all of them) is simulated for ``duration_s`` with
Poisson arrivals at the rates the plan sends it, and its measured figures are stored next to the
predicted ones (``ReplicaGroup.verified``). Runs fan out, heaviest first so the pool stays busy,
over at most ``MAX_WORKERS`` processes (the machines this runs on have two cores) or over any
``twin.parallel.Mapper`` the caller passes (``orchestrator.control.fanout.ray_map`` for a Ray
cluster).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from placement.errors import PlacementError
from placement.plan import Plan, ReplicaGroup, profile_sha256
from twin.config import EngineConfig
from twin.parallel import Mapper, Progress, process_map
from twin.profile import Profile
from twin.replica import ReplicaLoad, TwinPredictor

VERIFY_DURATION_S = 3600.0
MAX_WORKERS = 2


def group_load(plan: Plan, group: ReplicaGroup) -> ReplicaLoad:
    """The traffic one replica of ``group`` receives, as the twin will run it."""
    return ReplicaLoad(
        adapter_ids=group.adapter_ids,
        ranks=np.array([a.rank for a in group.adapters], dtype=np.int64),
        rates_rps=np.array([a.rate_rps for a in group.adapters], dtype=np.float64),
        lengths=plan.workload.length_model(),
    )


def _run(job: tuple[Profile, ReplicaLoad, EngineConfig, float, int]) -> dict[str, Any]:
    profile, load, engine, duration_s, seed = job
    t0 = time.perf_counter()
    metrics = TwinPredictor(profile, duration_s=duration_s, seed=seed).predict_one(
        load, engine, means=True)
    metrics.update(
        {"duration_s": duration_s, "seed": seed, "wall_s": round(time.perf_counter() - t0, 3)}
    )
    return metrics


def verify_plans(
    plans: Sequence[Plan],
    profile: Profile,
    *,
    duration_s: float = VERIFY_DURATION_S,
    seed: int = 0,
    workers: int = MAX_WORKERS,
    progress: Progress | None = None,
    mapper: Mapper | None = None,
) -> list[Plan]:
    """Each plan with ``verified`` figures on every group (all plans' runs share one pool).

    The runs go through ``mapper`` when given (it overrides ``workers``), else through a pool of
    ``min(workers, MAX_WORKERS)`` processes; either way heaviest first and ``progress(done,
    total)`` as they finish. Each run is a pure function of its inputs and ``seed``, so every
    mapper gives the same figures.
    """
    if duration_s <= 0:
        raise PlacementError(f"verify duration: must be > 0 s, got {duration_s}")
    sha = profile_sha256(profile)
    for plan in plans:
        if plan.profile.sha256 != sha:
            raise PlacementError(
                f"plan ({plan.policy}, {plan.workload.name}) was made with profile "
                f"{plan.profile.name} sha256 {plan.profile.sha256[:12]}..., not with "
                f"{profile.name} sha256 {sha[:12]}...; verify it with the profile it was made with"
            )
    keys: list[tuple[int, str]] = []
    jobs = []
    for p, plan in enumerate(plans):
        for g in plan.groups:
            keys.append((p, g.name))
            jobs.append((profile, group_load(plan, g), g.engine, float(duration_s), int(seed)))
    order = np.argsort([-j[1].total_rate_rps for j in jobs], kind="stable")
    if mapper is None:
        mapper = process_map(max(1, min(int(workers), MAX_WORKERS)))
    ran = mapper(_run, [jobs[i] for i in order], progress)
    results: dict[tuple[int, str], dict[str, Any]] = {
        keys[i]: m for i, m in zip(order, ran, strict=True)
    }
    return [
        plan.with_verified({name: m for (p2, name), m in results.items() if p2 == p})
        for p, plan in enumerate(plans)
    ]


def verify_plan(plan: Plan, profile: Profile, **kwargs: Any) -> Plan:
    """``verify_plans`` for one plan."""
    return verify_plans([plan], profile, **kwargs)[0]
