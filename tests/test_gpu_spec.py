"""GPU engine replicas where the GPUs are (no Ray needed): a replica asks for the GPUs the
cluster has, the GPU build's settings only on GPUs, a plan needing more GPUs than exist is
refused saying what exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.serving.app import engine_options
from orchestrator.serving.spec import ServingSpec, SpecError
from orchestrator.serving.vllm_engine import engine_env
from placement.synthetic import GroupShape, synthetic_plan


def _spec(tmp_path: Path, engine: str = "vllm", **args) -> ServingSpec:
    plan = synthetic_plan([GroupShape("hot", [("h", 8)], copies=2),
                           GroupShape("cold", [("c1", 8), ("c2", 16)], max_loras=1)])
    plan.to_yaml(tmp_path / "plan.yaml")
    reg = tmp_path / "adapters.yaml"
    reg.write_text("base_model: meta-llama/Llama-3.1-8B-Instruct\nadapters:\n"
                   + "".join(f"  - {{id: {a}, path: {tmp_path}/{a}, rank: {r}}}\n"
                             for a, r in (("h", 8), ("c1", 8), ("c2", 16))))
    for a in ("h", "c1", "c2"):
        (tmp_path / a).mkdir(exist_ok=True)
        (tmp_path / a / "adapter_config.json").write_text("{}")
    return ServingSpec.from_args({"plan_path": str(tmp_path / "plan.yaml"), "engine": engine,
                                  "adapter_registry": str(reg), **args})


def test_replicas_ask_for_the_gpus_the_cluster_has(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    assert spec.replica_gpus is None  # unresolved until the cluster is known
    gpu = spec.for_cluster(8.0)
    cpu = spec.for_cluster(0.0)
    assert gpu.gpus_per_replica == 1.0 and cpu.gpus_per_replica == 0.0
    tp = _spec(tmp_path, tensor_parallel_size=2).for_cluster(8.0)
    assert tp.gpus_per_replica == 2.0
    assert _spec(tmp_path, replica_gpus=0).for_cluster(8.0).gpus_per_replica == 0.0  # explicit

    g = gpu.replica_specs()
    c = cpu.replica_specs()
    # the GPU build: the plan's max_loras as planned, no CPU environment, GPUs reserved
    assert [r.engine.max_loras for r in g] == [gr.engine.max_loras for gr in gpu.plan.groups
                                               for _ in range(gr.copies)]
    assert all(r.engine.max_loras == p.engine.max_loras + 1 for r, p in zip(
        c[2:], cpu.plan.groups[1:], strict=True))  # the CPU build keeps one slot spare
    env_gpu, env_cpu = engine_env(g[0]), engine_env(c[0])
    assert "VLLM_CPU_KVCACHE_SPACE" not in env_gpu and "OMP_NUM_THREADS" not in env_gpu
    assert env_cpu["VLLM_CPU_KVCACHE_SPACE"] == "1" and env_cpu["OMP_NUM_THREADS"] == "1"
    typed = _spec(tmp_path, accelerator_type="H100").for_cluster(8.0)
    opts = engine_options(typed, typed.replica_specs()[0])["ray_actor_options"]
    assert opts["num_gpus"] == 1.0 and opts["accelerator_type"] == "H100"
    assert "num_gpus" not in engine_options(cpu, c[0])["ray_actor_options"]


def test_a_plan_needing_more_gpus_than_exist_is_refused_saying_what_exists(tmp_path) -> None:
    spec = _spec(tmp_path, accelerator_type="H100").for_cluster(4.0)  # 3 replicas x 1 GPU
    h100 = {"GPU": 2.0, "accelerator_type:H100": 1.0}
    a10 = {"GPU": 2.0, "accelerator_type:A10G": 1.0}
    spec.check_gpus([{"CPU": 8.0}, h100, h100])  # 4 H100s: fits
    with pytest.raises(SpecError, match=r"need 3 H100 GPUs; the cluster has 2 \(2 replica"):
        spec.check_gpus([{"CPU": 8.0}, h100, a10])
    tp = _spec(tmp_path, tensor_parallel_size=2).for_cluster(4.0)
    with pytest.raises(SpecError, match=r"need 6 GPUs; the cluster has 6 \(2 replica"):
        tp.check_gpus([{"GPU": 3.0}, {"GPU": 3.0}])  # a replica's GPUs are on one node
    _spec(tmp_path).for_cluster(0.0).check_gpus([{"CPU": 2.0}])  # CPU build: nothing to check
    for bad, field in (({"replica_gpus": -1}, "replica_gpus"),
                       ({"accelerator_type": ""}, "accelerator_type"),
                       ({"replica_gpus": 1, "tensor_parallel_size": 2}, "replica_gpus"),
                       ({"tensor_parallel_size": 0}, "tensor_parallel_size")):
        with pytest.raises(SpecError, match=field):
            _spec(tmp_path, **bad)


