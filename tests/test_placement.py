"""Placement: per-replica optimum, lower bound, packing, hot-adapter splits, budget and rank errors,
predictors and the `lorafleet plan` CLI.

Most tests use ``CapacityPredictor``: a replica completes min(offered, capacity) tokens/s, with
the capacity fixed per slot rank (and optionally peaked in max_loras), so every expected outcome
follows from the construction, not from the code's own output.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from orchestrator.cli.main import main
from placement.analytic import AnalyticPredictor
from placement.capacity_estimate import estimate_capacity, nested_cover
from placement.common import WorkloadIndex, lpt_assign, lpt_assign_counted
from placement.compare import compare
from placement.context import PlacementContext
from placement.errors import PlacementError
from placement.packing import _pack, _replicas
from placement.plan import Plan
from placement.planner import make_plan, prepare
from placement.policy import POLICIES, get_policy
from placement.predictors import make_predictor
from placement.replica_optimum import (
    _STAGED_FROM,
    _candidate_configs,
    is_feasible,
    loads_feasible,
    memory_cap,
    optimise,
    replica_optimum,
)
from placement.verify import verify_plan, verify_plans
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import load_profile
from twin.replica import PREDICTED_METRICS, ReplicaLoad, TwinPredictor
from twin.workload import AdapterSpec, Workload, uniform_workload, zipf_workload

ROOT = Path(__file__).resolve().parent.parent
SMALL = str(ROOT / "examples" / "workload_small.yaml")
LLAMA = "llama-3.1-8b-instruct"
FIXED = LengthModel(kind="fixed", prompt=100, output=100)  # 200 tokens per request


@pytest.fixture(scope="module")
def llama():
    return load_profile(LLAMA)


@dataclass(frozen=True)
class CapacityPredictor:
    """A replica serves ``capacity(max_lora_rank, max_loras, n_adapters)`` tokens/s."""

    capacity: Callable[[int, int, int], float]
    name: str = "capacity"

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        out = []
        for load, cfg in zip(loads, configs, strict=True):
            cap = self.capacity(cfg.max_lora_rank, cfg.max_loras, load.n_adapters)
            offered = load.offered_tokens_per_s()
            served = min(offered, cap)
            out.append({
                "total_throughput_tps": served, "offered_total_tps": offered,
                "ttft_p50_ms": 50.0, "ttft_p99_ms": 100.0, "itl_p50_ms": 20.0,
                "itl_p99_ms": 40.0, "starved": served < 0.9 * offered,
            })
        return out


def flat(x: float) -> CapacityPredictor:
    return CapacityPredictor(lambda rank, g, n: x)


def ctx_for(profile, predictor, **kw) -> PlacementContext:
    """Feasible exactly when offered <= capacity (min_served_fraction 1)."""
    kw.setdefault("min_served_fraction", 1.0)
    kw.setdefault("headroom_tolerance", 0.002)
    return PlacementContext.for_profile(profile, predictor, **kw)


def workload(adapters: list[tuple[str, int, float]], name: str = "w") -> Workload:
    return Workload(
        name=name, adapters=tuple(AdapterSpec(i, r, q) for i, r, q in adapters), lengths=FIXED
    )


def replicas_serving(plan: Plan, adapter: str) -> int:
    return sum(plan.group(r.group).copies for r in plan.routing[adapter])


def per_replica_offered(plan: Plan) -> list[float]:
    return [g.total_rate_rps * 200.0 for g in plan.groups]


# ----------------------------------------------------------------------------- optimum


def test_optimum_picks_the_max_loras_with_the_most_capacity(llama):
    # capacity peaks at max_loras=8 (slot pressure below, slot costs above)
    peaked = CapacityPredictor(lambda r, g, n: 1000.0 * (1.0 - 0.1 * abs(math.log2(g / 8))))
    w = workload([(f"a{i}", 8, 0.5) for i in range(20)])  # 2,000 tok/s
    load = ReplicaLoad.from_workload(w.scaled(0.4))  # 800 tok/s: feasible for g in 2..20
    opt = replica_optimum(load, ctx_for(llama, peaked))
    assert opt.feasible
    assert opt.engine.max_loras == 8
    assert opt.headroom == pytest.approx(1000.0 / 800.0, rel=0.01)


def test_optimum_ties_go_to_the_fewest_slots(llama):
    load = ReplicaLoad.from_workload(workload([(f"a{i}", 16, 0.2) for i in range(12)]))
    opt = replica_optimum(load, ctx_for(llama, flat(10_000.0)))
    assert opt.engine.max_loras == 1
    assert opt.engine.max_cpu_loras == 12  # every adapter resident on CPU
    assert opt.engine.max_lora_rank == 16


def test_optimum_respects_memory_and_reports_infeasible(llama):
    # rank 64 on the H100 Llama profile: KV holds one 131k request only up to ~61 slots
    cap = memory_cap(ctx_for(llama, flat(1.0)), 64)
    assert 1 <= cap < 100
    more_is_better = CapacityPredictor(lambda r, g, n: 100.0 * g)
    load = ReplicaLoad.from_workload(workload([(f"a{i}", 64, 0.01) for i in range(100)]))
    opt = replica_optimum(load, ctx_for(llama, more_is_better))
    assert opt.engine.max_loras == cap
    assert llama.check_feasible(opt.engine) >= llama.max_model_len
    hot = ReplicaLoad.from_workload(workload([("x", 8, 100.0)]))  # 20,000 tok/s
    bad = replica_optimum(hot, ctx_for(llama, flat(1_000.0)))
    assert not bad.feasible and bad.headroom < 1.0


def test_feasibility_rule(llama):
    ctx = PlacementContext.for_profile(llama, flat(1.0))  # default: 99 % must be served
    base = {k: 0.0 for k in PREDICTED_METRICS}
    assert is_feasible({**base, "total_throughput_tps": 99.5, "offered_total_tps": 100.0}, ctx)
    assert not is_feasible({**base, "total_throughput_tps": 98.0, "offered_total_tps": 100.0}, ctx)
    assert not is_feasible(
        {**base, "total_throughput_tps": 100.0, "offered_total_tps": 100.0, "starved": True}, ctx
    )


def test_target_utilisation_keeps_a_margin(llama):
    load = ReplicaLoad.from_workload(workload([("a", 8, 4.5)]))  # 900 tok/s
    assert optimise([load], ctx_for(llama, flat(1000.0)))[0].feasible
    assert not optimise([load], ctx_for(llama, flat(1000.0), target_utilisation=0.8))[0].feasible


# ----------------------------------------------------------------------------- capacity estimate


def test_estimate_is_offered_over_capacity(llama):
    w = uniform_workload(30, 30.0, ranks=[8], lengths=FIXED)  # 6,000 tok/s
    for x, expected in ((1000.0, 6), (2500.0, 3), (7000.0, 1)):
        assert estimate_capacity(w, ctx_for(llama, flat(x))).replicas == expected


def test_estimate_adds_rank_classes(llama):
    rank_cost = CapacityPredictor(lambda r, g, n: 1000.0 if r <= 8 else 250.0)
    w = workload([(f"s{i}", 8, 1.0) for i in range(10)]  # 2,000 tok/s at rank 8: 2 replicas
                 + [(f"b{i}", 64, 0.25) for i in range(5)])  # 250 tok/s at rank 64: 1
    bound = estimate_capacity(w, ctx_for(llama, rank_cost))
    assert bound.replicas == 3
    assert {c.max_lora_rank for c in bound.classes} == {8, 64}


def test_estimate_tries_every_max_loras_the_optimum_may_choose(llama):
    # only 6 slots serve well, and only with 10 adapters or more: one replica of all 40 does
    # (6 is on the optimum's grid, not a power of two; the bound must see what a plan can use)
    odd = CapacityPredictor(lambda r, g, n: 1000.0 if g == 6 and n >= 10 else 100.0)
    w = workload([(f"a{i:02d}", 8, 0.1) for i in range(40)])  # 800 tok/s
    ctx = ctx_for(llama, odd)
    plan = make_plan(w, ctx)
    assert plan.replicas == 1 and plan.groups[0].engine.max_loras == 6
    assert estimate_capacity(w, ctx).replicas == 1


def test_nested_cover_keeps_high_rank_replicas_high_rank():
    # 100 rank-64 adapters at 65 per replica, 400 rank-8 at 164: the sum 1.54 + 2.44 rounds
    # to 4, but 2 rank-64 replicas leave room for only 30 rank-8 adapters: 2 + 3
    assert nested_cover([(64, 100, 65.0), (8, 400, 164.0)]) == 5
    # a surplus of roomy high-rank replicas can spare lower ones (slack)
    assert nested_cover([(64, 10, 100.0), (8, 200, 50.0)]) == 3
    assert nested_cover([(8, 10, math.inf)]) == 1  # no limit found: still one replica
    assert nested_cover([(8, 0, 10.0)]) == 0


def test_estimate_counts_adapters_per_replica_by_slot_rank(llama):
    # a replica holds at most 5 adapters at rank 64 and 20 at rank 8 (slots): 7 rank-64
    # adapters need 2 rank-64 replicas, which hold 3 of the 30 rank-8 ones; 27 need 2 more
    slots = CapacityPredictor(lambda r, g, n: 1e6 if n <= (5 if r >= 64 else 20) else 0.0)
    w = workload([(f"h{i}", 64, 0.01) for i in range(7)] + [(f"l{i:02d}", 8, 0.01)
                                                             for i in range(30)])
    ctx = ctx_for(llama, slots)
    bound = estimate_capacity(w, ctx)
    assert bound.fractional < 3  # 7/6 + 30/21: the fractional sum alone says 3
    assert bound.replicas == 4
    assert make_plan(w, ctx).replicas == 4


def test_counted_lpt_spreads_cold_items_over_the_hot_bins():
    # two hot items and 60 cold ones in 3 bins: plain LPT piles every cold item into the third
    # bin; counting items too (20 per bin at most is what fits) spreads them
    sizes = np.array([100.0, 100.0] + [1.0] * 60)
    plain = np.bincount(lpt_assign(sizes, 3), minlength=3)
    assert plain.max() == 60
    counted = lpt_assign_counted(sizes, 3, size_cap=200.0, count_cap=40.0)
    assert counted[0] != counted[1]  # the hot items apart, as with plain LPT

    def worst_fill(bins: np.ndarray) -> float:
        load = np.bincount(bins, weights=sizes, minlength=3) / 200.0
        return float(np.maximum(load, np.bincount(bins, minlength=3) / 40.0).max())

    assert worst_fill(lpt_assign(sizes, 3)) == 1.5  # 60 cold items where 40 fit
    # each hot bin takes cold items until its tokens match the third bin's count: 19 / 19 / 24
    assert worst_fill(counted) <= 0.61
    with pytest.raises(ValueError, match="size_cap and count_cap"):
        lpt_assign_counted(sizes, 3, size_cap=0.0, count_cap=40.0)


# ----------------------------------------------------------------------------- packing


def test_tight_case_meets_the_estimate(llama):
    # 12 adapters of 100 tok/s, replicas of 400 tok/s: exactly 3 full replicas
    w = workload([(f"a{i:02d}", 8, 0.5) for i in range(12)])
    ctx = ctx_for(llama, flat(400.0))
    plan = make_plan(w, ctx)
    assert prepare(w, ctx).estimate.replicas == 3
    assert plan.replicas == 3
    assert all(off <= 400.0 + 1e-6 for off in per_replica_offered(plan))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_below_the_estimate_and_never_predicted_starved(llama, seed):
    # with a capacity that depends on the load only, the estimate is exact: no packing beats it
    rng = np.random.default_rng(seed)
    n = 40
    rates = rng.pareto(1.2, n) + 0.05
    ranks = rng.choice([8, 16, 32], n)
    w = workload([(f"a{i:02d}", int(ranks[i]), float(rates[i])) for i in range(n)])
    cap = 1500.0
    ctx = ctx_for(llama, flat(cap))
    plan = make_plan(w, ctx)
    assert plan.replicas >= prepare(w, ctx).estimate.replicas
    assert plan.starved_replicas("predicted") == 0
    assert all(off <= cap * (1 + 1e-6) for off in per_replica_offered(plan))
    # every adapter's traffic is served exactly once
    for adapter, routes in plan.routing.items():
        assert sum(r.weight for r in routes) == pytest.approx(1.0, abs=1e-9)
        served = sum(plan.group(r.group).copies * next(
            a.rate_rps for a in plan.group(r.group).adapters if a.id == adapter) for r in routes)
        assert served == pytest.approx(w.adapters[int(adapter[1:])].rate_rps, rel=1e-9)


def test_hot_adapter_is_split_with_weights_proportional_to_capacity(llama):
    cap = 1000.0  # tok/s per replica = 5 req/s of 200 tokens
    w = workload([("hot", 8, 12.5)]  # 2,500 tok/s: 2.5 replicas' worth
                 + [(f"c{i}", 8, 0.25) for i in range(8)])  # 400 tok/s of cold adapters
    plan = make_plan(w, ctx_for(llama, flat(cap)))
    routes = plan.routing["hot"]
    assert sum(r.weight for r in routes) == pytest.approx(1.0)
    assert replicas_serving(plan, "hot") == math.ceil(2500.0 / cap)
    for r in routes:  # each replica gets a share of the hot traffic proportional to what it serves
        g = plan.group(r.group)
        rate = next(a.rate_rps for a in g.adapters if a.id == "hot")
        assert r.weight == pytest.approx(rate * g.copies / 12.5, rel=1e-9)
    dedicated = [plan.group(r.group) for r in routes if len(plan.group(r.group).adapters) == 1]
    assert dedicated and all(g.total_rate_rps * 200.0 == pytest.approx(cap, rel=0.01)
                             for g in dedicated)
    # 2,900 tok/s over 1,000-tok/s replicas; the roofline bound is the profile's, far below
    assert plan.replicas == prepare(w, ctx_for(llama, flat(cap))).estimate.replicas == 3
    assert plan.lower_bound_replicas <= plan.replicas
    assert plan.starved_replicas("predicted") == 0


def test_rank_aware_packing_keeps_low_ranks_off_expensive_replicas(llama):
    # a rank-64 replica serves a quarter of a rank-8 one
    rank_cost = CapacityPredictor(lambda r, g, n: 1000.0 if r <= 8 else 250.0)
    w = workload([(f"s{i:02d}", 8, 0.45) for i in range(20)]  # 1,800 tok/s at rank 8
                 + [("big", 64, 0.2)])  # 40 tok/s at rank 64
    plan = make_plan(w, ctx_for(llama, rank_cost))
    # optimum: two rank-8 replicas (1,800 > 1,000) and the rank-64 one; rank-blind packing
    # would need ceil(1,840 / 250) = 8
    assert plan.replicas == 3 >= plan.lower_bound_replicas
    low = [g for g in plan.groups if g.engine.max_lora_rank == 8]
    served_low = sum(g.total_rate_rps for g in low) * 200.0
    assert served_low >= 1800.0 - 250.0  # at most the rank-64 replica's spare went there


def test_analytic_plans_have_no_predicted_starvation(llama):
    w = zipf_workload(300, 40.0, ranks={8: 0.5, 16: 0.3, 32: 0.2})
    plan = make_plan(w, PlacementContext.for_profile(llama, AnalyticPredictor(llama)))
    assert plan.starved_replicas("predicted") == 0
    assert plan.replicas >= plan.lower_bound_replicas
    ctx = PlacementContext.for_profile(llama, AnalyticPredictor(llama))
    for g in plan.groups:
        assert is_feasible(g.predicted, ctx)
        assert llama.check_feasible(g.engine) >= llama.max_model_len
        assert g.engine.max_lora_rank >= max(a.rank for a in g.adapters)


def test_lpt_balances():
    sizes = np.array([7.0, 5.0, 4.0, 3.0, 3.0, 2.0])
    bins = lpt_assign(sizes, 3)
    loads = np.bincount(bins, weights=sizes, minlength=3)
    assert loads.max() - loads.min() <= sizes.min()


def test_lpt_is_largest_first_to_the_lightest_bin():
    """The shortcut for the first k items gives the rule's own answer: ties to the lowest bin,
    zero sizes and bins that start loaded included."""

    def rule(sizes: np.ndarray, k: int, initial: np.ndarray | None) -> list[int]:
        loads = [float(x) for x in initial] if initial is not None else [0.0] * k
        out = [0] * len(sizes)
        for i in np.argsort(-sizes, kind="stable"):
            b = min(range(k), key=lambda j: (loads[j], j))
            out[i] = b
            loads[b] += float(sizes[i])
        return out

    rng = np.random.default_rng(0)
    for trial in range(300):
        n, k = int(rng.integers(0, 30)), int(rng.integers(1, 40))
        sizes = np.round(rng.random(n), 1) * (rng.random(n) > 0.2)  # ties and zeros
        initial = rng.random(k) if trial % 4 == 0 else None
        assert lpt_assign(sizes, k, initial).tolist() == rule(sizes, k, initial)


@pytest.mark.parametrize("predictor", ["analytic", "surrogate"])
@pytest.mark.parametrize("u", [1.0, 0.8])
def test_loads_feasible_is_optimise_s_verdict(llama, predictor, u):
    """The staged check (largest max_loras first, no figures at the actual load) says what
    judging every candidate says, on a batch large enough to be staged, some slots pinned."""
    ctx = PlacementContext.for_profile(llama, make_predictor(predictor, llama),
                                       target_utilisation=u)
    w = zipf_workload(400, 60.0, ranks={8: 0.5, 16: 0.3, 64: 0.2}, seed=3)
    index = WorkloadIndex(w)
    rng = np.random.default_rng(1)
    loads = [index.load(rng.choice(400, size=m, replace=False), np.full(m, share))
             for m in (1, 5, 20, 60, 120, 250) for share in (0.05, 0.2, 0.4, 0.6, 1.0)
             for _ in range(2)]
    assert sum(len(c) for c in _candidate_configs(loads, ctx, None)) >= _STAGED_FROM
    pins = [None if j % 5 else 4 for j in range(len(loads))]
    for pin in (None, pins):
        verdicts = loads_feasible(loads, ctx, max_loras=pin)
        assert verdicts == [o.feasible for o in optimise(loads, ctx, headroom=False,
                                                         max_loras=pin)]
        assert any(verdicts) and not all(verdicts)


def test_a_limited_packing_gives_up_only_when_it_needs_more_replicas(llama):
    """The margin trials' early exit: ``_pack(within=n)`` is the full packing unless that
    needs more than n replicas, and then usually None before packing it all."""
    cheap_ranks = CapacityPredictor(lambda r, g, n: 1000.0 if r <= 16 else 700.0)
    ctx = prepare(
        w := workload([(f"a{i:02d}", (8, 16, 64)[i % 3], 0.3 + 0.05 * i) for i in range(60)]),
        ctx_for(llama, cheap_ranks),
    )
    index = WorkloadIndex(w)
    full = _pack(index, ctx, ctx.estimate)
    assert full is not None
    need = _replicas(full[0])
    gave_up = []
    for within in range(1, need + 2):
        limited = _pack(index, ctx, ctx.estimate, within=within)
        if limited is None:
            assert need > within
            gave_up.append(within)
        else:
            assert limited == full
    assert gave_up  # the early exit does happen


# ----------------------------------------------------------------------------- errors


def test_gpu_budget_error_says_what_fits(llama):
    w = workload([(f"a{i:02d}", 8, 0.5) for i in range(12)])  # 1,200 tok/s
    ctx = ctx_for(llama, flat(400.0), gpu_budget=2)  # needs 3
    with pytest.raises(PlacementError) as err:
        make_plan(w, ctx)
    msg = str(err.value)
    assert "needs 3 replicas" in msg and "What fits in 2" in msg
    pct = float(re.search(r"about (\d+) %", msg).group(1))
    assert abs(pct - 100.0 * 800.0 / 1200.0) <= 2.0  # two replicas carry 800 of 1,200 tok/s


def test_rank_beyond_vllm_is_an_error_naming_the_adapter(llama):
    w = workload([("ok", 8, 1.0), ("giant", 1024, 1.0)])
    with pytest.raises(PlacementError, match=r"'giant' \(rank 1024\).*512"):
        make_plan(w, ctx_for(llama, flat(1e6)))


def test_rank_that_fits_no_memory_is_an_error_saying_what_fits(llama):
    kv = replace(llama.kv_capacity, per_slot_rank_tokens=3000.0, points=())
    tight = replace(llama, kv_capacity=kv)  # one rank-64 slot leaves too little KV
    w = workload([("small", 8, 1.0), ("wide", 64, 1.0)])
    with pytest.raises(PlacementError, match=r"'wide' \(rank 64\).*What fits"):
        make_plan(w, ctx_for(tight, flat(1e6)))


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(PlacementError, match="lorafleet"):
        get_policy("nope")
    with pytest.raises(TypeError):
        POLICIES["x"] = POLICIES["lorafleet"]  # the registry is read-only


def test_missing_surrogate_names_the_path_and_the_command(llama, tmp_path):
    path = tmp_path / "myprofile.yaml"
    llama.to_yaml(path)
    with pytest.raises(PlacementError, match=r"surrogate train --profile"):
        make_predictor("surrogate", llama, profile_ref=str(path))


# ----------------------------------------------------------------------------- twin


def test_twin_predictor_plan_and_verification(llama):
    small = Workload.from_yaml(SMALL)
    w = replace(small, adapters=small.adapters[:4])
    ctx = PlacementContext.for_profile(
        llama, TwinPredictor(llama, duration_s=300.0), headroom_tolerance=0.1,
        max_loras_grid=(1, 2, 4),  # few candidates: every prediction is a twin run
        min_served_fraction=0.95,  # a 300 s window loses the requests still running at its end
    )
    plan = make_plan(w, ctx)
    assert plan.replicas >= plan.lower_bound_replicas
    assert plan.starved_replicas("predicted") == 0
    checked = verify_plan(plan, llama, duration_s=600.0, workers=1)
    assert checked.is_verified and checked.starved_replicas("verified") == 0
    for g in checked.groups:
        assert g.verified["offered_total_tps"] > 0
        assert g.verified["duration_s"] == 600.0


def test_verify_refuses_another_profile(llama):
    plan = make_plan(workload([("a", 8, 1.0)]), ctx_for(llama, flat(1e4)))
    other = load_profile("qwen-2.5-7b-instruct")
    with pytest.raises(PlacementError, match="made with profile"):
        verify_plan(plan, other, duration_s=60.0)


def test_compare_runs_every_registered_policy(llama):
    result = compare(workload([(f"a{i}", 8, 0.5) for i in range(6)]), ctx_for(llama, flat(400.0)),
                     verify=False)
    assert set(result.plans) == set(POLICIES)
    assert result.estimate.replicas == 2


# ----------------------------------------------------------------------------- CLI

SUMMARY_KEYS = {"replicas", "starved_replicas", "verified_total_throughput_tps",
                "offered_total_tps", "ttft_p99_ms", "plan_wall_s"}


@pytest.fixture
def wide_console(monkeypatch):
    from rich.console import Console

    import orchestrator.cli.output as cli

    monkeypatch.setattr(cli, "console", Console(width=200))


def test_cli_plan_json_and_output(capsys, tmp_path, wide_console):
    out = tmp_path / "plan.yaml"
    code = main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic", "--json",
                 "-o", str(out)])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["replicas"] >= obj["lower_bound_replicas"] >= 1
    assert obj["starved_replicas"] == 0 and obj["policy"] == "lorafleet"
    assert Plan.from_yaml(out).replicas == obj["replicas"]


def test_cli_compare_json_keys(capsys, wide_console):
    code = main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic", "--compare",
                 "--json", "--verify-duration", "600", "--workers", "1"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) == {"lower_bound_replicas", "capacity_estimate_replicas", "policies"}
    assert isinstance(obj["lower_bound_replicas"], int)
    assert set(obj["policies"]) == set(POLICIES)
    for summary in obj["policies"].values():
        assert set(summary) == SUMMARY_KEYS
        assert summary["verified_total_throughput_tps"] > 0  # every policy twin-verified
        assert isinstance(summary["replicas"], int) and isinstance(summary["plan_wall_s"], float)


def test_cli_table_and_user_errors(capsys, wide_console):
    assert main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic"]) == 0
    out = capsys.readouterr().out
    assert "lower bound" in out and "group-000" in out
    assert main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic",
                 "--policy", "nope"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown policy 'nope'" in err and all(name in err for name in POLICIES)
    assert main(["plan", SMALL, "--profile", LLAMA, "--predictor", "analytic",
                 "--gpu-budget", "1", "--target-utilisation", "0.05"]) == 2
    assert "What fits in 1" in capsys.readouterr().err


def test_workload_index_follows_workload_order():
    w = workload([("b", 8, 1.0), ("a", 16, 2.0)])
    idx = WorkloadIndex(w)
    assert idx.ids == ("b", "a") and idx.position["a"] == 1
    assert idx.offered_tps.tolist() == [200.0, 400.0]


def test_hot_group_names_are_valid_for_any_adapter_id(llama):
    w = workload([("org/support bot", 8, 12.5), ("x", 8, 0.1)])  # 2,500 tok/s: hot
    plan = make_plan(w, ctx_for(llama, flat(1000.0)))
    names = [r.group for r in plan.routing["org/support bot"]]
    assert any(n.startswith("hot") for n in names)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_idle_adapters_are_placed(llama):
    plan = make_plan(workload([("a", 8, 0.0), ("b", 16, 0.0)]), ctx_for(llama, flat(100.0)))
    assert plan.replicas == 1 and set(plan.routing) == {"a", "b"}


def test_analytic_predictor_behaves(llama):
    pred = AnalyticPredictor(llama)
    lo = ReplicaLoad.from_workload(uniform_workload(32, 2.0, ranks=[8]))
    hi = ReplicaLoad.from_workload(uniform_workload(32, 80.0, ranks=[8]))
    cfg8 = EngineConfig(max_loras=32, max_cpu_loras=32, max_lora_rank=8)
    cfg64 = EngineConfig(max_loras=32, max_cpu_loras=32, max_lora_rank=64)
    light, heavy = pred.predict([lo, hi], [cfg8, cfg8])
    assert not light["starved"] and light["total_throughput_tps"] == pytest.approx(
        light["offered_total_tps"])
    assert heavy["starved"] and heavy["total_throughput_tps"] < 0.9 * heavy["offered_total_tps"]
    assert heavy["ttft_p99_ms"] >= light["ttft_p99_ms"] and heavy["itl_p50_ms"] > 0
    cap8, cap64 = pred.capacity_tps([hi, hi], [cfg8, cfg64])
    assert cap64 < cap8  # larger slots cost step time (rank tiles of the LoRA kernels)
    few = ReplicaLoad.from_workload(uniform_workload(8, 2.0, ranks=[8]))
    many = ReplicaLoad.from_workload(uniform_workload(400, 2.0, ranks=[8]))
    cfg = EngineConfig(max_loras=8, max_cpu_loras=400, max_lora_rank=8)
    assert pred.capacity_tps([many], [cfg])[0] < pred.capacity_tps([few], [cfg])[0]


def test_estimate_survives_idle_adapters_next_to_a_hot_one():
    from placement.analytic import AnalyticPredictor
    from placement.context import PlacementContext
    from twin.lengths import LengthModel
    from twin.profile import load_profile
    from twin.workload import AdapterSpec, Workload

    profile = load_profile("llama-3.1-8b-instruct")
    w = Workload(
        name="hot-and-idle",
        adapters=(AdapterSpec("h", 8, 30.0), AdapterSpec("z", 8, 0.0)),
        lengths=LengthModel(kind="sharegpt"),
    )
    ctx = PlacementContext.for_profile(profile, AnalyticPredictor(profile))
    est = estimate_capacity(w, ctx)
    # an idle adapter offers nothing: the estimate is the hot adapter's alone
    alone = estimate_capacity(replace(w, adapters=w.adapters[:1]), ctx)
    lengths = w.lengths
    assert est.offered_tps == pytest.approx(30.0 * (lengths.mean_prompt() + lengths.mean_output()))
    assert est.replicas == alone.replicas and est.fractional == pytest.approx(alone.fractional)
    assert math.isfinite(est.fractional) and est.replicas == math.ceil(est.fractional - 1e-9)


def test_fill_rounds_offer_a_full_bins_leftovers_to_the_others(llama):
    """Rank-8 adapters go first to the rank-16 replica, whose headroom (measured on its two
    adapters) says they all fit; but it holds at most 6 adapters, so it keeps a prefix. One
    fill round leaves the rest; the next offers them to the rank-64 replica, which has room."""
    from placement.packing import _Packer

    limit = {16: 6, 64: 12}  # adapters a replica of that slot rank serves before collapsing
    cliff = CapacityPredictor(lambda r, g, n: 1000.0 if n <= limit.get(r, 99) else 10.0)
    w = workload([("a16", 16, 0.5), ("b16", 16, 0.5),  # 200 tok/s at 200 tokens per request
                  *[(f"c64-{i}", 64, 0.5) for i in range(3)],
                  *[(f"p{i}", 8, 0.25) for i in range(8)]])  # 8 x 50 tok/s to place
    ctx = prepare(w, ctx_for(llama, cliff))
    index = WorkloadIndex(w)

    def setup() -> tuple[_Packer, list, list[int]]:
        packer = _Packer(index, ctx, ctx.estimate)
        packer.split_hot()
        pos = {index.ids[p]: i for i, p in enumerate(packer.items.pos.tolist())}
        bins = [packer._bin([pos["a16"], pos["b16"]]),
                packer._bin([pos[f"c64-{i}"] for i in range(3)])]
        return packer, bins, [pos[f"p{i}"] for i in range(8)]

    packer, bins, pool = setup()
    left, refused = packer.fill(bins, pool)
    assert len(left) == 4 and refused == [bins[0]] and len(bins[0].items) == 6
    packer, bins, pool = setup()
    assert packer.fill_rounds(bins, pool) == []
    assert [len(b.items) for b in bins] == [6, 7]
    assert all(packer.feasible([b.items for b in bins]))


def _twin_serving_at_most(capacity_tps: float):
    """A stand-in for verification's twin runs (a ``Mapper``): each replica serves at most
    ``capacity_tps``, less than the predictor believes."""
    def mapper(fn, jobs, progress=None):  # noqa: ANN001, ANN202 - the Mapper protocol
        out = []
        for _profile, load, _engine, duration_s, seed in jobs:
            offered = load.offered_tokens_per_s()
            served = min(offered, capacity_tps)
            out.append({"total_throughput_tps": served, "offered_total_tps": offered,
                        "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_p50_ms": 5.0,
                        "itl_p99_ms": 9.0, "starved": served < 0.9 * offered,
                        "duration_s": duration_s, "seed": seed, "wall_s": 0.0})
        return out
    return mapper


def test_lorafleet_settles_on_the_twin_and_baselines_do_not(llama):
    """The predictor says a replica serves 1,000 tok/s, the twin 800: the first plan's two
    replicas starve in the twin, so lorafleet plans again at a tighter margin until none does;
    a baseline's plan is reported as verified, starved replicas and all."""
    from placement.choose import ChoiceRule, choose_plan

    w = workload([(f"a{i:02d}", 8, 0.5) for i in range(20)])  # 20 x 100 tok/s
    ctx = prepare(w, ctx_for(llama, flat(1000.0)))
    calls: list[int] = []

    def twin(capacity_tps: float):
        def verify(plans):
            calls.append(len(plans))
            return verify_plans(plans, llama, duration_s=60.0,
                                mapper=_twin_serving_at_most(capacity_tps))
        return verify

    def rule(policy: str) -> ChoiceRule:
        return ChoiceRule(policy=policy, target_utilisations=(ctx.target_utilisation,))

    first = make_plan(w, ctx, "lorafleet")
    assert first.replicas == 2
    settled = choose_plan(w, ctx, rule("lorafleet"), twin(800.0))
    # 2,000 tok/s over replicas of 800: 3 replicas (667 tok/s each) is the fewest the twin feeds
    assert settled.is_verified and settled.starved_replicas() == 0
    assert settled.replicas == 3
    assert settled.settings["target_utilisation"] < first.settings["target_utilisation"]
    assert calls[0] == 1 and len(calls) >= 2  # the first plan, then tighter ones one at a time
    baseline = choose_plan(w, ctx, rule("round_robin"), twin(800.0))
    assert baseline.replicas == 2 and baseline.starved_replicas() == 2
    # a plan the twin cannot settle within the rounds comes back with its starved replicas
    calls.clear()
    stuck = choose_plan(w, ctx, rule("lorafleet"), twin(1.0))
    assert stuck.is_verified and stuck.starved_replicas() > 0
    assert len(calls) == 1 + ChoiceRule().settle_rounds


