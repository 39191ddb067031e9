"""Baseline placement policies (placement/baselines/): round_robin, least_loaded, loraserve,
dlora, agullo_greedy.

Most tests use ``CapacityPredictor``: a replica completes min(offered, capacity) tokens/s with
the capacity fixed per slot rank, and requests of 200 tokens, so every expected placement and
replica count is worked out by hand from the construction (comments show the arithmetic), never
copied from the code's output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli.main import main
from placement.analytic import AnalyticPredictor
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.plan import Plan
from placement.planner import make_plan
from placement.policy import POLICIES, get_policy
from placement.replica_optimum import is_feasible
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import load_profile
from twin.replica import ReplicaLoad
from twin.workload import AdapterSpec, Workload, zipf_workload

ROOT = Path(__file__).resolve().parent.parent
SMALL = str(ROOT / "examples" / "workload_small.yaml")
LLAMA = "llama-3.1-8b-instruct"
FIXED = LengthModel(kind="fixed", prompt=100, output=100)  # 200 tokens per request
TOKENS = 200.0
BASELINES = ("round_robin", "least_loaded", "loraserve", "dlora", "agullo_greedy")
NO_SPLIT = ("round_robin", "least_loaded", "agullo_greedy")  # never split an adapter themselves
SUMMARY_KEYS = {"replicas", "starved_replicas", "verified_total_throughput_tps",
                "offered_total_tps", "ttft_p99_ms", "plan_wall_s"}


@pytest.fixture(scope="module")
def llama():
    return load_profile(LLAMA)


@dataclass(frozen=True)
class CapacityPredictor:
    """A replica serves ``capacity(max_lora_rank)`` tokens/s whatever its adapters."""

    capacity: Callable[[int], float]
    name: str = "capacity"

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        out = []
        for load, cfg in zip(loads, configs, strict=True):
            offered = load.offered_tokens_per_s()
            served = min(offered, self.capacity(cfg.max_lora_rank))
            out.append({
                "total_throughput_tps": served, "offered_total_tps": offered,
                "ttft_p50_ms": 50.0, "ttft_p99_ms": 100.0, "itl_p50_ms": 20.0,
                "itl_p99_ms": 40.0, "starved": served < 0.9 * offered,
            })
        return out


def flat(x: float) -> CapacityPredictor:
    return CapacityPredictor(lambda rank: x)


# a rank-64 replica serves a quarter of what a rank-8 one does
RANK_COST = CapacityPredictor(lambda rank: 1000.0 if rank <= 8 else 250.0)


def ctx_for(profile, predictor, **kw) -> PlacementContext:
    """Feasible exactly when offered <= capacity (min_served_fraction 1)."""
    kw.setdefault("min_served_fraction", 1.0)
    kw.setdefault("headroom_tolerance", 0.002)
    return PlacementContext.for_profile(profile, predictor, **kw)


def workload(adapters: list[tuple[str, int, float]], name: str = "w") -> Workload:
    """Adapters as (id, rank, offered tokens/s)."""
    return Workload(name=name, lengths=FIXED,
                    adapters=tuple(AdapterSpec(i, r, tps / TOKENS) for i, r, tps in adapters))


def offered(group) -> float:
    return group.total_rate_rps * TOKENS


def adapter_tps(group, adapter: str) -> float:
    return next(a.rate_rps for a in group.adapters if a.id == adapter) * TOKENS


def replicas_serving(plan: Plan, adapter: str) -> int:
    return sum(plan.group(r.group).copies for r in plan.routing[adapter])


def check_complete(plan: Plan, w: Workload) -> None:
    """Every adapter routed with weights summing to 1, its whole rate served exactly once."""
    assert set(plan.routing) == {a.id for a in w.adapters}
    for a in w.adapters:
        routes = plan.routing[a.id]
        assert sum(r.weight for r in routes) == pytest.approx(1.0, abs=1e-9)
        served = sum(plan.group(r.group).copies
                     * next(x.rate_rps for x in plan.group(r.group).adapters if x.id == a.id)
                     for r in routes)
        assert served == pytest.approx(a.rate_rps, rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- all baselines


def test_baselines_are_registered():
    for name in BASELINES:
        assert name in POLICIES
        assert get_policy(name).name == name


@pytest.mark.parametrize("policy", BASELINES)
@pytest.mark.parametrize("seed", [0, 1])
def test_plans_are_complete_feasible_and_not_below_the_bound(llama, policy, seed):
    rng = np.random.default_rng(seed)
    n = 30
    tps = np.minimum((rng.pareto(1.2, n) + 0.1) * 60.0, 240.0)  # skewed, each fits a replica
    tps[0] = 2_600.0  # hotter than any replica: split or replicated, never starved
    ranks = rng.choice([8, 16, 64], n)
    w = workload([(f"a{i:02d}", int(ranks[i]), float(tps[i])) for i in range(n)])
    plan = make_plan(w, ctx_for(llama, RANK_COST), policy)
    check_complete(plan, w)
    assert plan.policy == policy
    assert plan.starved_replicas("predicted") == 0
    assert plan.replicas >= plan.lower_bound_replicas
    for g in plan.groups:  # feasible by construction: offered within the slot rank's capacity
        assert offered(g) <= RANK_COST.capacity(g.engine.max_lora_rank) * (1 + 1e-6)
        assert g.engine.max_lora_rank >= max(a.rank for a in g.adapters)
    assert replicas_serving(plan, "a00") >= math.ceil(2_600.0 / 1000.0)


@pytest.mark.parametrize("policy", BASELINES)
def test_plans_are_deterministic(llama, policy):
    w = workload([(f"a{i}", 8 if i % 3 else 32, 100.0 + 37.0 * (i % 5)) for i in range(15)])
    ctx = ctx_for(llama, RANK_COST)
    one, two = (get_policy(policy).place(w, ctx) for _ in range(2))
    assert one.routing == two.routing
    assert [(g.name, g.adapters, g.engine) for g in one.groups] == [
        (g.name, g.adapters, g.engine) for g in two.groups]


@pytest.mark.parametrize("policy", BASELINES)
def test_analytic_plans_fit_memory_and_are_not_predicted_starved(llama, policy):
    w = zipf_workload(120, 15.0, ranks={8: 0.4, 16: 0.3, 32: 0.2, 64: 0.1})
    ctx = PlacementContext.for_profile(llama, AnalyticPredictor(llama))
    plan = make_plan(w, ctx, policy)
    assert plan.starved_replicas("predicted") == 0
    assert plan.replicas >= plan.lower_bound_replicas
    for g in plan.groups:
        assert is_feasible(g.predicted, ctx)
        assert llama.check_feasible(g.engine) >= llama.max_model_len  # KV holds one request
        assert g.engine.max_lora_rank >= max(a.rank for a in g.adapters)


@pytest.mark.parametrize("policy", BASELINES)
def test_gpu_budget_error_says_what_fits(llama, policy):
    w = workload([(f"a{i:02d}", 8, 100.0) for i in range(12)])  # 1,200 tok/s
    ctx = ctx_for(llama, flat(400.0), gpu_budget=2)  # at least 3 replicas of 400 tok/s
    for run in (lambda: make_plan(w, ctx, policy), lambda: get_policy(policy).place(w, ctx)):
        with pytest.raises(PlacementError) as err:
            run()
        msg = str(err.value)
        assert "What fits in 2" in msg and policy in msg
        pct = float(re.search(r"about (\d+) %", msg).group(1))
        assert pct <= 100.0 * 800.0 / 1200.0 + 2.0  # two replicas carry at most 800 tok/s


@pytest.mark.parametrize("policy", NO_SPLIT)
def test_adapter_hotter_than_a_replica_gets_identical_copies(llama, policy):
    # 2,500 tok/s on replicas of 1,000: ceil(2.5) = 3 copies of 833 tok/s each
    w = workload([("org/hot one", 8, 2_500.0)] + [(f"c{i}", 8, 100.0) for i in range(4)])
    plan = make_plan(w, ctx_for(llama, flat(1000.0)), policy)
    (route,) = plan.routing["org/hot one"]
    group = plan.group(route.group)
    assert group.copies == 3 and [a.id for a in group.adapters] == ["org/hot one"]
    assert adapter_tps(group, "org/hot one") == pytest.approx(2_500.0 / 3)
    assert route.weight == pytest.approx(1.0)
    assert plan.starved_replicas("predicted") == 0
    assert Plan.from_dict(plan.to_dict()) == plan  # a valid group name for any adapter id


# ----------------------------------------------------------------------------- round_robin


def dealt_sums(tps: list[float], k: int) -> list[float]:
    return [sum(tps[b::k]) for b in range(k)]


@pytest.mark.parametrize("tps", [
    [300, 250, 200, 150, 100, 300, 250, 200, 150, 100],  # 2 replicas of exactly 1,000 each
    [400, 100, 400, 100, 400, 100],  # 1,500 tok/s, yet dealing needs 3: 2 would put 1,200 on one
])
def test_round_robin_deals_in_order_on_the_fewest_replicas(llama, tps):
    ids = [f"a{i}" for i in range(len(tps))]
    w = workload([(i, 8, float(t)) for i, t in zip(ids, tps, strict=True)])
    plan = make_plan(w, ctx_for(llama, flat(1000.0)), "round_robin")
    k = plan.replicas
    assert k == next(k for k in range(1, len(tps) + 1) if max(dealt_sums(tps, k)) <= 1000.0)
    assert [[a.id for a in g.adapters] for g in plan.groups] == [ids[b::k] for b in range(k)]
    assert plan.starved_replicas("predicted") == 0


# ----------------------------------------------------------------------------- least_loaded


def test_least_loaded_balances_offered_load(llama):
    tps = [430, 410, 380, 290, 260, 220, 190, 150, 120, 90, 60, 40, 30, 20, 10]  # 2,700 tok/s
    w = workload([(f"a{i:02d}", 8, float(t)) for i, t in enumerate(tps)])
    plan = make_plan(w, ctx_for(llama, flat(1000.0)), "least_loaded")
    loads = [offered(g) for g in plan.groups]
    assert plan.replicas >= math.ceil(sum(tps) / 1000.0)
    assert all(x <= 1000.0 + 1e-6 for x in loads)
    # greedy to the least loaded: when the heaviest replica got its last adapter it was the
    # lightest, so max - min <= the largest adapter
    assert max(loads) - min(loads) <= max(tps) + 1e-6
    check_complete(plan, w)


# ----------------------------------------------------------------------------- loraserve


def test_loraserve_keeps_ranks_apart_and_splits_an_adapter_beyond_its_operating_point(llama):
    # rank 8: "big" 2,500 + 5 x 100 = 3,000 tok/s at 1,000 per replica (operating point 1,000);
    # rank 64: 2 x 100 = 200 tok/s at 250 per replica. With 4 servers (target utilisation
    # 3.8 / 4) the budgets are 3 + 1 and rank 8 spills onto the rank-64 server (350 > 250);
    # with 5 they are 4 + 1 and every server holds one rank.
    w = workload([("big", 8, 2_500.0)] + [(f"s{i}", 8, 100.0) for i in range(5)]
                 + [("w0", 64, 100.0), ("w1", 64, 100.0)])
    plan = make_plan(w, ctx_for(llama, RANK_COST), "loraserve")
    check_complete(plan, w)
    assert plan.starved_replicas("predicted") == 0
    assert plan.replicas == 5
    for g in plan.groups:
        assert len({8 if a.rank <= 8 else 64 for a in g.adapters}) == 1  # one rank per server
    big = plan.routing["big"]
    assert len(big) >= 3  # 2,500 tok/s over servers of at most 1,000
    for r in big:
        assert adapter_tps(plan.group(r.group), "big") <= 1000.0 * 1.01
        assert r.weight == pytest.approx(adapter_tps(plan.group(r.group), "big") / 2_500.0)


# ----------------------------------------------------------------------------- dlora


@pytest.mark.parametrize(("hot", "expected"), [
    # 600 + 10 x 100 = 1,600 tok/s on 2 replicas of 1,000: dealt by count the hot one's replica
    # is full (1,000) and the other at 600; a copy of the hot adapter evens them at 800
    (600.0, 2),
    # 1,500 + 4 x 100: the hot adapter alone overloads a replica; with a copy 950 + 950
    (1_500.0, 2),
])
def test_dlora_replicates_the_hottest_adapter_onto_spare_capacity(llama, hot, expected):
    n_cold = 10 if hot < 1000 else 4
    w = workload([("hot", 8, hot)] + [(f"c{i}", 8, 100.0) for i in range(n_cold)])
    plan = make_plan(w, ctx_for(llama, flat(1000.0)), "dlora")
    check_complete(plan, w)
    assert plan.replicas == expected
    assert replicas_serving(plan, "hot") == 2
    assert plan.starved_replicas("predicted") == 0
    loads = [offered(g) for g in plan.groups]
    assert max(loads) - min(loads) <= 0.05 * sum(loads)  # dispatch balanced the two


@dataclass(frozen=True)
class PoisonPredictor:
    """``flat(1000)``, except that a replica holding adapter "poison" (with another adapter,
    if ``shared``) is starved at any load: one the predictor finds infeasible whatever is done
    (headroom 0)."""

    shared: bool = False
    name: str = "poison"

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        out = flat(1000.0).predict(loads, configs)
        for load, pred in zip(loads, out, strict=True):
            if "poison" in load.adapter_ids and (not self.shared or load.n_adapters > 1):
                pred["starved"] = True
        return out


def test_dlora_replicates_a_hot_adapter_while_another_replica_stays_infeasible(llama):
    # a replica stuck at headroom 0 must not block every copy: the minimum headroom cannot
    # rise, but the hot adapter's replica (1,500 tok/s on 1,000) can, by a copy
    from placement.baselines.dlora import ROUND_TOLERANCE, replicate
    from placement.common import WorkloadIndex

    # dealt hottest first onto the emptiest replica: {hot, c3}, {poison, c2}, {c0, c1}
    w = workload([("hot", 8, 1_500.0), ("poison", 8, 60.0)]
                 + [(f"c{i}", 8, 50.0) for i in range(4)])
    ctx = ctx_for(llama, PoisonPredictor(), headroom_tolerance=ROUND_TOLERANCE)
    index = WorkloadIndex(w)
    pl = replicate(index, ctx, 3)
    hot, poison = index.ids.index("hot"), index.ids.index("poison")
    assert set(pl.replica[pl.adapter == hot].tolist()).isdisjoint(
        pl.replica[pl.adapter == poison].tolist())
    assert int((pl.adapter == hot).sum()) >= 2


def test_dlora_keeps_a_round_by_leximin_headroom():
    from placement.baselines.dlora import leximin_better

    inf = math.inf
    assert leximin_better(np.array([0.0, 0.9, 2.0]), np.array([0.0, 0.5, 2.0]))
    assert leximin_better(np.array([1.2, 1.1]), np.array([1.0, 3.0]))  # the minimum rose
    assert not leximin_better(np.array([0.9, 3.0]), np.array([1.0, 1.1]))  # the minimum fell
    assert not leximin_better(np.array([1.0, 1.0005]), np.array([1.0, 1.0]))  # within 0.2 %
    assert not leximin_better(np.array([0.0, inf]), np.array([0.0, inf]))
    assert leximin_better(np.array([0.5, inf]), np.array([0.5, 2.0]))  # an emptied replica


@pytest.mark.parametrize("policy", ["round_robin", "least_loaded", "dlora"])
def test_count_search_stops_at_a_multiple_of_the_bound(llama, policy):
    # no count up to 8 x the bound is feasible (60 adapters on <= 8 replicas: "poison" always
    # shares one, which starves): the plan is reported there with its starved replica, rather
    # than searched on to one replica per adapter
    from dataclasses import replace

    from placement.baselines._shared import MAX_OVER_BOUND
    from placement.capacity_estimate import CapacityEstimate

    w = workload([("poison", 8, 10.0)] + [(f"c{i}", 8, 100.0) for i in range(59)])
    ctx = replace(ctx_for(llama, PoisonPredictor(shared=True)),
                  estimate=CapacityEstimate(replicas=1, fractional=0.6, offered_tps=5_910.0,
                                            classes=()))
    plan = get_policy(policy).place(w, ctx)
    check_complete(plan, w)
    assert plan.replicas == MAX_OVER_BOUND
    assert plan.starved_replicas("predicted") >= 1


# ----------------------------------------------------------------------------- agullo_greedy


def test_agullo_greedy_fills_one_replica_at_a_time_in_zigzag_order(llama):
    tps = {"a0": 500, "a1": 50, "a2": 400, "a3": 100, "a4": 300, "a5": 150, "a6": 200,
           "a7": 250, "a8": 350, "a9": 450}
    w = workload([(i, 8, float(t)) for i, t in tps.items()])
    plan = make_plan(w, ctx_for(llama, flat(1000.0)), "agullo_greedy")
    # zig-zag: 500, 50, 450, 100, 400, 150, 350, 200, 300, 250; a replica closes at the first
    # adapter that would take it past 1,000 tok/s
    assert [[a.id for a in g.adapters] for g in plan.groups] == [
        ["a0", "a1", "a9"],  # 500 + 50 + 450 = 1,000; + 100 starves
        ["a3", "a2", "a5", "a8"],  # 100 + 400 + 150 + 350 = 1,000; + 200 starves
        ["a6", "a4", "a7"],  # 200 + 300 + 250
    ]
    assert plan.starved_replicas("predicted") == 0


def test_agullo_greedy_takes_the_highest_rank_group_first(llama):
    # rank 64 first: w0 + w1 = 200 <= 250; adding a rank-8 adapter makes the replica a rank-64
    # one offered 500 > 250, so it closes; the rank-8 adapters share the next (900 <= 1,000)
    w = workload([("s0", 8, 300.0), ("w0", 64, 100.0), ("s1", 8, 300.0), ("w1", 64, 100.0),
                  ("s2", 8, 300.0)])
    plan = make_plan(w, ctx_for(llama, RANK_COST), "agullo_greedy")
    assert [sorted(a.id for a in g.adapters) for g in plan.groups] == [
        ["w0", "w1"], ["s0", "s1", "s2"]]
    assert [g.engine.max_lora_rank for g in plan.groups] == [64, 8]


# ----------------------------------------------------------------------------- CLI


def test_cli_compare_lists_every_policy_with_the_documented_keys(capsys, monkeypatch):
    from rich.console import Console

    import orchestrator.cli.output as cli

    monkeypatch.setattr(cli, "console", Console(width=200))
    code = main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic", "--compare",
                 "--json", "--verify-duration", "120", "--workers", "1"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) == {"lower_bound_replicas", "capacity_estimate_replicas", "policies"}
    assert set(obj["policies"]) == set(POLICIES) >= set(BASELINES)
    for summary in obj["policies"].values():
        assert set(summary) == SUMMARY_KEYS
        assert summary["replicas"] >= obj["lower_bound_replicas"]
        assert summary["verified_total_throughput_tps"] > 0  # every plan twin-verified
