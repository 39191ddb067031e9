"""Calibration profile: everything the twin knows about one (GPU, base model, vLLM version).

A profile is data (YAML under ``profiles/``); this module loads, validates and queries it:
step-time coefficients, KV-cache capacity as a function of (max_loras, max_lora_rank), adapter
load latencies, the scheduler details that changed across vLLM versions, and (when measured)
what the serving path adds to a client's latency (``twin.serving_path``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from twin.config import EngineConfig
from twin.latency import StepTimeModel
from twin.serving_path import ServingPath, ServingPathError

PROFILE_FORMAT_VERSION = 1
REPO_PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ProfileError(ValueError):
    """A profile file that is missing, malformed, or asked for a config it cannot serve."""


class InfeasibleConfigError(ValueError):
    """An engine config that cannot start on this GPU (the message says what would fit)."""


def _num(d: dict[str, Any], key: str, where: str, *, minimum: float | None = None) -> float:
    if key not in d:
        raise ProfileError(f"{where}.{key}: missing")
    value = d[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProfileError(f"{where}.{key}: must be a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProfileError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return float(value)


@dataclass(frozen=True)
class KVCapacityModel:
    """KV-cache tokens left after weights and LoRA slot buffers.

    vLLM pre-allocates max_loras slots of max_lora_rank each, so KV capacity falls linearly in
    max_loras with a slope that grows with rank: tokens = base - max_loras*(per_slot +
    per_slot_rank*rank). Measured points are used where available (interpolated along max_loras
    at the same rank), the linear law elsewhere.
    """

    base_tokens: float
    per_slot_tokens: float
    per_slot_rank_tokens: float
    no_lora_tokens: float
    points: tuple[tuple[int, int, int], ...] = ()  # (max_loras, max_lora_rank, kv_tokens)

    def tokens(self, max_loras: int, max_lora_rank: int, enable_lora: bool = True) -> int:
        if not enable_lora:
            return int(self.no_lora_tokens)
        same_rank = sorted((g, t) for g, r, t in self.points if r == max_lora_rank)
        if len(same_rank) >= 2 and same_rank[0][0] <= max_loras <= same_rank[-1][0]:
            gs, ts = zip(*same_rank, strict=True)
            return int(np.interp(max_loras, gs, ts))
        law = self.base_tokens - max_loras * (
            self.per_slot_tokens + self.per_slot_rank_tokens * max_lora_rank
        )
        return int(law)

    def max_loras_fitting(self, max_lora_rank: int, need_tokens: int, upper: int = 4096) -> int:
        """Largest max_loras whose KV capacity still holds ``need_tokens`` (0 if none)."""
        best = 0
        for g in range(1, upper + 1):
            if self.tokens(g, max_lora_rank) >= need_tokens:
                best = g
            elif g > best + 64:
                break
        return best

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_tokens": self.base_tokens,
            "per_slot_tokens": self.per_slot_tokens,
            "per_slot_rank_tokens": self.per_slot_rank_tokens,
            "no_lora_tokens": self.no_lora_tokens,
            "points": [list(p) for p in self.points],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "kv_capacity") -> KVCapacityModel:
        points = []
        for i, p in enumerate(d.get("points", [])):
            if not (isinstance(p, (list, tuple)) and len(p) == 3):
                raise ProfileError(
                    f"{where}.points[{i}]: must be [max_loras, max_lora_rank, kv_tokens]"
                )
            points.append((int(p[0]), int(p[1]), int(p[2])))
        return cls(
            base_tokens=_num(d, "base_tokens", where, minimum=1),
            per_slot_tokens=_num(d, "per_slot_tokens", where),
            per_slot_rank_tokens=_num(d, "per_slot_rank_tokens", where),
            no_lora_tokens=_num(d, "no_lora_tokens", where, minimum=1),
            points=tuple(points),
        )


@dataclass(frozen=True)
class AdapterLoadTable:
    """Measured adapter load latencies (ms).

    ``gpu_ms`` is a CPU->GPU slot activation keyed by (max_lora_rank, adapter_rank): a small
    adapter in a large slot is *slower* (the slot is zero-padded), so the key needs both.
    ``disk_ms`` is a disk->CPU load keyed by adapter rank.
    """

    gpu_ms: dict[tuple[int, int], float]
    disk_ms: dict[int, float]
    default_gpu_ms: float
    default_disk_ms: float

    def gpu_load_ms(self, max_lora_rank: int, adapter_rank: int) -> float:
        return self.gpu_ms.get((max_lora_rank, adapter_rank), self.default_gpu_ms)

    def disk_load_ms(self, adapter_rank: int) -> float:
        return self.disk_ms.get(adapter_rank, self.default_disk_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_ms": [[r, a, v] for (r, a), v in sorted(self.gpu_ms.items())],
            "disk_ms": [[a, v] for a, v in sorted(self.disk_ms.items())],
            "default_gpu_ms": self.default_gpu_ms,
            "default_disk_ms": self.default_disk_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "adapter_loads") -> AdapterLoadTable:
        try:
            gpu = {(int(r), int(a)): float(v) for r, a, v in d.get("gpu_ms", [])}
            disk = {int(a): float(v) for a, v in d.get("disk_ms", [])}
        except (TypeError, ValueError):
            raise ProfileError(
                f"{where}: gpu_ms rows are [max_lora_rank, adapter_rank, ms], "
                "disk_ms rows are [adapter_rank, ms]"
            ) from None
        return cls(
            gpu_ms=gpu,
            disk_ms=disk,
            default_gpu_ms=_num(d, "default_gpu_ms", where, minimum=0),
            default_disk_ms=_num(d, "default_disk_ms", where, minimum=0),
        )


@dataclass(frozen=True)
class SchedulerQuirks:
    """Version-specific scheduler details.

    ``kv_preallocate_blocks``: vLLM <= 0.8.4's KV manager grabbed this many extra blocks whenever
    a request needed a new one (64 tokens = 4 blocks); 0.8.5 removed it (vLLM PR #16941).
    ``admit_only_if_prompt_fits``: newer vLLM (0.32) admits a waiting request only if its whole
    prompt fits in free KV; 0.8.5 checks only the first chunk and relies on preemption.
    ``scan_us_per_waiting``: the scheduler's own cost per waiting request its waiting loop
    examines. With the adapter set full the loop walks past every request of another adapter, so
    a replica with a deep queue pays for the whole queue every step (fitted from the measured
    ``scheduler_ms`` of each step, not from step times, where it is lost in the noise).
    """

    kv_preallocate_blocks: int = 0
    admit_only_if_prompt_fits: bool = False
    scan_us_per_waiting: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_preallocate_blocks": self.kv_preallocate_blocks,
            "admit_only_if_prompt_fits": self.admit_only_if_prompt_fits,
            "scan_us_per_waiting": round(float(self.scan_us_per_waiting), 6),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "scheduler") -> SchedulerQuirks:
        known = {"kv_preallocate_blocks", "admit_only_if_prompt_fits", "scan_us_per_waiting"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {unknown}")
        pre = d.get("kv_preallocate_blocks", 0)
        if not isinstance(pre, int) or isinstance(pre, bool) or pre < 0:
            raise ProfileError(f"{where}.kv_preallocate_blocks: must be an integer >= 0")
        fits = d.get("admit_only_if_prompt_fits", False)
        if not isinstance(fits, bool):
            raise ProfileError(f"{where}.admit_only_if_prompt_fits: must be true or false")
        scan = d.get("scan_us_per_waiting", 0.0)
        if isinstance(scan, bool) or not isinstance(scan, (int, float)) or not scan >= 0:
            raise ProfileError(f"{where}.scan_us_per_waiting: must be a number >= 0, got {scan!r}")
        return cls(
            kv_preallocate_blocks=pre,
            admit_only_if_prompt_fits=fits,
            scan_us_per_waiting=float(scan),
        )


@dataclass(frozen=True)
class Profile:
    """One calibrated (GPU, model, vLLM) triple."""

    name: str
    gpu: str
    model: str
    vllm_version: str
    max_model_len: int
    step_model: StepTimeModel
    kv_capacity: KVCapacityModel
    adapter_loads: AdapterLoadTable
    scheduler: SchedulerQuirks = field(default_factory=SchedulerQuirks)
    default_engine: dict[str, Any] = field(default_factory=dict)
    fit_report: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    serving_path: ServingPath | None = None  # None: not measured, the twin times the engine

    def serving(self) -> Profile:
        """The profile the engine runs with under serving: steps as the serving path's
        contention makes them (``step_scale`` x (steps + ``prefill_token_ms`` per prompt
        token), plus ``decode_seq_ms`` per decoding sequence, eager or graph); itself when no
        term was measured."""
        t = self.serving_path
        if t is None or (t.step_scale == 1.0 and t.decode_seq_ms == 0.0
                         and t.prefill_token_ms == 0.0):
            return self
        m = replace(self.step_model,
                    prefill_tokens=self.step_model.prefill_tokens + t.prefill_token_ms)
        m = m.scaled(t.step_scale)
        m = replace(m, eager_decode_seqs=m.eager_decode_seqs + t.decode_seq_ms,
                    graph_decode_tokens=m.graph_decode_tokens + t.decode_seq_ms)
        return replace(self, step_model=m)

    def with_serving_path(self, term: ServingPath | None) -> Profile:
        return replace(self, serving_path=term)

    # --- queries -------------------------------------------------------------------------
    def kv_tokens(self, config: EngineConfig) -> int:
        return self.kv_capacity.tokens(config.max_loras, config.max_lora_rank, config.enable_lora)

    def effective_max_model_len(self, config: EngineConfig) -> int:
        return config.max_model_len if config.max_model_len is not None else self.max_model_len

    def check_feasible(self, config: EngineConfig) -> int:
        """KV capacity in tokens, or InfeasibleConfigError saying what fits.

        vLLM refuses to start when the KV cache cannot hold one max_model_len request.
        """
        kv = self.kv_tokens(config)
        need = self.effective_max_model_len(config)
        if kv >= need:
            return kv
        fit_g = self.kv_capacity.max_loras_fitting(config.max_lora_rank, need)
        fits = [
            f"max_loras <= {fit_g} at max_lora_rank={config.max_lora_rank}"
            if fit_g
            else f"no max_loras at max_lora_rank={config.max_lora_rank}"
        ]
        for r in (8, 16, 32, 64):
            if r < config.max_lora_rank:
                g = self.kv_capacity.max_loras_fitting(r, need)
                if g >= config.max_loras:
                    fits.append(f"max_lora_rank={r} with max_loras={config.max_loras}")
                    break
        if kv > 0:
            fits.append(f"max_model_len <= {kv} with this max_loras x rank")
        raise InfeasibleConfigError(
            f"{self.name}: max_loras={config.max_loras} x max_lora_rank={config.max_lora_rank} "
            f"leaves {max(kv, 0):,} KV-cache tokens, fewer than one max_model_len="
            f"{need:,} request needs (vLLM would refuse to start). What fits: "
            + "; ".join(fits)
            + "."
        )

    # --- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PROFILE_FORMAT_VERSION,
            "name": self.name,
            "gpu": self.gpu,
            "model": self.model,
            "vllm_version": self.vllm_version,
            "max_model_len": self.max_model_len,
            "step_model": self.step_model.to_dict(),
            "kv_capacity": self.kv_capacity.to_dict(),
            "adapter_loads": self.adapter_loads.to_dict(),
            "scheduler": self.scheduler.to_dict(),
            "default_engine": dict(self.default_engine),
            "fit_report": self.fit_report,
            "provenance": self.provenance,
            **({"serving_path": self.serving_path.to_dict()} if self.serving_path else {}),
        }

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=100))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "profile") -> Profile:
        if not isinstance(d, dict):
            raise ProfileError(f"{where}: must be a mapping")
        version = d.get("format_version", PROFILE_FORMAT_VERSION)
        if version != PROFILE_FORMAT_VERSION:
            raise ProfileError(
                f"{where}.format_version: {version} is not supported "
                f"(this lorafleet reads {PROFILE_FORMAT_VERSION})"
            )
        known = {
            "format_version", "name", "gpu", "model", "vllm_version", "max_model_len",
            "step_model", "kv_capacity", "adapter_loads", "scheduler", "default_engine",
            "fit_report", "provenance", "serving_path",
        }
        unknown = sorted(set(d) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown field(s) {unknown}")
        for key in ("name", "gpu", "model", "vllm_version"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ProfileError(f"{where}.{key}: must be a non-empty string")
        for key in ("step_model", "kv_capacity", "adapter_loads"):
            if not isinstance(d.get(key), dict):
                raise ProfileError(f"{where}.{key}: missing or not a mapping")
        try:
            step = StepTimeModel.from_dict(d["step_model"], f"{where}.step_model")
        except ValueError as exc:
            raise ProfileError(str(exc)) from None
        return cls(
            name=d["name"],
            gpu=d["gpu"],
            model=d["model"],
            vllm_version=d["vllm_version"],
            max_model_len=int(_num(d, "max_model_len", where, minimum=1)),
            step_model=step,
            kv_capacity=KVCapacityModel.from_dict(d["kv_capacity"], f"{where}.kv_capacity"),
            adapter_loads=AdapterLoadTable.from_dict(d["adapter_loads"], f"{where}.adapter_loads"),
            scheduler=SchedulerQuirks.from_dict(d.get("scheduler") or {}, f"{where}.scheduler"),
            default_engine=dict(d.get("default_engine") or {}),
            fit_report=dict(d.get("fit_report") or {}),
            provenance=dict(d.get("provenance") or {}),
            serving_path=_serving_path(d.get("serving_path"), f"{where}.serving_path"),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProfileError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, where=str(path.name))


def _serving_path(d: Any, where: str) -> ServingPath | None:
    if d is None:
        return None
    try:
        return ServingPath.from_dict(d, where)
    except ServingPathError as exc:
        raise ProfileError(str(exc)) from None


def profile_dirs() -> list[Path]:
    """Where named profiles are looked up: $LORAFLEET_PROFILES (os.pathsep list), then profiles/."""
    extra = os.environ.get("LORAFLEET_PROFILES", "")
    dirs = [Path(p) for p in extra.split(os.pathsep) if p]
    return [*dirs, REPO_PROFILES_DIR]


def available_profiles() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by file path or by name (the file stem, e.g. the reference tables' `model`)."""
    return Profile.from_yaml(profile_path(name_or_path))


def profile_path(name_or_path: str | Path) -> Path:
    """The file of a profile given by path or by name (``load_profile``)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise ProfileError(f"profile file not found: {candidate}")
        return candidate
    for d in profile_dirs():
        path = d / f"{name_or_path}.yaml"
        if path.exists():
            return path
    raise ProfileError(
        f"no profile named {str(name_or_path)!r}; available: {available_profiles() or 'none'} "
        f"(searched {[str(d) for d in profile_dirs()]}); run `lorafleet calibrate` to make one"
    )
