"""What one replica serves, and the interface that predicts how it will do.

Placement reasons about replicas, not workloads: a ``ReplicaLoad`` is the slice of traffic a
plan sends to one engine (per-adapter ranks and Poisson rates, one length model). A
``ReplicaPredictor`` turns (load, engine config) into the few figures placement needs. Two
implementations share the interface: ``TwinPredictor`` (a full twin run; exact, ~0.1-1 s) and the
LightGBM surrogate (``twin.surrogate``; microseconds), so a policy can be run against either and
the final plan verified by the twin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from twin.config import EngineConfig
from twin.lengths import LengthModel, WorkloadError
from twin.profile import Profile
from twin.workload import AdapterSpec, Workload

# The figures every predictor returns for each (load, config), in this order.
PREDICTED_METRICS: tuple[str, ...] = (
    "total_throughput_tps",
    "offered_total_tps",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "starved",
)

# twin.metrics key for each predicted figure.
_TWIN_KEYS: dict[str, str] = {
    "total_throughput_tps": "total_throughput_tps",
    "offered_total_tps": "offered_total_tps",
    "ttft_p50_ms": "ttft_median_ms",
    "ttft_p99_ms": "ttft_p99_ms",
    "itl_p50_ms": "itl_median_ms",
    "itl_p99_ms": "itl_p99_ms",
    "starved": "starved",
}
_MEAN_KEYS = {"ttft_mean_ms": "ttft_mean_ms", "itl_mean_ms": "itl_mean_ms"}


@dataclass(frozen=True, eq=False)
class ReplicaLoad:
    """Per-adapter ranks and rates (req/s) routed to one replica, plus their length model.

    ``client_max_inflight``: the most requests the client keeps in flight (more fail at the
    client), e.g. a load generator's connection limit; None — a replica in a plan — is an
    unbounded client. Measured runs behind such a cap are read with it.
    """

    adapter_ids: tuple[str, ...]
    ranks: np.ndarray  # int64, one per adapter
    rates_rps: np.ndarray  # float64, one per adapter
    lengths: LengthModel
    client_max_inflight: int | None = None

    def __post_init__(self) -> None:
        ids = tuple(self.adapter_ids)
        ranks = np.asarray(self.ranks, dtype=np.int64)
        rates = np.asarray(self.rates_rps, dtype=np.float64)
        if ranks.shape != (len(ids),) or rates.shape != (len(ids),):
            raise WorkloadError(
                f"ranks/rates_rps: need one per adapter ({len(ids)}), "
                f"got {ranks.shape} and {rates.shape}"
            )
        if len(ids) and ranks.min() < 1:
            raise WorkloadError(f"ranks: must be >= 1, got {int(ranks.min())}")
        if len(ids) and (not np.all(np.isfinite(rates)) or rates.min() < 0):
            raise WorkloadError("rates_rps: must be finite and >= 0")
        if len(set(ids)) != len(ids):
            raise WorkloadError("adapter_ids: duplicate ids on one replica")
        if not isinstance(self.lengths, LengthModel):
            raise WorkloadError(f"lengths: must be a LengthModel, got {self.lengths!r}")
        cap = self.client_max_inflight
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer))
                                or cap < 1):
            raise WorkloadError(f"client_max_inflight: must be None or an int >= 1, got {cap!r}")
        object.__setattr__(self, "adapter_ids", ids)
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "rates_rps", rates)

    @classmethod
    def trusted(
        cls, adapter_ids: tuple[str, ...], ranks: np.ndarray, rates_rps: np.ndarray,
        lengths: LengthModel,
    ) -> ReplicaLoad:
        """A load built WITHOUT ``__post_init__``'s checks, for callers whose inputs are already
        valid: distinct ids, an int64 rank array (>= 1) and a float64 rate array (finite,
        >= 0) of the same length, e.g. a slice of a validated workload or a validated load's
        rates times a positive factor (``placement.replica_optimum.scaled_load``: every step
        of a headroom search builds one per replica, where the checks, the duplicate-id set
        above all, are pure overhead)."""
        new = object.__new__(cls)
        object.__setattr__(new, "adapter_ids", adapter_ids)
        object.__setattr__(new, "ranks", ranks)
        object.__setattr__(new, "rates_rps", rates_rps)
        object.__setattr__(new, "lengths", lengths)
        object.__setattr__(new, "client_max_inflight", None)
        return new

    @classmethod
    def from_workload(
        cls, workload: Workload, shares: Mapping[str, float] | None = None
    ) -> ReplicaLoad:
        """The replica that gets ``shares[id]`` of each listed adapter's traffic (all if None)."""
        if shares is None:
            shares = {a.id: 1.0 for a in workload.adapters}
        by_id = {a.id: a for a in workload.adapters}
        missing = [i for i in shares if i not in by_id]
        if missing:
            raise WorkloadError(f"shares: unknown adapter id(s) {missing[:5]}")
        ids = tuple(shares)
        return cls(
            adapter_ids=ids,
            ranks=np.array([by_id[i].rank for i in ids], dtype=np.int64),
            rates_rps=np.array([by_id[i].rate_rps * shares[i] for i in ids], dtype=np.float64),
            lengths=workload.lengths,
        )

    def to_workload(self, name: str = "replica", duration_s: float = 3600.0) -> Workload:
        """The Poisson workload the twin runs to verify this replica."""
        adapters = tuple(
            AdapterSpec(id=i, rank=int(r), rate_rps=float(q))
            for i, r, q in zip(self.adapter_ids, self.ranks, self.rates_rps, strict=True)
        )
        return Workload(name=name, adapters=adapters, lengths=self.lengths, duration_s=duration_s)

    @property
    def n_adapters(self) -> int:
        return len(self.adapter_ids)

    @property
    def total_rate_rps(self) -> float:
        return float(self.rates_rps.sum())

    @property
    def max_rank(self) -> int:
        return int(self.ranks.max()) if len(self.ranks) else 1

    def offered_tokens_per_s(self) -> float:
        """Offered tokens/s: rate x (mean prompt + mean output)."""
        return self.total_rate_rps * (self.lengths.mean_prompt() + self.lengths.mean_output())


