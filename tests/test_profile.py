"""Profiles: shipped ones load, files are validated with errors naming the field, and
infeasible engine configs say what would fit."""

from __future__ import annotations

import pytest
import yaml

from twin.config import ConfigError, EngineConfig
from twin.profile import (
    InfeasibleConfigError,
    KVCapacityModel,
    Profile,
    ProfileError,
    available_profiles,
    load_profile,
)

SHIPPED = ["llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_by_the_reference_model_name(name):
    p = load_profile(name)
    assert p.model == name
    assert p.vllm_version == "0.8.5"
    assert p.step_model.const > 0 and p.step_model.prefill_tokens > 0
    assert p.scheduler.kv_preallocate_blocks == 0  # 0.8.5 removed preallocation
    assert name in available_profiles()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_reproduce_their_kv_probes(name):
    p = load_profile(name)
    for g, r, tokens in p.kv_capacity.points:
        assert p.kv_capacity.tokens(g, r) == tokens


def test_kv_capacity_falls_with_slots_and_rank():
    p = load_profile("llama-3.1-8b-instruct")
    kv = p.kv_capacity
    assert kv.tokens(16, 8) > kv.tokens(64, 8) > kv.tokens(64, 16) > kv.tokens(64, 32)
    assert kv.tokens(1, 8, enable_lora=False) >= kv.tokens(8, 8)


def test_infeasible_config_names_what_fits():
    p = load_profile("llama-3.1-8b-instruct")
    # the reference probes: rank 32 with 128 slots failed to start on the H100
    with pytest.raises(InfeasibleConfigError) as exc:
        p.check_feasible(EngineConfig(max_loras=128, max_lora_rank=32))
    msg = str(exc.value)
    assert "max_loras=128" in msg and "131,072" in msg and "What fits" in msg
    fit = int(msg.split("max_loras <= ")[1].split(" ")[0])
    assert 96 <= fit < 128  # the probes: 96 x 32 started, 128 x 32 did not
    assert p.check_feasible(EngineConfig(max_loras=fit, max_lora_rank=32)) >= 131072
    # a shorter max_model_len makes it feasible, as the message says
    assert p.check_feasible(EngineConfig(max_loras=128, max_lora_rank=32, max_model_len=8192))


def test_profile_round_trips_through_yaml(tmp_path):
    p = load_profile("qwen-2.5-7b-instruct")
    path = tmp_path / "p.yaml"
    p.to_yaml(path)
    q = load_profile(path)
    assert q.step_model == p.step_model
    assert q.kv_capacity == p.kv_capacity
    assert q.adapter_loads == p.adapter_loads


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("model"), "model"),
        (lambda d: d["step_model"].update(const="fast"), "const"),
        (lambda d: d["step_model"].update(bogus=1.0), "bogus"),
        (lambda d: d["kv_capacity"].pop("base_tokens"), "kv_capacity.base_tokens"),
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["scheduler"].update(kv_preallocate_blocks=-1), "kv_preallocate_blocks"),
    ],
)
def test_bad_profile_files_are_errors_naming_the_field(tmp_path, mutate, field):
    d = load_profile("llama-3.1-8b-instruct").to_dict()
    mutate(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises((ProfileError, ValueError), match=field):
        Profile.from_yaml(path)


def test_unknown_profile_name_lists_the_available_ones():
    with pytest.raises(ProfileError, match="llama-3.1-8b-instruct"):
        load_profile("no-such-gpu")


def test_kv_law_outside_the_probes():
    kv = KVCapacityModel(1000.0, 1.0, 0.5, 1200.0, ((10, 8, 950),))
    assert kv.tokens(10, 8) == 1000 - 10 * (1 + 4)  # one point only: the law
    assert kv.max_loras_fitting(8, need_tokens=900) == 20


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_loras": 0}, "max_loras"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"),
        ({"max_lora_rank": 12}, "max_lora_rank"),
        ({"max_num_seqs": 512, "max_num_batched_tokens": 256}, "max_num_batched_tokens"),
    ],
)
def test_engine_config_rejects_what_vllm_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**kwargs)
