"""Shared fixtures: small hand-checkable profiles, and the one Ray cluster of a test session."""

from __future__ import annotations

import pytest

from twin.latency import StepTimeModel
from twin.profile import AdapterLoadTable, KVCapacityModel, Profile, SchedulerQuirks


def make_profile(
    *,
    kv_tokens: int = 1 << 20,
    max_model_len: int = 4096,
    const_ms: float = 10.0,
    prefill_ms_per_token: float = 0.0,
    decode_ms_per_seq: float = 0.0,
    ctx_ms_per_ktoken: float = 0.0,
    lora_adapter_ms: float = 0.0,
    gpu_load_ms: float = 0.0,
    disk_load_ms: float = 0.0,
    preallocate_blocks: int = 0,
    admit_only_if_prompt_fits: bool = False,
    graph_max_tokens: int = 0,
    graph_ms_per_token: float = 0.0,
    eager_ms: float = 0.0,
    lora_ms_per_ktoken: float = 0.0,
    scan_us_per_waiting: float = 0.0,
) -> Profile:
    """A profile whose step time is easy to compute by hand (default: every step 10 ms)."""
    return Profile(
        name="hand",
        gpu="none",
        model="hand-model",
        vllm_version="test",
        max_model_len=max_model_len,
        step_model=StepTimeModel(
            const=const_ms,
            prefill_tokens=prefill_ms_per_token,
            eager_decode_seqs=decode_ms_per_seq,
            ctx_ktokens=ctx_ms_per_ktoken,
            lora_adapters=lora_adapter_ms,
            graph_decode_tokens=graph_ms_per_token,
            eager_const=eager_ms,
            lora_ktokens=lora_ms_per_ktoken,
            lora_slot_mtokens=lora_ms_per_ktoken,
            lora_shrink_kctas=lora_ms_per_ktoken / 10,
            cuda_graph_max_tokens=graph_max_tokens,  # default 0: every step eager, no padding
        ),
        kv_capacity=KVCapacityModel(kv_tokens, 0.0, 0.0, kv_tokens, ()),
        adapter_loads=AdapterLoadTable({}, {}, gpu_load_ms, disk_load_ms),
        scheduler=SchedulerQuirks(
            kv_preallocate_blocks=preallocate_blocks,
            admit_only_if_prompt_fits=admit_only_if_prompt_fits,
            scan_us_per_waiting=scan_us_per_waiting,
        ),
    )


@pytest.fixture
def hand_profile() -> Profile:
    return make_profile()


def wait_cpus_free(need: float, timeout_s: float = 180.0) -> None:
    """Wait (bounded) until the session's cluster has ``need`` CPUs free: the replicas of an
    earlier test's deleted application release theirs asynchronously (a vLLM engine takes
    seconds to stop on a slow machine), and the cluster reports free resources with a lag."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while (free := float(ray.available_resources().get("CPU", 0.0))) < need:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the test cluster still has only {free:g} CPU free after {timeout_s:g} s "
                f"(need {need:g}): an earlier test's replicas were not released"
            )
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One private Ray head + Serve HTTP proxy shared by every integration test of the session.

    Started on free ports with its own temp dir (other Ray clusters may run on this machine) and
    stopped by PID at the end; yields ``.url`` (Serve's HTTP address) and ``.address``. Tests
    deploy applications under their own names and delete them when done.
    """
    from types import SimpleNamespace

    from orchestrator.control.cluster import LocalHead, connect, free_port

    head = LocalHead.start(num_cpus=4, log_dir=tmp_path_factory.mktemp("ray-head"))
    try:
        import ray
        from ray import serve

        connect(head.address)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield SimpleNamespace(head=head, address=head.address, url=f"http://127.0.0.1:{port}",
                              wait_cpus_free=wait_cpus_free)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    finally:
        head.stop()
