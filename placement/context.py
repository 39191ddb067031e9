"""What a placement policy is given besides the workload: ``PlacementContext``.

Everything a policy needs travels in one frozen context (profile, predictor, GPU budget, engine
defaults, the feasibility rule, and the lower bound / capacity estimate the planner attaches),
so policies are pure functions of their inputs and ``lorafleet plan --compare`` runs them side
by side on identical terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from placement.errors import PlacementError
from twin.config import VALID_MAX_LORA_RANKS
from twin.profile import Profile
from twin.replica import ReplicaPredictor

if TYPE_CHECKING:  # annotations only: the planner fills these fields
    from placement.capacity_estimate import CapacityEstimate
    from placement.lower_bound import LowerBound


# max_loras values the per-replica optimum tries (capped per replica by its adapter count and by
# memory). Dense at the small end, where one slot more or less decides starvation.
DEFAULT_MIN_SERVED_FRACTION = 0.99  # of offered tokens a feasible replica completes
DEFAULT_MAX_LORAS_GRID: tuple[int, ...] = (
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
)


@dataclass(frozen=True)
class PlacementContext:
    """What a policy is given besides the workload.

    ``min_served_fraction``: a replica is feasible when the predictor says it is not starved and
    completes at least this fraction of its offered tokens; ``for_profile`` takes it from the
    predictor when it names one (the surrogate's is 0.97: its not-starved throughput is ~2 % off
    the twin). ``target_utilisation`` < 1 keeps a
    margin: feasibility is then judged at the replica's load divided by it.
    ``max_loras_limit``: the most adapter slots a replica is offered (None: memory decides);
    ``for_profile`` takes it from a predictor that names one (the surrogate's trained range of
    ``max_loras``: beyond it every candidate would be a full twin run, and a replica with
    hundreds of adapters gains nothing measurable from more slots than that).
    ``lower_bound`` (a bound by construction, printed with plans) and ``estimate`` (what the
    mix needs by the predictor, where packing starts): filled in by the planner so that
    comparing policies computes them once.
    """

    profile: Profile
    predictor: ReplicaPredictor
    gpu_budget: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None
    min_served_fraction: float = DEFAULT_MIN_SERVED_FRACTION
    target_utilisation: float = 1.0
    max_loras_grid: tuple[int, ...] = DEFAULT_MAX_LORAS_GRID
    max_loras_limit: int | None = None
    headroom_tolerance: float = 0.01
    lower_bound: LowerBound | None = field(default=None, compare=False)
    estimate: CapacityEstimate | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.gpu_budget is not None and (
            not isinstance(self.gpu_budget, int) or isinstance(self.gpu_budget, bool)
            or self.gpu_budget < 1
        ):
            raise PlacementError(f"gpu_budget: must be a positive integer, got {self.gpu_budget!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlacementError(f"{name}: must be a positive integer, got {value!r}")
        if not 0.0 < self.min_served_fraction <= 1.0:
            raise PlacementError(
                f"min_served_fraction: must be within (0, 1], got {self.min_served_fraction}"
            )
        if not 0.0 < self.target_utilisation <= 1.0:
            raise PlacementError(
                f"target_utilisation: must be within (0, 1], got {self.target_utilisation}"
            )
        if not 0.0 < self.headroom_tolerance < 1.0:
            raise PlacementError(
                f"headroom_tolerance: must be within (0, 1), got {self.headroom_tolerance}"
            )
        grid = tuple(sorted(set(self.max_loras_grid)))
        if not grid or any(not isinstance(g, int) or g < 1 for g in grid):
            raise PlacementError(
                f"max_loras_grid: must be positive integers, got {self.max_loras_grid!r}"
            )
        object.__setattr__(self, "max_loras_grid", grid)
        if self.max_loras_limit is not None and (
            not isinstance(self.max_loras_limit, int) or isinstance(self.max_loras_limit, bool)
            or self.max_loras_limit < 1
        ):
            raise PlacementError(
                f"max_loras_limit: must be a positive integer or None, got {self.max_loras_limit!r}"
            )
        if not callable(getattr(self.predictor, "predict", None)):
            raise PlacementError(f"predictor: {self.predictor!r} has no predict() method")

    @classmethod
    def for_profile(
        cls,
        profile: Profile,
        predictor: ReplicaPredictor,
        *,
        gpu_budget: int | None = None,
        **overrides: Any,
    ) -> PlacementContext:
        """A context whose engine defaults are the profile's ``default_engine`` (vLLM's own on
        that GPU); ``overrides`` set any other field."""
        d = profile.default_engine
        base: dict[str, Any] = {
            "max_num_seqs": int(d.get("max_num_seqs", 256)),
            "max_num_batched_tokens": int(d.get("max_num_batched_tokens", 2048)),
            "block_size": int(d.get("block_size", 16)),
        }
        if hasattr(predictor, "min_served_fraction"):  # what this predictor can tell apart
            base["min_served_fraction"] = float(predictor.min_served_fraction)
        if getattr(predictor, "max_loras_limit", None):  # where this predictor can answer
            base["max_loras_limit"] = int(predictor.max_loras_limit)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(profile=profile, predictor=predictor, gpu_budget=gpu_budget, **base)

    def with_predictor(self, predictor: ReplicaPredictor) -> PlacementContext:
        """This context with another predictor, and what ``for_profile`` takes from one (its
        feasibility threshold and slot limit, else the defaults); the lower bound and estimate
        are dropped (the planner computes them again)."""
        return replace(
            self, predictor=predictor, lower_bound=None, estimate=None,
            min_served_fraction=float(getattr(predictor, "min_served_fraction",
                                              DEFAULT_MIN_SERVED_FRACTION)),
            max_loras_limit=getattr(predictor, "max_loras_limit", None))

    @cached_property
    def memory_caps(self) -> dict[int, int]:
        """Per valid max_lora_rank, the largest max_loras whose KV cache still holds one
        max_model_len request (the profile's "What fits" rule; 0 = none fits)."""
        need = self.max_model_len or self.profile.max_model_len
        kv = self.profile.kv_capacity
        return {r: kv.max_loras_fitting(r, need) for r in VALID_MAX_LORA_RANKS}

    @property
    def predictor_name(self) -> str:
        return str(getattr(self.predictor, "name", type(self.predictor).__name__))
