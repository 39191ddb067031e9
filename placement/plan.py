"""The plan: what `lorafleet plan` writes and `lorafleet deploy` reads (docs/plan_format.md).

A ``Plan`` holds replica groups (adapters with the traffic one replica gets, engine config, copies,
predicted and twin-verified per-replica metrics), the routing table (adapter -> groups with
weights), the lower bound on replicas, and what it was made with (profile hash, predictor, tool
versions). It is validated wherever it is built: loading a YAML checks every field and names its
path (``groups[2].engine.max_loras: ...``); constructing one checks that routing and groups agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from placement.errors import PlanFormatError
from twin.config import ConfigError, EngineConfig
from twin.lengths import LengthModel, WorkloadError
from twin.profile import Profile
from twin.replica import PREDICTED_METRICS

PLAN_FORMAT_VERSION = 1
WEIGHT_TOLERANCE = 1e-6
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_TOP_KEYS = (
    "format_version", "created_at", "policy", "predictor", "tool_versions", "profile",
    "workload", "settings", "lower_bound_replicas", "replicas", "plan_wall_s", "groups",
    "routing",
)
_PROFILE_KEYS = ("name", "gpu", "model", "vllm_version", "sha256")
_WORKLOAD_KEYS = ("name", "n_adapters", "total_rate_rps", "offered_total_tps", "lengths")
_GROUP_KEYS = ("name", "copies", "engine", "adapters", "predicted", "headroom", "verified")
_ADAPTER_KEYS = ("id", "rank", "rate_rps")
_ROUTE_KEYS = ("group", "weight")


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacedAdapter:
    """An adapter on a replica group; ``rate_rps`` is what ONE replica of the group receives."""

    id: str
    rank: int
    rate_rps: float


@dataclass(frozen=True)
class ReplicaGroup:
    """``copies`` identical replicas: same adapters, same engine config, traffic split evenly.

    ``predicted``/``verified``: per-replica metrics (``twin.replica.PREDICTED_METRICS`` at least);
    ``headroom``: how far this replica's load can be scaled before it becomes infeasible.
    """

    name: str
    adapters: tuple[PlacedAdapter, ...]
    engine: EngineConfig
    copies: int = 1
    predicted: Mapping[str, Any] = field(default_factory=dict)
    headroom: float | None = None
    verified: Mapping[str, Any] | None = None

    @property
    def adapter_ids(self) -> tuple[str, ...]:
        return tuple(a.id for a in self.adapters)

    @property
    def total_rate_rps(self) -> float:
        return float(sum(a.rate_rps for a in self.adapters))


@dataclass(frozen=True)
class Route:
    """Send ``weight`` of an adapter's requests to ``group`` (its copies share them evenly)."""

    group: str
    weight: float


@dataclass(frozen=True)
class ProfileRef:
    """The calibration profile a plan was made with; ``sha256`` pins its exact content."""

    name: str
    gpu: str
    model: str
    vllm_version: str
    sha256: str

    @classmethod
    def of(cls, profile: Profile) -> ProfileRef:
        return cls(profile.name, profile.gpu, profile.model, profile.vllm_version,
                   profile_sha256(profile))


@dataclass(frozen=True)
class WorkloadRef:
    """What was planned for: enough to re-run every replica in the twin from the plan alone."""

    name: str
    n_adapters: int
    total_rate_rps: float
    offered_total_tps: float
    lengths: Mapping[str, Any]

    def length_model(self) -> LengthModel:
        return LengthModel.from_dict(self.lengths, "workload.lengths")


