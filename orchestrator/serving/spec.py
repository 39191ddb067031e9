"""From a plan to what runs: one ``ReplicaSpec`` per copy of every group, the routing table and
the ingress settings. Validated in the deploying process, before any Ray actor starts.

``ServingSpec.from_args`` takes the same plain mapping Ray Serve passes to an application builder
(``orchestrator.serving.app:build_app``; the KubeRay manifest gives only ``plan_path``), so
``lorafleet deploy`` and a RayService build identical applications. Keys:

``plan_path`` (required), ``engine`` (``vllm`` | ``sim``, default vllm), ``model`` (tiny-model
directory with ``adapters.yaml``, or a base model path / hub id), ``adapter_registry`` (registry
YAML; default the model directory's ``adapters.yaml``), ``adapter_roots`` (allowed folders for
local adapter paths; default the registry's folder), ``api_keys`` (a keys mapping, hashed, see
orchestrator/serving/api_keys.py), ``base_model_name`` (default: the plan profile's model),
``max_model_len``, ``replica_cpus``, ``replica_gpus``, ``accelerator_type``,
``tensor_parallel_size``, ``ingress_replicas``, ``timeout_s``, ``sim_time_scale``,
``omp_threads``, ``kv_cache_gib``, ``listen`` (``HOST:PORT``: the ingress serves HTTP itself
there, orchestrator/serving/listener.py; default only through Serve's proxy),
``max_body_bytes``.

GPUs: ``replica_gpus`` unset means "what the cluster has": each engine replica asks for
``tensor_parallel_size`` GPUs (default 1) on a cluster with GPUs, none on a CPU-only one
(``for_cluster``; ``lorafleet deploy`` resolves it once connected). A replica with GPUs gets
the GPU build's settings; the CPU build's environment (KV-cache space, OMP threads) and its
spare adapter slot apply only to replicas without GPUs. ``accelerator_type`` (``H100``, ``A10G``,
... as Ray names them) pins replicas to nodes of that type. A RayService, whose GPU workers
may scale from zero when the application is built, sets ``replica_gpus`` explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.serving.api_keys import ApiKeys
from orchestrator.serving.backend import ENGINE_KINDS
from orchestrator.serving.listener import ListenError, parse_listen
from orchestrator.serving.openai_schema import DEFAULT_MAX_BODY_BYTES, MAX_BODY_BYTES
from orchestrator.serving.registry import AdapterEntry, AdapterRegistry, RegistryError
from orchestrator.serving.routing import ReplicaId, RoutingTable
from placement.plan import Plan
from twin.config import EngineConfig

_KEYS = {
    "plan_path", "engine", "model", "adapter_registry", "adapter_roots", "api_keys",
    "base_model_name", "max_model_len", "replica_cpus", "replica_gpus", "ingress_replicas",
    "timeout_s", "sim_time_scale", "omp_threads", "kv_cache_gib", "listen", "max_body_bytes",
    "accelerator_type", "tensor_parallel_size",
}


class SpecError(ValueError):
    """A deployment that cannot be built; the message names the argument."""


@dataclass(frozen=True)
class ReplicaSpec:
    """One copy of a replica group, ready to start (see module docstring)."""

    group: str
    copy: int
    engine_kind: str
    engine: EngineConfig
    adapters: tuple[AdapterEntry, ...]
    model: str  # base model path/URI (vllm) or a label (sim)
    model_name: str = "base"  # what clients call the base model
    profile: str = "tiny-llama-cpu"  # step-time model of the sim backend
    max_model_len: int | None = None
    predicted: Mapping[str, Any] = field(default_factory=dict)
    kv_cache_gib: float = 1.0  # CPU vLLM: VLLM_CPU_KVCACHE_SPACE
    omp_threads: int = 1  # CPU vLLM: torch threads per replica
    sim_time_scale: float = 1.0
    gpus: float = 0.0  # GPUs the replica holds: 0 = the CPU build
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.engine_kind not in ENGINE_KINDS:
            raise ValueError(f"engine: must be one of {list(ENGINE_KINDS)}, "
                             f"got {self.engine_kind!r}")
        if self.copy < 0:
            raise ValueError(f"copy: must be >= 0, got {self.copy}")
        too_big = [a.id for a in self.adapters if a.rank > self.engine.max_lora_rank]
        if too_big:
            raise ValueError(f"group {self.group}: adapters {too_big[:5]} exceed max_lora_rank "
                             f"{self.engine.max_lora_rank}")

    @property
    def replica_id(self) -> ReplicaId:
        return ReplicaId(self.group, self.copy)


@dataclass(frozen=True)
class ServingSpec:
    plan_path: str
    plan: Plan
    engine: str
    model: str
    registry: AdapterRegistry
    base_model_name: str
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}))
    max_model_len: int | None = None
    replica_cpus: float = 0.5
    replica_gpus: float | None = None  # None: what the cluster has (module docstring)
    accelerator_type: str | None = None
    tensor_parallel_size: int = 1
    ingress_replicas: int = 1
    timeout_s: float = 300.0
    sim_time_scale: float = 1.0
    omp_threads: int = 1
    kv_cache_gib: float = 1.0
    listen: tuple[str, int] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    args: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ServingSpec:
        unknown = sorted(set(args) - _KEYS)
        if unknown:
            raise SpecError(f"unknown argument(s) {unknown}; known: {sorted(_KEYS)}")
        if "plan_path" not in args:
            raise SpecError("plan_path: required (the plan YAML of `lorafleet plan`)")
        plan_path = str(Path(str(args["plan_path"])).expanduser().resolve())
        plan = Plan.from_yaml(plan_path)
        engine = str(args.get("engine", "vllm"))
        if engine not in ENGINE_KINDS:
            raise SpecError(f"engine: must be one of {list(ENGINE_KINDS)}, got {engine!r}")
        ranks = {a.id: a.rank for g in plan.groups for a in g.adapters}
        model = args.get("model") or os.environ.get("LORAFLEET_MODEL")
        roots = args.get("adapter_roots") or None
        reg_path = args.get("adapter_registry")
        if reg_path:
            registry = AdapterRegistry.from_yaml(reg_path, roots=roots)
        elif model and Path(str(model), "adapters.yaml").is_file():
            registry = AdapterRegistry.from_model_dir(str(model), roots=roots)
        elif engine == "sim":
            registry = AdapterRegistry.ranks_only(ranks)
        else:
            raise SpecError("engine vllm needs --model (a tiny-model directory with "
                            "adapters.yaml) or --adapter-registry REGISTRY.yaml")
        if engine == "vllm":
            if not model and not registry.base_model:
                raise SpecError("engine vllm needs --model: the base model (or tiny-model dir)")
            missing = [a for a in ranks if a not in registry]
            if missing:
                raise RegistryError(
                    f"{len(missing)} plan adapter(s) are not in the adapter registry: "
                    f"{', '.join(missing[:8])}; build the model with more adapters "
                    "(`lorafleet tiny-model --adapters N`) or use a matching registry")
            registry.check_ranks(ranks)
            base = registry.base_model if model and Path(str(model), "adapters.yaml").is_file() \
                else (str(model) if model else registry.base_model)
            model_str = str(base)
        else:
            for a in ranks:
                if a not in registry:
                    registry = AdapterRegistry.ranks_only(ranks)
                    break
            model_str = f"sim:{plan.profile.name}"
        keys = args.get("api_keys")
        api_keys = keys if isinstance(keys, ApiKeys) else ApiKeys.from_dict(keys)
        gpus = args.get("replica_gpus")
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int | float)
                                 or gpus < 0):
            raise SpecError(f"replica_gpus: must be a number >= 0, got {gpus!r}")
        accel = args.get("accelerator_type")
        if accel is not None and (not isinstance(accel, str) or not accel.strip()):
            raise SpecError(f"accelerator_type: must be a GPU type such as 'H100', got {accel!r}")
        spec = cls(
            plan_path=plan_path, plan=plan, engine=engine, model=model_str, registry=registry,
            base_model_name=str(args.get("base_model_name") or plan.profile.model),
            api_keys=api_keys,
            max_model_len=_opt_int(args, "max_model_len"),
            replica_cpus=float(args.get("replica_cpus", 0.5 if engine == "vllm" else 0.05)),
            replica_gpus=None if gpus is None else float(gpus),
            accelerator_type=accel,
            tensor_parallel_size=_opt_int(args, "tensor_parallel_size") or 1,
            ingress_replicas=int(args.get("ingress_replicas", 1)),
            timeout_s=float(args.get("timeout_s", 300.0)),
            sim_time_scale=float(args.get("sim_time_scale", 1.0)),
            omp_threads=int(args.get("omp_threads", 1)),
            kv_cache_gib=float(args.get("kv_cache_gib", 1.0)),
            listen=_listen(args.get("listen")),
            max_body_bytes=_opt_int(args, "max_body_bytes") or DEFAULT_MAX_BODY_BYTES,
            args=dict(args),
        )
        if spec.base_model_name in ranks:
            raise SpecError(f"base_model_name {spec.base_model_name!r} clashes with an adapter id")
        if spec.replica_gpus is not None and spec.replica_gpus < spec.tensor_parallel_size \
                and spec.replica_gpus > 0:
            raise SpecError(f"replica_gpus: {spec.replica_gpus:g} is fewer than "
                            f"tensor_parallel_size {spec.tensor_parallel_size}")
        if spec.max_body_bytes > MAX_BODY_BYTES:
            raise SpecError(f"max_body_bytes: at most {MAX_BODY_BYTES} (a request crosses Ray "
                            f"as one message, capped at 4 MiB), got {spec.max_body_bytes}")
        if spec.ingress_replicas < 1 or spec.timeout_s <= 0 or spec.sim_time_scale <= 0:
            raise SpecError("ingress_replicas, timeout_s and sim_time_scale must be positive")
        return spec

    def to_args(self) -> dict[str, Any]:
        """Plain (JSON-able) builder arguments, API keys hashed."""
        out = {k: v for k, v in self.args.items() if k != "api_keys"}
        out["plan_path"] = self.plan_path
        if self.api_keys.enabled:
            out["api_keys"] = self.api_keys.to_dict()
        return out

    def with_(self, **changes: Any) -> ServingSpec:
        return replace(self, **changes)

    # -- the cluster --------------------------------------------------------------------------
    @property
    def gpus_per_replica(self) -> float:
        """GPUs each engine replica asks for (0 while ``replica_gpus`` is unresolved)."""
        return self.replica_gpus or 0.0

    def for_cluster(self, cluster_gpus: float) -> ServingSpec:
        """``replica_gpus`` resolved for a cluster with ``cluster_gpus`` GPUs (module notes)."""
        if self.replica_gpus is not None:
            return self
        return self.with_(replica_gpus=float(self.tensor_parallel_size) if cluster_gpus > 0
                          else 0.0)

    def check_gpus(self, nodes: Sequence[Mapping[str, float]]) -> None:
        """Refuse a deployment whose engines need more GPUs than the cluster's alive ``nodes``
        (their Ray resources) have: before anything starts, saying what exists. A replica
        fits on one node (of ``accelerator_type`` when set) with ``gpus_per_replica`` free."""
        per = self.gpus_per_replica
        if per <= 0:
            return
        n = sum(g.copies for g in self.plan.groups)
        typed = [r for r in nodes if not self.accelerator_type
                 or r.get(f"accelerator_type:{self.accelerator_type}", 0.0) > 0]
        have = sum(float(r.get("GPU", 0.0)) for r in typed)
        fits = sum(int(float(r.get("GPU", 0.0)) // per + 1e-9) for r in typed)
        if n > fits:
            what = f"{self.accelerator_type} GPUs" if self.accelerator_type else "GPUs"
            raise SpecError(
                f"the plan's {n} engine replica(s) x {per:g} GPU need {n * per:g} {what}; the "
                f"cluster has {have:g} ({fits} replica(s) fit). Add GPU nodes, plan for fewer "
                "replicas, or on an autoscaling cluster pass --wait-for-gpus (replicas then "
                "wait for nodes)")

    # -- what runs ----------------------------------------------------------------------------
    def routing_table(self, seed: int = 0) -> RoutingTable:
        return RoutingTable.from_plan(self.plan, base_model=self.base_model_name, seed=seed)

    def replica_specs(self) -> list[ReplicaSpec]:
        """One spec per copy. On CPU vLLM one max_loras slot is kept spare (a base request
        batched with LoRA requests gets the wrong adapter when all slots are full,
        vllm-cpu 0.32.0); on the sim the plan's config is used as is."""
        out: list[ReplicaSpec] = []
        profile_len = None
        try:
            from twin.profile import load_profile

            profile_len = load_profile(self.plan.profile.name).max_model_len
        except Exception:
            profile_len = None
        for g in self.plan.groups:
            engine = g.engine
            if self.engine == "vllm" and self.gpus_per_replica == 0:
                engine = engine.with_(max_loras=min(engine.max_loras, len(g.adapters)) + 1,
                                      max_cpu_loras=max(engine.cpu_slots, len(g.adapters) + 1))
            mml = self.max_model_len or engine.max_model_len or profile_len
            for c in range(g.copies):
                out.append(ReplicaSpec(
                    group=g.name, copy=c, engine_kind=self.engine, engine=engine,
                    adapters=self.registry.subset(g.adapter_ids), model=self.model,
                    model_name=self.base_model_name, profile=self.plan.profile.name,
                    max_model_len=mml, predicted=dict(g.verified or g.predicted),
                    kv_cache_gib=self.kv_cache_gib, omp_threads=self.omp_threads,
                    sim_time_scale=self.sim_time_scale, gpus=self.gpus_per_replica,
                    tensor_parallel_size=self.tensor_parallel_size,
                ))
        return out


def _listen(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_listen(value)
    except ListenError as exc:
        raise SpecError(str(exc)) from None


def _opt_int(args: Mapping[str, Any], key: str) -> int | None:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SpecError(f"{key}: must be a positive integer, got {v!r}")
    return v
