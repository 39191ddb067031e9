"""Engine configuration of one emulated vLLM replica, validated like vLLM validates its own."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# vLLM's LoRAConfig.max_lora_rank is a Literal of these values; anything else fails at start-up.
VALID_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ConfigError(ValueError):
    """An engine configuration vLLM itself would reject (message names the field)."""


@dataclass(frozen=True)
class EngineConfig:
    """The knobs of one vLLM engine that change its scheduling and memory.

    Defaults are vLLM's for an H100-class GPU (chunked prefill on, 2048-token budget, block 16).
    ``max_cpu_loras=None`` means "same as max_loras", vLLM's default. ``max_model_len=None`` takes
    the profile's (the model's native context length).
    """

    max_loras: int = 1
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None
    enable_lora: bool = True
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_cpu_loras is not None:
            if not isinstance(self.max_cpu_loras, int) or self.max_cpu_loras < 1:
                raise ConfigError(
                    f"max_cpu_loras: must be a positive integer, got {self.max_cpu_loras!r}"
                )
            if self.max_cpu_loras < self.max_loras:
                raise ConfigError(
                    f"max_cpu_loras: must be >= max_loras ({self.max_loras}), "
                    f"got {self.max_cpu_loras}"
                )
        if self.max_lora_rank not in VALID_MAX_LORA_RANKS:
            raise ConfigError(
                f"max_lora_rank: must be one of {list(VALID_MAX_LORA_RANKS)}, "
                f"got {self.max_lora_rank!r}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens: must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise ConfigError(
                f"max_model_len: must be a positive integer, got {self.max_model_len!r}"
            )
        if self.enable_prefix_caching:
            raise ConfigError("enable_prefix_caching: not modelled yet; set it to false")

    @property
    def cpu_slots(self) -> int:
        """Effective CPU LoRA cache size (vLLM defaults it to max_loras)."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def with_(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "engine") -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except ConfigError as exc:
            raise ConfigError(f"{where}.{exc}") from None


def smallest_valid_rank(rank: int) -> int:
    """vLLM only accepts some slot ranks; the smallest one that holds ``rank``."""
    for r in VALID_MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise ConfigError(
        f"rank {rank} exceeds vLLM's largest max_lora_rank {VALID_MAX_LORA_RANKS[-1]}"
    )