def profile_sha256(profile: Profile) -> str:
    """Content hash of a profile (its canonical dict), so a plan names exactly what it used.
    The serving-path term is left out: it calibrates a deployment's path around the engine
    (the controller refits it online), and a plan stays the plan of the same engine profile."""
    d = profile.to_dict()
    d.pop("serving_path", None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import numpy

    try:
        lorafleet = version("lorafleet")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        lorafleet = "unknown"
    return {"lorafleet": lorafleet, "python": platform.python_version(), "numpy": numpy.__version__}


def utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def normalise_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Plain values (``starved`` a bool, numbers floats): plans dump and compare cleanly."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "starved":
            out[k] = bool(v)
        elif isinstance(v, bool | int | str) or v is None:
            out[k] = v
        else:
            out[k] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Replica groups + routing table + lower bound + provenance (docs/plan_format.md)."""

    policy: str
    predictor: str
    profile: ProfileRef
    workload: WorkloadRef
    groups: tuple[ReplicaGroup, ...]
    routing: Mapping[str, tuple[Route, ...]]
    lower_bound_replicas: int
    tool_versions: Mapping[str, str] = field(default_factory=tool_versions)
    created_at: str = field(default_factory=utc_now)
    plan_wall_s: float | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)  # the planning rule's knobs
    version: int = PLAN_FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(
            self, "routing", {a: tuple(routes) for a, routes in self.routing.items()}
        )
        _check_consistency(self)

    # -- derived figures --------------------------------------------------------------------
    @property
    def replicas(self) -> int:
        """GPUs the plan needs: every copy of every group."""
        return sum(g.copies for g in self.groups)

    def group(self, name: str) -> ReplicaGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def is_verified(self) -> bool:
        return bool(self.groups) and all(g.verified is not None for g in self.groups)

    def metrics_source(self) -> str:
        return "verified" if self.is_verified else "predicted"

    def starved_replicas(self, source: str | None = None) -> int:
        """Replicas (copies counted) predicted - or, once verified, measured - to starve."""
        src = source or self.metrics_source()
        return sum(g.copies for g in self.groups if bool(_metrics(g, src).get("starved")))

    def total(self, key: str, source: str | None = None) -> float:
        """Sum over every replica of a per-replica figure (e.g. total_throughput_tps)."""
        src = source or self.metrics_source()
        return float(sum(g.copies * float(_metrics(g, src).get(key, 0.0)) for g in self.groups))

    def worst(self, key: str, source: str | None = None) -> float:
        """Largest per-replica value of a figure (worst replica's TTFT p99, say)."""
        src = source or self.metrics_source()
        values = [float(_metrics(g, src).get(key, math.nan)) for g in self.groups]
        finite = [v for v in values if math.isfinite(v)]
        return max(finite) if finite else math.nan

    def with_verified(self, results: Mapping[str, Mapping[str, Any]]) -> Plan:
        """A copy whose groups carry the twin's per-replica figures (keyed by group name)."""
        groups = tuple(
            replace(g, verified=normalise_metrics(results[g.name])) if g.name in results else g
            for g in self.groups
        )
        return replace(self, groups=groups)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.version,
            "created_at": self.created_at,
            "policy": self.policy,
            "predictor": self.predictor,
            "tool_versions": dict(self.tool_versions),
            "profile": {k: getattr(self.profile, k) for k in _PROFILE_KEYS},
            "workload": {
                "name": self.workload.name,
                "n_adapters": self.workload.n_adapters,
                "total_rate_rps": self.workload.total_rate_rps,
                "offered_total_tps": self.workload.offered_total_tps,
                "lengths": dict(self.workload.lengths),
            },
            "settings": dict(self.settings),
            "lower_bound_replicas": self.lower_bound_replicas,
            "replicas": self.replicas,
            "plan_wall_s": self.plan_wall_s,
            "groups": [
                {
                    "name": g.name,
                    "copies": g.copies,
                    "engine": g.engine.to_dict(),
                    "adapters": [
                        {"id": a.id, "rank": a.rank, "rate_rps": a.rate_rps} for a in g.adapters
                    ],
                    "predicted": dict(g.predicted),
                    "headroom": g.headroom,
                    "verified": None if g.verified is None else dict(g.verified),
                }
                for g in self.groups
            ],
            "routing": {
                a: [{"group": r.group, "weight": r.weight} for r in routes]
                for a, routes in self.routing.items()
            },
        }

    def to_yaml(self, path: str | Path) -> None:
        """Write the plan; an empirical length file's path is made relative to the plan's folder."""
        path = Path(path)
        data = self.to_dict()
        lengths = data["workload"]["lengths"]
        if lengths.get("path"):
            folder = os.path.abspath(path.parent)
            lengths["path"] = os.path.relpath(os.path.abspath(lengths["path"]), folder)
        for g in data["groups"]:
            g["engine"] = _Flow(g["engine"])
            g["adapters"] = [_Flow(a) for a in g["adapters"]]
            g["predicted"] = _Flow(g["predicted"])
            if g["verified"] is not None:
                g["verified"] = _Flow(g["verified"])
        data["routing"] = {a: [_Flow(r) for r in rs] for a, rs in data["routing"].items()}
        data["workload"]["lengths"] = _Flow(lengths)
        header = (
            f"# lorafleet plan (format {self.version}; docs/plan_format.md): {self.replicas} "
            f"replica(s), lower bound {self.lower_bound_replicas}\n"
        )
        path.write_text(header + yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100))

    @classmethod
    def from_yaml(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise PlanFormatError(f"{path}: cannot read: {exc}") from None
        except yaml.YAMLError as exc:
            raise PlanFormatError(f"{path}: invalid YAML: {exc}") from None
        return cls.from_dict(data, base_dir=path.parent)

    @classmethod
    def from_dict(cls, d: Any, *, base_dir: str | Path | None = None) -> Plan:
        """Validate a parsed plan; every error message starts with the offending field's path."""
        d = _mapping(d, "plan")
        version = d.get("format_version")
        if "format_version" not in d:
            raise PlanFormatError("format_version: required")
        if isinstance(version, bool) or version != PLAN_FORMAT_VERSION:
            raise PlanFormatError(
                f"format_version: {version!r} is not supported (this lorafleet reads plan format "
                f"{PLAN_FORMAT_VERSION}); re-plan with `lorafleet plan` or upgrade lorafleet"
            )
        _keys(d, _TOP_KEYS, "")
        prof = _mapping(_req(d, "profile", ""), "profile")
        _keys(prof, _PROFILE_KEYS, "profile")
        profile = ProfileRef(**{k: _str(prof, k, "profile") for k in _PROFILE_KEYS})
        wl = _mapping(_req(d, "workload", ""), "workload")
        _keys(wl, _WORKLOAD_KEYS, "workload")
        lengths = dict(_mapping(_req(wl, "lengths", "workload"), "workload.lengths"))
        if lengths.get("path") and base_dir is not None and not os.path.isabs(lengths["path"]):
            lengths["path"] = str(Path(base_dir) / lengths["path"])
        try:
            LengthModel.from_dict(lengths, "workload.lengths")
        except WorkloadError as exc:
            raise PlanFormatError(str(exc)) from None
        workload = WorkloadRef(
            name=_str(wl, "name", "workload"),
            n_adapters=_int(wl, "n_adapters", "workload", minimum=0),
            total_rate_rps=_num(wl, "total_rate_rps", "workload"),
            offered_total_tps=_num(wl, "offered_total_tps", "workload"),
            lengths=lengths,
        )
        tools = _mapping(d.get("tool_versions", {}), "tool_versions")
        settings = _metric_map(d.get("settings") or {}, "settings", required=())
        groups_raw = _req(d, "groups", "")
        if not isinstance(groups_raw, list) or not groups_raw:
            raise PlanFormatError("groups: must be a non-empty list")
        groups = tuple(_group(g, f"groups[{i}]") for i, g in enumerate(groups_raw))
        routing_raw = _mapping(_req(d, "routing", ""), "routing")
        routing = {str(a): _routes(rs, f"routing.{a}") for a, rs in routing_raw.items()}
        wall = d.get("plan_wall_s")
        plan = cls(
            policy=_str(d, "policy", ""),
            predictor=_str(d, "predictor", ""),
            profile=profile,
            workload=workload,
            groups=groups,
            routing=routing,
            lower_bound_replicas=_int(d, "lower_bound_replicas", "", minimum=1),
            tool_versions={str(k): str(v) for k, v in tools.items()},
            created_at=_str(d, "created_at", ""),
            plan_wall_s=None if wall is None else _num(d, "plan_wall_s", ""),
            settings=settings,
        )
        if "replicas" in d and d["replicas"] != plan.replicas:
            raise PlanFormatError(
                f"replicas: {d['replicas']!r} disagrees with the groups' copies ({plan.replicas})"
            )
        return plan


def _metrics(g: ReplicaGroup, source: str) -> Mapping[str, Any]:
    if source == "verified":
        if g.verified is None:
            raise ValueError(f"group {g.name} is not verified")
        return g.verified
    return g.predicted


# ---------------------------------------------------------------------------------------------
# consistency (runs on every construction)
# ---------------------------------------------------------------------------------------------


def _check_consistency(plan: Plan) -> None:  # noqa: C901 - one check per rule, kept together
    if plan.version != PLAN_FORMAT_VERSION:
        raise PlanFormatError(f"format_version: must be {PLAN_FORMAT_VERSION}, got {plan.version}")
    if not isinstance(plan.lower_bound_replicas, int) or plan.lower_bound_replicas < 1:
        raise PlanFormatError(
            f"lower_bound_replicas: must be an integer >= 1, got {plan.lower_bound_replicas!r}"
        )
    if not plan.groups:
        raise PlanFormatError("groups: a plan needs at least one replica group")
    members: dict[str, dict[str, PlacedAdapter]] = {}
    for i, g in enumerate(plan.groups):
        where = f"groups[{i}]"
        if not isinstance(g.name, str) or not _NAME_RE.match(g.name):
            raise PlanFormatError(
                f"{where}.name: must be letters, digits, '-', '_' or '.', got {g.name!r}"
            )
        if g.name in members:
            raise PlanFormatError(f"{where}.name: duplicate group name {g.name!r}")
        if not isinstance(g.copies, int) or isinstance(g.copies, bool) or g.copies < 1:
            raise PlanFormatError(f"{where}.copies: must be an integer >= 1, got {g.copies!r}")
        if not isinstance(g.engine, EngineConfig):
            raise PlanFormatError(f"{where}.engine: must be an EngineConfig")
        if not g.adapters:
            raise PlanFormatError(f"{where}.adapters: a group needs at least one adapter")
        missing = [k for k in PREDICTED_METRICS if k not in g.predicted]
        if missing:
            raise PlanFormatError(f"{where}.predicted: missing {missing}")
        if g.verified is not None:
            missing = [k for k in PREDICTED_METRICS if k not in g.verified]
            if missing:
                raise PlanFormatError(f"{where}.verified: missing {missing}")
        ids: dict[str, PlacedAdapter] = {}
        for j, a in enumerate(g.adapters):
            aw = f"{where}.adapters[{j}]"
            if a.id in ids:
                raise PlanFormatError(f"{aw}.id: {a.id!r} appears twice in the group")
            if a.rank > g.engine.max_lora_rank:
                raise PlanFormatError(
                    f"{aw}.rank: {a.rank} exceeds {where}.engine.max_lora_rank "
                    f"({g.engine.max_lora_rank}); vLLM would refuse to load {a.id!r}"
                )
            if not math.isfinite(a.rate_rps) or a.rate_rps < 0:
                raise PlanFormatError(f"{aw}.rate_rps: must be finite and >= 0, got {a.rate_rps}")
            ids[a.id] = a
        members[g.name] = ids

    copies = {g.name: g.copies for g in plan.groups}
    routed: set[tuple[str, str]] = set()
    for adapter, routes in plan.routing.items():
        where = f"routing.{adapter}"
        if not routes:
            raise PlanFormatError(f"{where}: an adapter needs at least one route")
        seen: set[str] = set()
        for k, r in enumerate(routes):
            if r.group not in members:
                raise PlanFormatError(
                    f"{where}[{k}].group: {r.group!r} is not a group of this plan"
                )
            if r.group in seen:
                raise PlanFormatError(f"{where}[{k}].group: {r.group!r} listed twice")
            seen.add(r.group)
            if adapter not in members[r.group]:
                raise PlanFormatError(
                    f"{where}[{k}]: adapter {adapter!r} is not in group {r.group!r}"
                )
            if not (isinstance(r.weight, int | float) and 0.0 <= r.weight <= 1.0 + 1e-12):
                raise PlanFormatError(f"{where}[{k}].weight: must be within [0, 1], got {r.weight}")
            routed.add((adapter, r.group))
        total = sum(r.weight for r in routes)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise PlanFormatError(f"{where}: weights sum to {total:.9g}, must sum to 1")
        traffic = [members[r.group][adapter].rate_rps * copies[r.group] for r in routes]
        if sum(traffic) > 0:
            for k, (r, t) in enumerate(zip(routes, traffic, strict=True)):
                share = t / sum(traffic)
                if abs(share - r.weight) > WEIGHT_TOLERANCE:
                    raise PlanFormatError(
                        f"{where}[{k}].weight: {r.weight:.9g} disagrees with the share of "
                        f"{adapter!r}'s traffic group {r.group!r} serves ({share:.9g} = "
                        "rate_rps x copies over all its groups)"
                    )
    for i, g in enumerate(plan.groups):
        for j, a in enumerate(g.adapters):
            if (a.id, g.name) not in routed:
                raise PlanFormatError(
                    f"groups[{i}].adapters[{j}]: {a.id!r} is in group {g.name!r} but "
                    f"routing.{a.id} does not send it there"
                )
    if plan.workload.n_adapters != len(plan.routing):
        raise PlanFormatError(
            f"routing: routes {len(plan.routing)} adapter(s), workload.n_adapters is "
            f"{plan.workload.n_adapters}"
        )


# ---------------------------------------------------------------------------------------------
# field validators (messages start with the path)
# ---------------------------------------------------------------------------------------------


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise PlanFormatError(f"{where}: must be a mapping, got {type(v).__name__}")
    return v


def _keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for k in d:
        if k not in allowed:
            raise PlanFormatError(f"{_path(where, str(k))}: unknown field; known: {list(allowed)}")


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise PlanFormatError(f"{_path(where, key)}: required")
    return d[key]


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = _req(d, key, where)
    if not isinstance(v, str) or not v:
        raise PlanFormatError(f"{_path(where, key)}: must be a non-empty string, got {v!r}")
    return v


def _int(d: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int:
    v = _req(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise PlanFormatError(f"{_path(where, key)}: must be an integer >= {minimum}, got {v!r}")
    return v


def _num(d: Mapping[str, Any], key: str, where: str) -> float:
    v = _req(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise PlanFormatError(f"{_path(where, key)}: must be a finite number >= 0, got {v!r}")
    return float(v)


def _metric_map(
    v: Any, where: str, required: Sequence[str] = PREDICTED_METRICS
) -> dict[str, Any]:
    m = _mapping(v, where)
    for k, x in m.items():
        if not (x is None or isinstance(x, bool | int | float | str)):
            raise PlanFormatError(f"{where}.{k}: must be a number, got {x!r}")
    missing = [k for k in required if k not in m]
    if missing:
        raise PlanFormatError(f"{where}: missing {missing}")
    return normalise_metrics(m)


def _group(g: Any, where: str) -> ReplicaGroup:
    g = _mapping(g, where)
    _keys(g, _GROUP_KEYS, where)
    engine_raw = dict(_mapping(_req(g, "engine", where), f"{where}.engine"))
    try:
        engine = EngineConfig.from_dict(engine_raw, where=f"{where}.engine")
    except ConfigError as exc:
        raise PlanFormatError(str(exc)) from None
    except TypeError as exc:
        raise PlanFormatError(f"{where}.engine: {exc}") from None
    adapters_raw = _req(g, "adapters", where)
    if not isinstance(adapters_raw, list) or not adapters_raw:
        raise PlanFormatError(f"{where}.adapters: must be a non-empty list")
    adapters = []
    for j, a in enumerate(adapters_raw):
        aw = f"{where}.adapters[{j}]"
        a = _mapping(a, aw)
        _keys(a, _ADAPTER_KEYS, aw)
        adapters.append(PlacedAdapter(
            _str(a, "id", aw), _int(a, "rank", aw, minimum=1), _num(a, "rate_rps", aw)
        ))
    headroom = g.get("headroom")
    verified = g.get("verified")
    return ReplicaGroup(
        name=_str(g, "name", where),
        adapters=tuple(adapters),
        engine=engine,
        copies=_int(g, "copies", where, minimum=1),
        predicted=_metric_map(_req(g, "predicted", where), f"{where}.predicted"),
        headroom=None if headroom is None else _num(g, "headroom", where),
        verified=None if verified is None else _metric_map(verified, f"{where}.verified"),
    )


def _routes(rs: Any, where: str) -> tuple[Route, ...]:
    if not isinstance(rs, list) or not rs:
        raise PlanFormatError(f"{where}: must be a non-empty list of {{group, weight}}")
    out = []
    for k, r in enumerate(rs):
        rw = f"{where}[{k}]"
        r = _mapping(r, rw)
        _keys(r, _ROUTE_KEYS, rw)
        out.append(Route(_str(r, "group", rw), _num(r, "weight", rw)))
    return tuple(out)


class _Flow(dict):
    """Marker: dump this mapping on one line (keeps 10,000-adapter plans readable)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data.items(), True)
)