class ReplicaPredictor(Protocol):
    """Predicts ``PREDICTED_METRICS`` for each (load, config) pair; same length in and out."""

    name: str

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]: ...


def predict_columns(
    predictor: ReplicaPredictor, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
) -> dict[str, np.ndarray]:
    """``PREDICTED_METRICS`` as one array per metric (``starved`` as bool), for code that judges
    thousands of pairs at once: the predictor's own ``predict_columns`` when it has one (the
    surrogate computes columns and would otherwise build a dict per row only for them to be
    read back), else its ``predict`` dicts transposed. Same figures either way."""
    own = getattr(predictor, "predict_columns", None)
    if own is not None:
        return own(loads, configs)
    rows = predictor.predict(loads, configs)
    keys = [k for k in PREDICTED_METRICS if not rows or k in rows[0]]
    return {
        k: np.array([bool(r[k]) for r in rows], dtype=bool) if k == "starved"
        else np.array([float(r[k]) for r in rows], dtype=np.float64)
        for k in keys
    }


@dataclass(frozen=True)
class TwinPredictor:
    """Full twin runs: the ground truth placement verifies with (slow; use for final plans)."""

    profile: Profile
    duration_s: float = 3600.0
    seed: int = 0
    name: str = "twin"

    def predict(
        self, loads: Sequence[ReplicaLoad], configs: Sequence[EngineConfig]
    ) -> list[dict[str, float]]:
        if len(loads) != len(configs):
            raise ValueError(f"loads ({len(loads)}) and configs ({len(configs)}) differ in length")
        return [self.predict_one(load, cfg) for load, cfg in zip(loads, configs, strict=True)]

    def predict_one(self, load: ReplicaLoad, config: EngineConfig,
                    duration_s: float | None = None, *, means: bool = False
                    ) -> dict[str, float]:
        """One run of ``duration_s`` simulated seconds (default ``self.duration_s``);
        ``means`` adds the TTFT and ITL means (what live telemetry can be compared with)."""
        from twin.simulate import simulate

        seconds = self.duration_s if duration_s is None else float(duration_s)
        result = simulate(
            load.to_workload(duration_s=seconds), config, self.profile, seed=self.seed,
            client_max_inflight=load.client_max_inflight,
        )
        keys = {**_TWIN_KEYS, **_MEAN_KEYS} if means else _TWIN_KEYS
        return {k: result.metrics[v] for k, v in keys.items()}