def test_lorafleet_relaxes_to_fewer_replicas_while_the_twin_accepts_them(llama):
    """The predictor believes 400 tok/s per replica, the twin serves 1,100: the plan of five
    replicas is bisected down towards the lower bound, each count packed twice (the predictor's
    and the analytic packing) and verified; the fewest the twin accepts is kept, within
    ``relax_rounds`` rounds of one verify call each."""
    from placement.choose import ChoiceRule, choose_plan

    w = workload([(f"a{i:02d}", 8, 0.5) for i in range(20)])  # 20 x 100 tok/s
    ctx = prepare(w, ctx_for(llama, flat(400.0)))
    assert make_plan(w, ctx).replicas == 5
    lower = ctx.lower_bound.replicas
    assert lower <= 2
    calls: list[int] = []

    def verify(plans):
        calls.append(len(plans))
        return verify_plans(plans, llama, duration_s=60.0, mapper=_twin_serving_at_most(1100.0))

    def rule(rounds: int) -> ChoiceRule:
        return ChoiceRule(target_utilisations=(1.0,), relax_rounds=rounds)

    assert choose_plan(w, ctx, rule(0), verify).replicas == 5
    calls.clear()
    one = choose_plan(w, ctx, rule(1), verify)  # the middle of (lower - 1, 5]: 2 or 3
    assert one.replicas == (lower - 1 + 5) // 2 and one.is_verified
    # one call for the plan, one for the round: the count packed by the predictor and by the
    # analytic model (equal packings once)
    assert one.starved_replicas() == 0 and calls[0] == 1 and len(calls) == 2 and calls[1] <= 2
    settled = choose_plan(w, ctx, rule(5), verify)
    # 2,000 tok/s: two replicas of 1,000 are fed, one of 2,000 is not (the twin serves 1,100)
    assert settled.replicas == 2 and settled.starved_replicas() == 0
    assert all(g.verified for g in settled.groups)
    assert settled.plan_wall_s is not None and settled.plan_wall_s > 0  # its packing's time
    with pytest.raises(ValueError, match="relax_rounds"):
        ChoiceRule(relax_rounds=-1)


