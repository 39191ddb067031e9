"""placement.consolidate: a fleet shrunk in place (copies dropped, groups merged) while a
predictor with a hand-checkable capacity says every replica stays feasible."""

from __future__ import annotations

import pytest

from placement.consolidate import consolidate
from placement.context import PlacementContext
from placement.plan import PlacedAdapter, Plan, ProfileRef, ReplicaGroup, Route, WorkloadRef
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import load_profile

LENGTHS = LengthModel(kind="fixed", prompt=100, output=100)
CAPACITY_RPS = 10.0  # one replica serves up to 10 req/s, whatever it holds
ENGINE = EngineConfig(max_loras=4, max_cpu_loras=4, max_lora_rank=8)
PRED = {"total_throughput_tps": 1.0, "offered_total_tps": 1.0, "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 1.0, "itl_p50_ms": 1.0, "itl_p99_ms": 1.0, "starved": False}


class CapacityPredictor:
    """Feasible while a replica's total rate is within CAPACITY_RPS."""

    name = "capacity"

    def predict(self, loads, configs):
        out = []
        for load in loads:
            offered = load.offered_tokens_per_s()
            over = load.total_rate_rps > CAPACITY_RPS + 1e-9
            out.append({"total_throughput_tps": offered * (0.5 if over else 1.0),
                        "offered_total_tps": offered, "ttft_p50_ms": 10.0,
                        "ttft_p99_ms": 20.0, "itl_p50_ms": 5.0, "itl_p99_ms": 8.0,
                        "starved": over})
        return out


@pytest.fixture
def ctx() -> PlacementContext:
    return PlacementContext.for_profile(load_profile("tiny-llama-cpu"), CapacityPredictor())


def plan_of(groups: list[tuple[str, int, dict[str, float]]]) -> Plan:
    """(name, copies, {adapter: rate ONE replica gets}); routing by traffic."""
    traffic: dict[str, dict[str, float]] = {}
    for name, copies, per in groups:
        for a, q in per.items():
            traffic.setdefault(a, {})[name] = q * copies
    routing = {a: tuple(Route(g, t / sum(by.values())) for g, t in by.items())
               for a, by in traffic.items()}
    return Plan(policy="hand", predictor="capacity",
                profile=ProfileRef("p", "cpu", "m", "v", "0" * 64),
                workload=WorkloadRef("w", len(routing), 1.0, 1.0, LENGTHS.to_dict()),
                groups=tuple(ReplicaGroup(n, tuple(PlacedAdapter(a, 8, q) for a, q in per.items()),
                                          ENGINE, c, PRED) for n, c, per in groups),
                routing=routing, lower_bound_replicas=1)


def offered(plan: Plan) -> dict[str, float]:
    """Each adapter's total rate over the plan's replicas."""
    out: dict[str, float] = {}
    for g in plan.groups:
        for a in g.adapters:
            out[a.id] = out.get(a.id, 0.0) + a.rate_rps * g.copies
    return out


def test_copies_are_dropped_then_groups_merged_while_they_fit(ctx) -> None:
    # hot: 3 copies x 2 req/s = 6 req/s; two single groups of 3 req/s each: 5 replicas for 12
    before = plan_of([("hot", 3, {"h": 2.0}), ("g1", 1, {"a": 1.5, "b": 1.5}),
                      ("g2", 1, {"c": 3.0})])
    after = consolidate(before, ctx)
    # hot needs one copy (6 <= 10); g1 + g2 merge (6 <= 10); merging all (12) would not fit
    assert after.replicas == 2
    assert {g.name: g.copies for g in after.groups} == {"hot": 1, "g1": 1}
    assert {a.id: a.rate_rps for a in after.group("g1").adapters} == pytest.approx(
        {"a": 1.5, "b": 1.5, "c": 3.0})
    assert offered(after) == pytest.approx(offered(before))  # no traffic lost or doubled
    assert all(not g.predicted["starved"] for g in after.groups)
    assert after.routing["c"] == (Route("g1", 1.0),)


def test_a_split_adapter_keeps_its_traffic_when_its_groups_merge(ctx) -> None:
    before = plan_of([("g0", 1, {"s": 2.0, "a": 1.0}), ("g1", 1, {"s": 2.0, "b": 1.0})])
    after = consolidate(before, ctx)
    assert after.replicas == 1
    assert offered(after) == pytest.approx({"s": 4.0, "a": 1.0, "b": 1.0})
    assert after.routing["s"] == (Route("g0", 1.0),)


def test_a_fleet_at_capacity_is_returned_unchanged(ctx) -> None:
    full = plan_of([("g0", 1, {"a": 9.0}), ("g1", 1, {"b": 9.0}), ("hot", 2, {"h": 8.0})])
    assert consolidate(full, ctx) is full
