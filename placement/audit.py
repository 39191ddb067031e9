"""Plans checked on workloads nobody tuned to: a seeded generator and a twin-based checker.

The 13-workload suite never had short requests, and the default planner asked for 90 replicas
where one served (issue #17). ``audit_workloads`` draws diverse workloads from a seed (prompt
and output lengths from a few tokens to thousands, 1 to 2,000 adapters, uniform / Zipf / few-hot
rates, rank mixes of 8-64, total load from a sliver of one replica to tens of replicas' worth);
``audit_plan`` plans one with the caller's context (the default predictor in the benchmark),
verifies the plan with full twin runs, and searches the fewest replicas the twin accepts for
it: the lorafleet packing at fewer replicas (``packing_within``: the packing of the workload
scaled down until it needs at most k replicas, its engine configs chosen again at the real
load), each verified, down until the twin starves one. ``benchmarks/plan_audit.py`` runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from placement.common import ReplicaSpec, build_plan
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from placement.planner import make_plan, prepare
from twin.config import EngineConfig
from twin.lengths import LengthModel, sharegpt
from twin.replica import ReplicaLoad
from twin.simulate import smallest_valid_rank
from twin.surrogate_features import FEATURE_NAMES, FeatureBuilder
from twin.workload import Workload, few_hot_workload, uniform_workload, zipf_workload

Verify = Callable[[Sequence[Plan]], list[Plan]]
RANK_MIXES: tuple[dict[int, float], ...] = (
    {8: 1.0}, {16: 1.0}, {64: 1.0}, {8: 0.5, 16: 0.5}, {8: 0.4, 16: 0.3, 32: 0.2, 64: 0.1},
    {8: 0.7, 64: 0.3}, {32: 0.5, 64: 0.5},
)
SHAPES: tuple[str, ...] = ("uniform", "zipf", "few_hot")
ADAPTERS: tuple[int, int] = (1, 2000)
REPLICAS_WORTH: tuple[float, float] = (0.05, 30.0)  # offered load in single-replica capacities
PROMPT: tuple[float, float] = (4.0, 3000.0)
OUTPUT: tuple[float, float] = (2.0, 1500.0)
SCALE_STEPS = 10  # bisection steps on the load scale that gives a packing of <= k replicas


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _lengths(rng: np.random.Generator, max_model_len: int) -> LengthModel:
    """Drawn lengths: ShareGPT-shaped (rescaled), lognormal or fixed, means log-uniform."""
    top = min(8192, max_model_len - 8)
    prompt = _log_uniform(rng, PROMPT[0], min(PROMPT[1], top / 2))
    output = _log_uniform(rng, OUTPUT[0], min(OUTPUT[1], top - prompt))
    kind = rng.choice(["sharegpt", "lognormal", "fixed"], p=[0.25, 0.45, 0.3])
    if kind == "sharegpt" and 10 <= prompt <= 900 and 10 <= output <= 900:
        try:
            model = sharegpt(round(prompt, 1), round(output, 1))
            model.mean_prompt()  # a target the ShareGPT filters cannot reach raises here
            return model
        except Exception:  # noqa: BLE001 - the filters' reach is only known by trying
            pass
    if kind == "fixed":
        return LengthModel(kind="fixed", prompt=max(1, round(prompt)), output=max(1, round(output)))
    cv = float(rng.uniform(0.2, 1.0))
    return LengthModel(kind="lognormal", prompt_mean=round(prompt, 1),
                       prompt_std=round(prompt * cv, 1), output_mean=round(output, 1),
                       output_std=round(output * cv, 1), max_total=int(top))


def audit_workloads(n: int, ctx: PlacementContext, seed: int = 0) -> list[Workload]:
    """``n`` seeded, diverse workloads (module notes); the same (n, seed, profile), the same
    workloads. The total rate is set as a number of single-replica capacities (the analytic
    estimate of ``twin.surrogate_features`` for one replica holding the whole mix)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    rng = np.random.default_rng([seed, 17])
    builder = FeatureBuilder(ctx.profile)
    out: list[Workload] = []
    for i in range(n):
        k = round(_log_uniform(rng, *ADAPTERS))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        ranks = RANK_MIXES[int(rng.integers(len(RANK_MIXES)))]
        lengths = _lengths(rng, ctx.max_model_len or ctx.profile.max_model_len)
        worth = _log_uniform(rng, *REPLICAS_WORTH)
        wseed = int(rng.integers(0, 2**31 - 1))
        name = f"audit-{i:03d}-{shape}-{k}"
        kw: dict[str, Any] = {"ranks": ranks, "lengths": lengths, "seed": wseed, "name": name}
        unit = _make(shape, k, 1.0, rng, kw)
        capacity = _capacity_rps(unit, ctx, builder)
        out.append(_make(shape, k, max(worth * capacity, 1e-3), rng, kw, reuse=unit))
    return out


def _make(shape: str, k: int, total: float, rng: np.random.Generator, kw: dict[str, Any],
          reuse: Workload | None = None) -> Workload:
    if reuse is not None:
        return reuse.scaled(total / reuse.total_rate_rps)
    if shape == "uniform":
        return uniform_workload(k, total, **kw)
    if shape == "zipf":
        return zipf_workload(k, total, alpha=float(rng.uniform(0.5, 1.6)), **kw)
    hot = int(rng.integers(1, min(8, k) + 1))
    return few_hot_workload(k, total, n_hot=hot, hot_share=float(rng.uniform(0.4, 0.9)), **kw)