def test_the_choice_rule_verifies_once_tightens_only_its_own_plans_and_prices_extras(llama):
    """``placement.choose``: every unverified candidate in ONE verify call; only candidates the
    lorafleet policy planned at a utilisation are tightened (a baseline and a plan without a
    utilisation, like the controller's consolidated one, keep their starved replicas); the
    choice adds the caller's extra cost, and ties go to fewer replicas."""
    from placement.choose import Candidate, ChoiceRule, best, candidates, score, settle

    w = workload([(f"a{i:02d}", 8, 0.5) for i in range(20)])  # 20 x 100 tok/s
    ctx = prepare(w, ctx_for(llama, flat(1000.0)))
    two_u = candidates(w, ctx, ChoiceRule(target_utilisations=(1.0, 0.98)))
    assert [(c.label, c.plan.replicas) for c in two_u] == [("u=1", 2), ("u=0.98", 3)]
    rule = ChoiceRule(target_utilisations=(1.0, 1.0), relax_rounds=0)  # tightening alone
    cands = candidates(w, ctx, rule)
    assert [c.label for c in cands] == ["u=1"]  # the same plan twice: verified once
    calls: list[int] = []

    def verify(plans):
        calls.append(len(plans))
        return verify_plans(plans, llama, duration_s=60.0, mapper=_twin_serving_at_most(800.0))

    baseline = Candidate("rr", make_plan(w, ctx, "round_robin"), ctx.target_utilisation)
    fixed = Candidate("fixed", cands[0].plan)  # no utilisation: never re-planned
    out = settle([cands[0], baseline, fixed], w, ctx, verify, rule)
    assert calls[0] == 3 and all(n == 1 for n in calls[1:])  # then only u=1 is re-planned
    by = {c.label: c.plan for c in out}
    assert by["u=1"].starved_replicas() == 0 and by["u=1"].replicas == 3
    assert by["rr"].starved_replicas() == 2 and by["fixed"].starved_replicas() == 2
    # 3 fed replicas (score 3) beat 2 starved ones (2 + 2 x 100) ...
    assert score(by["u=1"]) == 3.0 and score(by["fixed"]) == 202.0
    assert best(out, rule).label == "u=1"
    # ... unless the caller's extra cost says otherwise; a tie goes to fewer replicas
    assert best(out, rule, extra=lambda c: 500.0 if c.label == "u=1" else 0.0).label == "fixed"
    two = Candidate("b", by["fixed"].with_verified({g.name: {**g.verified, "starved": False}
                                                    for g in by["fixed"].groups}))
    three = Candidate("a", by["u=1"])
    assert best([three, two], rule, extra=lambda c: 1.0 if c.label == "b" else 0.0).label == "b"


def test_a_count_search_started_too_high_comes_down():
    """A start from an estimate that is too high (a predictor outside its domain once put the
    estimate at 73 where one replica served) must not inflate the count."""
    from placement.common import smallest_feasible

    seen: list[int] = []

    def from3(k: int) -> bool:
        seen.append(k)
        return k >= 3

    assert smallest_feasible(from3, 10, 20, lambda k: k + 1, floor=1) == 3
    assert seen[0] == 10 and min(seen) >= 1
    assert smallest_feasible(lambda k: k >= 3, 2, 20, lambda k: k + 1, floor=1) == 3
    assert smallest_feasible(lambda k: k >= 1, 10, 20, lambda k: 2 * k, floor=1) == 1
    assert smallest_feasible(lambda k: k >= 12, 10, 20, lambda k: k + 1, floor=1) == 12
    assert smallest_feasible(lambda k: k >= 3, 10, 20, lambda k: k + 1) == 10  # no floor: as was
