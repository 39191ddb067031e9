"""Hand-shaped plans for tests, benchmarks and smoke runs of the serving path.

``lorafleet plan`` decides placement from a workload; to exercise the serving path on a chosen
topology (two groups, a replicated group, a hot adapter split over two groups, 200 adapters over
several groups) this builds a valid ``placement.plan.Plan`` directly. Predictions are placeholders
(zeros) unless given: such a plan says nothing about performance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from placement.plan import PlacedAdapter, Plan, ProfileRef, ReplicaGroup, Route, WorkloadRef
from twin.config import EngineConfig
from twin.replica import PREDICTED_METRICS

_LENGTHS = {"kind": "fixed", "prompt": 64, "output": 32}


@dataclass(frozen=True)
class GroupShape:
    name: str
    adapters: Sequence[tuple[str, int]]  # (id, rank)
    copies: int = 1
    max_loras: int | None = None  # default: all the group's adapters
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    block_size: int = 32
    rate_rps: float = 0.5  # per adapter per copy


def _rank_slot(rank: int) -> int:
    return next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)


def synthetic_plan(groups: Sequence[GroupShape], *, profile: str = "tiny-llama-cpu",
                   predicted: Mapping[str, Mapping[str, float]] | None = None) -> Plan:
    """A plan with exactly these groups; an adapter in several groups is split by traffic."""
    built, routing = [], {}
    for g in groups:
        top = max(r for _, r in g.adapters)
        engine = EngineConfig(
            max_loras=g.max_loras or len(g.adapters),
            max_cpu_loras=max(g.max_loras or len(g.adapters), len(g.adapters)),
            max_lora_rank=_rank_slot(top), max_num_seqs=g.max_num_seqs,
            max_num_batched_tokens=g.max_num_batched_tokens, block_size=g.block_size,
        )
        pred = {k: 0.0 for k in PREDICTED_METRICS}
        pred["starved"] = False
        pred.update((predicted or {}).get(g.name, {}))
        built.append(ReplicaGroup(
            name=g.name, engine=engine, copies=g.copies, predicted=pred,
            adapters=tuple(PlacedAdapter(a, r, g.rate_rps) for a, r in g.adapters)))
    traffic: dict[str, list[tuple[str, float]]] = {}
    for g in built:
        for a in g.adapters:
            traffic.setdefault(a.id, []).append((g.name, a.rate_rps * g.copies))
    for a, parts in traffic.items():
        total = sum(t for _, t in parts) or 1.0
        routing[a] = tuple(Route(gname, t / total) for gname, t in parts)
    from twin.profile import load_profile

    prof = load_profile(profile)
    rate = sum(a.rate_rps * g.copies for g in built for a in g.adapters)
    return Plan(
        policy="synthetic", predictor="none", profile=ProfileRef.of(prof),
        workload=WorkloadRef("synthetic", len(traffic), rate, 0.0, dict(_LENGTHS)),
        groups=tuple(built), routing=routing, lower_bound_replicas=1,
    )


def split_adapters(n_adapters: int, n_groups: int, *, ranks: Sequence[int] = (8, 16),
                   prefix: str = "adapter-") -> list[list[tuple[str, int]]]:
    """``n_adapters`` ids (``adapter-0000`` ...) dealt round-robin into ``n_groups`` groups."""
    out: list[list[tuple[str, int]]] = [[] for _ in range(n_groups)]
    for i in range(n_adapters):
        out[i % n_groups].append((f"{prefix}{i:04d}", ranks[i % len(ranks)]))
    return out