def _capacity_rps(w: Workload, ctx: PlacementContext, builder: FeatureBuilder) -> float:
    """Analytic req/s one replica holding every adapter of ``w`` completes (slots for all, at
    most 32, within memory)."""
    load = ReplicaLoad.from_workload(w)
    slot = smallest_valid_rank(max(load.max_rank, 8))
    cap = max(1, ctx.memory_caps.get(slot, 1))
    config = EngineConfig(max_loras=max(1, min(load.n_adapters, 32, cap)),
                          max_cpu_loras=max(load.n_adapters, 1), max_lora_rank=slot,
                          max_num_seqs=ctx.max_num_seqs,
                          max_num_batched_tokens=ctx.max_num_batched_tokens)
    return float(builder([load], [config])[0, FEATURE_NAMES.index("capacity_rps")])


# ---------------------------------------------------------------------------------------------
# the checker
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    """One workload's audit line (``benchmarks/plan_audit.py`` prints it as JSON)."""

    workload: str
    n_adapters: int
    total_rate_rps: float
    mean_prompt: float
    mean_output: float
    replicas: int  # the plan's
    starved: int  # replicas the twin starves in the plan
    twin_min: int  # the fewest replicas the twin accepts (module notes)
    lower_bound: int  # what the plan printed as its lower bound
    plan_s: float
    verify_runs: int  # twin-verified plans the search took
    outside_domain: int = 0  # predictions the twin made for the surrogate (its domain)

    @property
    def ratio(self) -> float:
        return self.replicas / self.twin_min

    @property
    def bound_violation(self) -> bool:
        return self.lower_bound > self.twin_min

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4),
                "bound_violation": self.bound_violation}


def audit_plan(workload: Workload, ctx: PlacementContext, verify: Verify,
               policy: str = "lorafleet") -> AuditResult:
    """Plan ``workload`` with ``ctx``, verify it, and search the fewest replicas the twin
    accepts (module notes). ``verify`` is ``placement.verify.verify_plans`` bound to its
    profile, window and mapper."""
    t0 = time.perf_counter()
    plan = make_plan(workload, ctx, policy)
    plan_s = time.perf_counter() - t0
    checked = verify([plan])[0]
    runs = 1
    starved = checked.starved_replicas()
    best: int | None = None if starved else plan.replicas
    prepared = prepare(workload, replace(ctx, lower_bound=None, estimate=None))
    if best is None:  # the plan starves: more replicas (tighter margins) until one does not
        u = float(plan.settings.get("target_utilisation", ctx.target_utilisation))
        while best is None and u > 0.2:
            u *= 0.8
            more = verify([make_plan(workload, replace(prepared, target_utilisation=u),
                                     policy)])[0]
            runs += 1
            if more.starved_replicas() == 0:
                best = more.replicas
    if best is None:
        raise PlacementError(f"{workload.name}: no plan the twin accepts was found")
    k = best - 1
    while k >= 1:
        fewer = packing_within(workload, prepared, k, policy)
        if fewer is None:
            break
        runs += 1
        if verify([fewer])[0].starved_replicas():
            break
        best = fewer.replicas
        k = best - 1
    return AuditResult(
        workload=workload.name, n_adapters=len(workload.adapters),
        total_rate_rps=round(workload.total_rate_rps, 6),
        mean_prompt=round(workload.lengths.mean_prompt(), 1),
        mean_output=round(workload.lengths.mean_output(), 1), replicas=plan.replicas,
        starved=starved, twin_min=best, lower_bound=plan.lower_bound_replicas,
        plan_s=round(plan_s, 3), verify_runs=runs,
        outside_domain=int(plan.settings.get("outside_domain_predictions", 0)))


def packing_within(workload: Workload, ctx: PlacementContext, k: int,
                   policy: str = "lorafleet") -> Plan | None:
    """The ``policy`` packing of ``workload`` on at most ``k`` replicas: its packing of the
    workload scaled down (bisection on the scale) until it needs no more than ``k``, then each
    replica's engine config chosen again for the real load. None when even a sliver of the
    load needs more than ``k``."""
    lo, hi, found = 0.0, 1.0, None
    for _ in range(SCALE_STEPS):
        mid = (lo + hi) / 2.0
        try:
            p = make_plan(workload.scaled(mid), replace(ctx, lower_bound=None, estimate=None),
                          policy)
        except PlacementError:
            hi = mid
            continue
        if p.replicas <= k:
            lo, found = mid, p
        else:
            hi = mid
    if found is None:
        return None
    specs = [ReplicaSpec({a.id: r.weight / g.copies for a in g.adapters
                          for r in found.routing[a.id] if r.group == g.name},
                         copies=g.copies, name=g.name) for g in found.groups]
    return build_plan(workload, ctx, policy, specs)


def summary(results: Sequence[AuditResult]) -> dict[str, Any]:
    """The audit's summary line: how far plans are from what the twin accepts."""
    ratios = [r.ratio for r in results]
    big = [r.plan_s for r in results if r.n_adapters >= 1000]
    return {
        "n": len(results),
        "worst_ratio": round(max(ratios), 4) if ratios else None,
        "mean_ratio": round(float(np.mean(ratios)), 4) if ratios else None,
        "starved_plans": sum(1 for r in results if r.starved),
        "bound_violations": sum(1 for r in results if r.bound_violation),
        "plans_over_twin_min": sum(1 for r in results if r.replicas > r.twin_min),
        "outside_domain_plans": sum(1 for r in results if r.outside_domain),
        "max_plan_s_1000_adapters": round(max(big), 3) if big else None,
        "worst": [r.workload for r in sorted(results, key=lambda r: -r.ratio)[:5]],
    }
