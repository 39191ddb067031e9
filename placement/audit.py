"""Plans checked on workloads nobody tuned to: a seeded generator and a twin-based checker.

The 13-workload suite never had short requests, and the default planner asked for 90 replicas
where one served (issue #17). ``audit_workloads`` draws diverse workloads from a seed (prompt
and output lengths from a few tokens to thousands, 1 to 2,000 adapters, uniform / Zipf / few-hot
rates, rank mixes of 8-64, total load from a sliver of one replica to tens of replicas' worth);
``audit_plan`` takes the plan ``lorafleet plan`` answers with the caller's context (the
default predictor in the benchmark; ``placement.choose``: verified, tightened, relaxed), notes
the predictor's plan alone (``--no-verify``) beside it, and searches the fewest replicas the
twin accepts apart from that rule (``twin_minimum``): down one replica at a time, each count
tried with the predictor's and the analytic packing (``make_plan_within``: the packing of the
workload scaled down until it needs at most k replicas, its engine configs chosen again at the
real load), each verified, until the twin accepts neither. ``benchmarks/plan_audit.py`` runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from placement.analytic import AnalyticPredictor
from placement.choose import ChoiceRule, choose_plan, signature
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from placement.planner import make_plan, make_plan_within, prepare
from twin.config import EngineConfig, smallest_valid_rank
from twin.lengths import LengthModel, sharegpt
from twin.replica import ReplicaLoad
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
    predicted_replicas: int = 0  # the predictor's plan alone (``lorafleet plan --no-verify``)
    total_s: float = 0.0  # ``lorafleet plan``'s time: the plan, twin verification, settling

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_replicas / self.twin_min

    @property
    def ratio(self) -> float:
        return self.replicas / self.twin_min

    @property
    def bound_violation(self) -> bool:
        return self.lower_bound > self.twin_min

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4),
                "predicted_ratio": round(self.predicted_ratio, 4),
                "bound_violation": self.bound_violation}


def audit_plan(workload: Workload, ctx: PlacementContext, verify: Verify,
               rule: ChoiceRule | None = None) -> AuditResult:
    """Audit one workload (module notes). The plan is ``lorafleet plan``'s answer: ``rule``
    (default: ``ctx``'s target utilisation, the shipped tightening and relaxing) applied with
    ``verify``; ``plan_s`` times the predictor's plan alone (``--no-verify``), whose replica
    count is ``predicted_replicas``. ``verify`` is ``placement.verify.verify_plans`` bound to
    its profile, window and mapper."""
    rule = rule or ChoiceRule(target_utilisations=(ctx.target_utilisation,))
    runs = 0

    def counted(plans: Sequence[Plan]) -> list[Plan]:
        nonlocal runs
        runs += len(plans)
        return verify(plans)

    t0 = time.perf_counter()
    predicted = make_plan(workload, ctx, rule.policy)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = choose_plan(workload, ctx, rule, counted)
    total_s = time.perf_counter() - t0
    starved = plan.starved_replicas()
    best = twin_minimum(workload, ctx, plan, counted, rule.policy)
    return AuditResult(
        workload=workload.name, n_adapters=len(workload.adapters),
        total_rate_rps=round(workload.total_rate_rps, 6),
        mean_prompt=round(workload.lengths.mean_prompt(), 1),
        mean_output=round(workload.lengths.mean_output(), 1), replicas=plan.replicas,
        starved=starved, twin_min=best, lower_bound=plan.lower_bound_replicas,
        plan_s=round(plan_s, 3), verify_runs=runs,
        outside_domain=int(predicted.settings.get("outside_domain_predictions", 0)),
        predicted_replicas=predicted.replicas, total_s=round(total_s, 3))


def twin_minimum(workload: Workload, ctx: PlacementContext, plan: Plan, verify: Verify,
                 policy: str = "lorafleet") -> int:
    """The fewest replicas the twin accepts, searched apart from the rule that chose ``plan``:
    from ``plan`` (or, if the twin starves it, the policy's plan at ever tighter margins until
    one is fed), down one replica at a time, each count tried with two packings — the one of
    ``ctx``'s predictor and the analytic one (``make_plan_within``) — until the twin accepts
    neither. PlacementError when no plan the twin accepts is found."""
    prepared = prepare(workload, replace(ctx, lower_bound=None, estimate=None))
    rough = prepare(workload, prepared.with_predictor(AnalyticPredictor(ctx.profile)))
    best: int | None = None if plan.starved_replicas() else plan.replicas
    u = float(plan.settings.get("target_utilisation", ctx.target_utilisation))
    while best is None and u > 0.2:  # the plan starves: tighter margins until one is fed
        u *= 0.8
        more = verify([make_plan(workload, replace(prepared, target_utilisation=u), policy)])[0]
        if more.starved_replicas() == 0:
            best = more.replicas
    if best is None:
        raise PlacementError(f"{workload.name}: no plan the twin accepts was found")
    while best > 1:
        tries: dict[tuple, Plan] = {}
        for c in (prepared, rough):
            fewer = make_plan_within(workload, c, best - 1, policy)
            if fewer is not None:
                tries.setdefault(signature(fewer), fewer)
        fed = [p.replicas for p in verify(list(tries.values())) if p.starved_replicas() == 0]
        if not fed:
            break
        best = min(fed)
    return best


def summary(results: Sequence[AuditResult]) -> dict[str, Any]:
    """The audit's summary line: how far plans are from what the twin accepts."""
    ratios = [r.ratio for r in results]
    alone = [r.predicted_ratio for r in results]
    big = [r.plan_s for r in results if r.n_adapters >= 1000]
    big_total = [r.total_s for r in results if r.n_adapters >= 1000]
    return {
        "n": len(results),
        "worst_ratio": round(max(ratios), 4) if ratios else None,
        "mean_ratio": round(float(np.mean(ratios)), 4) if ratios else None,
        "worst_predicted_ratio": round(max(alone), 4) if alone else None,
        "mean_predicted_ratio": round(float(np.mean(alone)), 4) if alone else None,
        "starved_plans": sum(1 for r in results if r.starved),
        "bound_violations": sum(1 for r in results if r.bound_violation),
        "plans_over_twin_min": sum(1 for r in results if r.replicas > r.twin_min),
        "outside_domain_plans": sum(1 for r in results if r.outside_domain),
        "max_plan_s_1000_adapters": round(max(big), 3) if big else None,
        "max_total_s_1000_adapters": round(max(big_total), 3) if big_total else None,
        "worst": [r.workload for r in sorted(results, key=lambda r: -r.ratio)[:5]],
    }
