"""Plan YAML: round trip, versioning, validation errors that name their field, consistency checks
between groups and routing, and the example plan shipped with the docs."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from placement.context import PlacementContext
from placement.errors import PlanFormatError
from placement.plan import PLAN_FORMAT_VERSION, Plan, Route
from placement.planner import make_plan
from twin.config import EngineConfig
from twin.lengths import LengthModel
from twin.profile import load_profile
from twin.replica import PREDICTED_METRICS, ReplicaLoad
from twin.workload import AdapterSpec, Workload

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PLAN = ROOT / "examples" / "plan_fleet.yaml"
AZURE = ROOT / "examples" / "workload_azure.yaml"


@dataclass(frozen=True)
class FlatPredictor:
    """Every replica serves up to ``capacity`` tokens/s."""

    capacity: float
    name: str = "flat"

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        out = []
        for load in loads:
            offered = load.offered_tokens_per_s()
            served = min(offered, self.capacity)
            out.append({"total_throughput_tps": served, "offered_total_tps": offered,
                        "ttft_p50_ms": 40.0, "ttft_p99_ms": 90.0, "itl_p50_ms": 20.0,
                        "itl_p99_ms": 35.0, "starved": served < 0.9 * offered})
        return out


@pytest.fixture(scope="module")
def plan() -> Plan:
    """Five adapters of 200 tok/s plus one of 1,100 (hot: split) on 500-tok/s replicas."""
    profile = load_profile("llama-3.1-8b-instruct")
    adapters = [AdapterSpec(f"a{i}", 8 if i % 2 else 16, 1.0) for i in range(5)]
    adapters.append(AdapterSpec("hot", 32, 5.5))
    w = Workload(name="fmt", adapters=tuple(adapters),
                 lengths=LengthModel(kind="fixed", prompt=100, output=100))
    ctx = PlacementContext.for_profile(profile, FlatPredictor(500.0), min_served_fraction=1.0)
    return make_plan(w, ctx)


def test_round_trip(plan, tmp_path):
    path = tmp_path / "plan.yaml"
    plan.to_yaml(path)
    back = Plan.from_yaml(path)
    assert back == plan
    assert back.replicas == plan.replicas and back.routing == plan.routing
    assert yaml.safe_load(path.read_text())["format_version"] == PLAN_FORMAT_VERSION


def test_plan_records_what_it_was_made_with(plan):
    assert plan.profile.name == "llama-3.1-8b-instruct" and len(plan.profile.sha256) == 64
    assert {"lorafleet", "python"} <= set(plan.tool_versions)
    assert plan.predictor == "flat" and plan.policy == "lorafleet"
    assert plan.created_at.endswith("Z")
    for g in plan.groups:
        assert set(PREDICTED_METRICS) <= set(g.predicted)


def test_weights_sum_to_one_and_hot_adapter_is_split(plan):
    for adapter, routes in plan.routing.items():
        assert sum(r.weight for r in routes) == pytest.approx(1.0, abs=1e-9), adapter
    assert len(plan.routing["hot"]) >= 2 or any(
        plan.group(r.group).copies > 1 for r in plan.routing["hot"])


def mutate(plan: Plan, edit) -> dict:
    d = copy.deepcopy(plan.to_dict())
    edit(d)
    return d


def _set(path: list, value):
    def edit(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _first_adapter(d) -> str:
    return d["groups"][0]["adapters"][0]["id"]


CASES = [
    ("format_version", _set(["format_version"], 2), r"^format_version: 2 is not supported"),
    ("bogus", _set(["bogus"], 1), r"^bogus: unknown field"),
    ("policy", _set(["policy"], ""), r"^policy: must be a non-empty string"),
    ("max_loras", _set(["groups", 0, "engine", "max_loras"], 0),
     r"^groups\[0\]\.engine\.max_loras: must be a positive integer"),
    ("engine field", _set(["groups", 0, "engine", "slots"], 3), r"^groups\[0\]\.engine: unknown"),
    ("copies", _set(["groups", 0, "copies"], 0), r"^groups\[0\]\.copies: must be an integer"),
    ("rank", _set(["groups", 0, "adapters", 0, "rank"], 64),
     r"^groups\[0\]\.adapters\[0\]\.rank: 64 exceeds groups\[0\]\.engine\.max_lora_rank"),
    ("rate", _set(["groups", 0, "adapters", 0, "rate_rps"], -1.0),
     r"^groups\[0\]\.adapters\[0\]\.rate_rps: must be a finite number"),
    ("predicted", lambda d: d["groups"][0]["predicted"].pop("ttft_p99_ms"),
     r"^groups\[0\]\.predicted: missing \['ttft_p99_ms'\]"),
    ("lengths", _set(["workload", "lengths"], {"kind": "gaussian"}), r"^workload\.lengths"),
    ("lower bound", _set(["lower_bound_replicas"], 0), r"^lower_bound_replicas: must be"),
    ("replicas", _set(["replicas"], 99), r"^replicas: 99 disagrees"),
    ("n_adapters", _set(["workload", "n_adapters"], 99), r"^routing: routes 6 adapter"),
]


@pytest.mark.parametrize("name, edit, pattern", CASES, ids=[c[0] for c in CASES])
def test_validation_errors_name_the_field(plan, name, edit, pattern):
    with pytest.raises(PlanFormatError, match=pattern):
        Plan.from_dict(mutate(plan, edit))


def _movable(plan: Plan) -> tuple[int, int, str, str]:
    """(group index, adapter index, adapter id, another group whose slots hold its rank)."""
    for i, g in enumerate(plan.groups):
        for j, a in enumerate(g.adapters):
            for other in plan.groups:
                if a.id not in other.adapter_ids and other.engine.max_lora_rank >= a.rank:
                    return i, j, a.id, other.name
    raise AssertionError("the fixture plan needs two groups")


def test_routing_consistency_errors(plan):
    i, j, a, other = _movable(plan)
    home = plan.groups[i].name

    def route_to(group, weight=1.0):
        return _set(["routing", a], [{"group": group, "weight": weight}])

    with pytest.raises(PlanFormatError, match=rf"^routing\.{a}\[0\]\.group: 'nowhere' is not"):
        Plan.from_dict(mutate(plan, route_to("nowhere")))
    with pytest.raises(PlanFormatError, match=rf"^routing\.{a}\[0\]: adapter '{a}' is not in"):
        Plan.from_dict(mutate(plan, route_to(other)))
    with pytest.raises(PlanFormatError, match=rf"^routing\.{a}: weights sum to 0.5"):
        Plan.from_dict(mutate(plan, route_to(home, 0.5)))

    def reroute(d: dict) -> None:  # the adapter moves to `other` but stays listed in its group
        _add_to(d, other, a)
        d["routing"][a] = [{"group": other, "weight": 1.0}]

    with pytest.raises(PlanFormatError,
                       match=rf"^groups\[{i}\]\.adapters\[{j}\]: '{a}' .* does not send it"):
        Plan.from_dict(mutate(plan, reroute))
    # weights must follow the traffic the groups actually receive
    hot = plan.routing["hot"]
    assert len(hot) == 2 and abs(hot[0].weight - hot[1].weight) > 1e-3
    swapped = [{"group": r.group, "weight": w.weight} for r, w in zip(hot, hot[::-1],
                                                                       strict=True)]
    with pytest.raises(PlanFormatError, match=r"^routing\.hot\[0\]\.weight: .* disagrees"):
        Plan.from_dict(mutate(plan, _set(["routing", "hot"], swapped)))


def _add_to(d: dict, group: str, adapter: str) -> None:
    """Also place ``adapter`` in ``group`` (so only the old group's membership is unrouted)."""
    src = next(a for g in d["groups"] for a in g["adapters"] if a["id"] == adapter)
    for g in d["groups"]:
        if g["name"] == group:
            g["adapters"].append(dict(src))


def test_constructing_an_inconsistent_plan_fails(plan):
    routing = dict(plan.routing)
    routing["hot"] = (Route(plan.routing["hot"][0].group, 0.25),)
    with pytest.raises(PlanFormatError, match=r"^routing\.hot: weights sum"):
        replace(plan, routing=routing)


def test_not_a_plan(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(PlanFormatError, match="must be a mapping"):
        Plan.from_yaml(path)
    path.write_text("groups: []\n")
    with pytest.raises(PlanFormatError, match="^format_version: required"):
        Plan.from_yaml(path)


def test_empirical_lengths_path_follows_the_plan_file(tmp_path):
    w = Workload.from_yaml(AZURE)
    profile = load_profile("llama-3.1-8b-instruct")
    ctx = PlacementContext.for_profile(profile, FlatPredictor(1e6))
    p = make_plan(w, ctx)
    out = tmp_path / "deep" / "plan.yaml"
    out.parent.mkdir()
    p.to_yaml(out)
    stored = yaml.safe_load(out.read_text())["workload"]["lengths"]["path"]
    assert not Path(stored).is_absolute()
    back = Plan.from_yaml(out)
    assert back.workload.length_model().mean_prompt() == pytest.approx(w.lengths.mean_prompt())


def test_example_plan_in_the_docs_is_valid():
    example = Plan.from_yaml(EXAMPLE_PLAN)
    assert example.replicas >= example.lower_bound_replicas
    doc = (ROOT / "docs" / "plan_format.md").read_text()
    assert "examples/plan_fleet.yaml" in doc
