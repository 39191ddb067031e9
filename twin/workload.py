"""Workload spec of the twin: which adapters exist, how often each is called, how long requests are.

A ``Workload`` is a frozen, validated description (YAML in, YAML out); ``generate_requests`` turns
it into a concrete, arrival-sorted ``RequestBatch`` for the twin engine. Arrivals are independent
Poisson processes per adapter (vLLM's benchmark and the reference runs use Poisson arrivals), or a
replayed Azure trace. Everything random is driven by an explicit seed.

Errors are ``WorkloadError`` (a ``ValueError``) whose message starts with the offending field,
e.g. ``adapters[3].rank: must be a positive integer, got -1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from twin.lengths import LengthModel, WorkloadError, _number, _positive_int
from twin.requests import RequestBatch

__all__ = [
    "AdapterSpec",
    "LengthModel",
    "RequestBatch",
    "TraceSpec",
    "Workload",
    "WorkloadError",
    "few_hot_workload",
    "generate_requests",
    "reference_workload",
    "uniform_workload",
    "zipf_workload",
]

FORMAT_VERSION = 1
SHAPES: tuple[str, ...] = ("uniform", "zipf", "few_hot", "reference")
TRACE_FORMATS: tuple[str, ...] = ("azure",)
TRACE_MAPPINGS: tuple[str, ...] = ("zipf", "uniform", "round_robin")
DEFAULT_RANKS: tuple[int, ...] = (8, 16)

_TOP_KEYS = (
    "format_version",
    "name",
    "duration_s",
    "base_model_rate_rps",
    "lengths",
    "adapters",
    "generate",
    "trace",
)
_ADAPTER_KEYS = ("id", "rank", "rate_rps")
_GENERATE_COMMON = ("shape", "n_adapters", "ranks", "seed")
_GENERATE_KEYS: dict[str, tuple[str, ...]] = {
    "uniform": (*_GENERATE_COMMON, "total_rate_rps"),
    "zipf": (*_GENERATE_COMMON, "total_rate_rps", "alpha"),
    "few_hot": (*_GENERATE_COMMON, "total_rate_rps", "n_hot", "hot_share"),
    "reference": (*_GENERATE_COMMON, "rates"),
}
_TRACE_ADAPTER_KEYS = ("n_adapters", "ranks", "seed")

RankSpec = Mapping[int, float] | Sequence[int]


# ---------------------------------------------------------------------------------------------
# small validators (messages start with the field path)
# ---------------------------------------------------------------------------------------------


def _rate(value: Any, where: str) -> float:
    return _number(value, where, allow_zero=True)


def _seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise WorkloadError(f"{where}: must be a non-negative integer, got {value!r}")
    return int(value)


def _check_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            prefix = f"{where}.{key}" if where else str(key)
            raise WorkloadError(f"{prefix}: unknown key; expected one of {list(allowed)}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise WorkloadError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter: its id, rank (sets its memory and compute cost) and arrival rate."""

    id: str
    rank: int
    rate_rps: float

    def __post_init__(self) -> None:
        self._check("adapter")

    def _check(self, where: str) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise WorkloadError(f"{where}.id: must be a non-empty string, got {self.id!r}")
        object.__setattr__(self, "rank", _positive_int(self.rank, f"{where}.rank"))
        object.__setattr__(self, "rate_rps", _rate(self.rate_rps, f"{where}.rate_rps"))

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        where: str = "adapter",
        *,
        default_id: str | None = None,
        default_rate: float | None = None,
    ) -> AdapterSpec:
        """Validate one ``{id, rank, rate_rps}`` entry; errors name ``where.<field>``."""
        d = _mapping(d, where)
        _check_keys(d, _ADAPTER_KEYS, where)
        adapter_id = d.get("id", default_id)
        if adapter_id is None:
            raise WorkloadError(f"{where}.id: required")
        if "rank" not in d:
            raise WorkloadError(f"{where}.rank: required")
        rate = d.get("rate_rps", default_rate)
        if rate is None:
            raise WorkloadError(f"{where}.rate_rps: required")
        spec = object.__new__(cls)
        object.__setattr__(spec, "id", adapter_id)
        object.__setattr__(spec, "rank", d["rank"])
        object.__setattr__(spec, "rate_rps", rate)
        spec._check(where)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "rank": self.rank, "rate_rps": self.rate_rps}


@dataclass(frozen=True)
class TraceSpec:
    """Arrivals (and lengths) replayed from a trace file instead of Poisson processes."""

    path: str
    format: str = "azure"
    mapping: str = "zipf"
    alpha: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        self._check("trace")

    def _check(self, where: str) -> None:
        if not isinstance(self.path, str | os.PathLike) or not str(self.path):
            raise WorkloadError(f"{where}.path: must be a file path, got {self.path!r}")
        object.__setattr__(self, "path", str(self.path))
        if self.format not in TRACE_FORMATS:
            raise WorkloadError(
                f"{where}.format: must be one of {list(TRACE_FORMATS)}, got {self.format!r}"
            )
        if self.mapping not in TRACE_MAPPINGS:
            raise WorkloadError(
                f"{where}.mapping: must be one of {list(TRACE_MAPPINGS)}, got {self.mapping!r}"
            )
        object.__setattr__(self, "alpha", _number(self.alpha, f"{where}.alpha", allow_zero=True))
        object.__setattr__(
            self, "time_scale", _number(self.time_scale, f"{where}.time_scale", allow_zero=False)
        )

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], where: str = "trace", *, base_dir: str | Path | None = None
    ) -> TraceSpec:
        """Validate a ``trace:`` block and check the file parses (errors name the field)."""
        d = _mapping(d, where)
        _check_keys(d, [f.name for f in fields(cls)], where)
        if "path" not in d:
            raise WorkloadError(f"{where}.path: required")
        path = d["path"]
        if isinstance(path, str | os.PathLike) and str(path):
            p = Path(path)
            if base_dir is not None and not p.is_absolute():
                p = Path(base_dir) / p
            path = str(p)
        spec = object.__new__(cls)
        for f in fields(cls):
            object.__setattr__(spec, f.name, d.get(f.name, f.default))
        object.__setattr__(spec, "path", path)
        spec._check(where)
        from twin.azure_trace import read_azure_trace

        try:
            read_azure_trace(spec.path)
        except WorkloadError as exc:
            raise WorkloadError(f"{where}.path: {exc}") from None
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Workload:
    """Adapters with Poisson rates (or a trace), a length model and a simulation window."""

    name: str
    adapters: tuple[AdapterSpec, ...]
    lengths: LengthModel
    duration_s: float = 3600.0
    base_model_rate_rps: float = 0.0
    trace: TraceSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise WorkloadError(f"name: must be a non-empty string, got {self.name!r}")
        adapters = tuple(self.adapters)
        seen: dict[str, int] = {}
        for i, a in enumerate(adapters):
            if not isinstance(a, AdapterSpec):
                raise WorkloadError(f"adapters[{i}]: must be an AdapterSpec, got {a!r}")
            if a.id in seen:
                raise WorkloadError(
                    f"adapters[{i}].id: duplicate id {a.id!r} (also adapters[{seen[a.id]}])"
                )
            seen[a.id] = i
        object.__setattr__(self, "adapters", adapters)
        if not isinstance(self.lengths, LengthModel):
            raise WorkloadError(f"lengths: must be a LengthModel, got {self.lengths!r}")
        object.__setattr__(
            self, "duration_s", _number(self.duration_s, "duration_s", allow_zero=False)
        )
        object.__setattr__(
            self, "base_model_rate_rps", _rate(self.base_model_rate_rps, "base_model_rate_rps")
        )
        if self.trace is not None and not isinstance(self.trace, TraceSpec):
            raise WorkloadError(f"trace: must be a TraceSpec, got {self.trace!r}")
        if self.trace is not None and not adapters:
            raise WorkloadError("adapters: a trace workload needs at least one adapter")
        if not adapters and self.base_model_rate_rps == 0:
            raise WorkloadError(
                "adapters: empty and base_model_rate_rps is 0; the workload has no traffic"
            )

    # -- YAML -----------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path) -> Workload:
        """Load a workload YAML; relative file paths inside are relative to the YAML file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise WorkloadError(f"{path}: cannot read: {exc}") from None
        except yaml.YAMLError as exc:
            raise WorkloadError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise WorkloadError(f"{path}: top level must be a mapping")
        return cls.from_dict(data, base_dir=path.parent, default_name=path.stem)

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        *,
        base_dir: str | Path | None = None,
        default_name: str | None = None,
    ) -> Workload:
        """Validate a parsed YAML mapping (see docs/workload_format.md); expands ``generate``."""
        d = _mapping(d, "workload")
        _check_keys(d, _TOP_KEYS, "")
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise WorkloadError(f"format_version: must be {FORMAT_VERSION}, got {version!r}")
        duration = _number(d.get("duration_s", 3600.0), "duration_s", allow_zero=False)
        base_rate = _rate(d.get("base_model_rate_rps", 0.0), "base_model_rate_rps")

        trace: TraceSpec | None = None
        trace_extra: dict[str, Any] = {}
        if d.get("trace") is not None:
            block = dict(_mapping(d["trace"], "trace"))
            trace_extra = {k: block.pop(k) for k in _TRACE_ADAPTER_KEYS if k in block}
            trace = TraceSpec.from_dict(block, "trace", base_dir=base_dir)

        if d.get("lengths") is not None:
            lengths = LengthModel.from_dict(d["lengths"], "lengths", base_dir=base_dir)
        elif trace is not None:
            lengths = LengthModel(kind="empirical", path=trace.path)
        else:
            lengths = LengthModel(kind="sharegpt")

        has_list, has_gen = d.get("adapters") is not None, d.get("generate") is not None
        if has_list and has_gen:
            raise WorkloadError("generate: cannot be combined with an 'adapters' list")
        name = d.get("name", default_name)

        if trace is not None:
            if has_gen:
                raise WorkloadError(
                    "generate: cannot be combined with 'trace'; give an 'adapters' list "
                    "or trace.n_adapters"
                )
            adapters = _trace_adapters(d.get("adapters"), trace, trace_extra, duration)
        elif has_gen:
            generated = _expand_generate(d["generate"], lengths, duration)
            adapters = generated.adapters
            name = name if name is not None else generated.name
        elif has_list:
            adapters = _adapter_list(d["adapters"])
        else:
            raise WorkloadError(
                "adapters: missing; give an 'adapters' list, a 'generate' block or a 'trace'"
            )
        return cls(
            name=name if name is not None else "workload",
            adapters=adapters,
            lengths=lengths,
            duration_s=duration,
            base_model_rate_rps=base_rate,
            trace=trace,
        )

    def to_dict(self) -> dict[str, Any]:
        """Fully expanded form (explicit adapter list); ``from_dict`` of it gives back ``self``."""
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "duration_s": self.duration_s,
            "base_model_rate_rps": self.base_model_rate_rps,
            "lengths": self.lengths.to_dict(),
        }
        if self.trace is not None:
            out["trace"] = self.trace.to_dict()
        out["adapters"] = [a.to_dict() for a in self.adapters]
        return out

    def to_yaml(self, path: str | Path) -> None:
        """Write the expanded form; file paths are rewritten relative to the new YAML's folder."""
        path = Path(path)
        data = self.to_dict()
        folder = os.path.abspath(path.parent)
        for block in (data["lengths"], data.get("trace")):
            if block is not None and block.get("path") is not None:
                block["path"] = os.path.relpath(os.path.abspath(block["path"]), folder)
        data["adapters"] = [_FlowMap(a) for a in data["adapters"]]
        if data.get("trace") is not None:
            data["trace"] = _FlowMap(data["trace"])
        data["lengths"] = _FlowMap(data["lengths"])
        path.write_text(yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=100))

    # -- derived quantities ---------------------------------------------------------------------

    @property
    def total_rate_rps(self) -> float:
        """All requests per second, adapters plus base model."""
        return float(sum(a.rate_rps for a in self.adapters)) + self.base_model_rate_rps

    @property
    def adapter_rates(self) -> np.ndarray:
        """Per-adapter rates (req/s) as a float64 array, in adapter-index order."""
        return np.array([a.rate_rps for a in self.adapters], dtype=np.float64)

    def offered_tokens_per_s(self) -> float:
        """Offered load in tokens/s: total rate x (mean prompt + mean output)."""
        return self.total_rate_rps * (self.lengths.mean_prompt() + self.lengths.mean_output())

    def scaled(self, factor: float) -> Workload:
        """Same workload with every rate multiplied by ``factor`` (a trace is time-compressed)."""
        allow_zero = self.trace is None
        factor = _number(factor, "factor", allow_zero=allow_zero)
        adapters = tuple(replace(a, rate_rps=a.rate_rps * factor) for a in self.adapters)
        trace = self.trace
        if trace is not None:
            trace = replace(trace, time_scale=trace.time_scale / factor)
        return replace(
            self,
            adapters=adapters,
            base_model_rate_rps=self.base_model_rate_rps * factor,
            trace=trace,
        )


# ---------------------------------------------------------------------------------------------
# request generation
# ---------------------------------------------------------------------------------------------


def generate_requests(
    workload: Workload, duration_s: float | None = None, seed: int = 0
) -> RequestBatch:
    """Per-adapter independent Poisson processes on [0, duration) (or the trace), lengths from the
    length model.

    Vectorised: counts = Poisson(rate * T), uniform times, ``np.repeat`` adapters, one stable
    argsort. Arrivals, lengths and the trace mapping use independent streams spawned from
    ``seed``, so changing the length model leaves the arrival times unchanged.
    """
    T = (
        workload.duration_s
        if duration_s is None
        else _number(duration_s, "duration_s", allow_zero=False)
    )
    seed = _seed(seed, "seed")
    arrival_ss, length_ss, map_ss = np.random.SeedSequence(seed).spawn(3)
    arrival_rng = np.random.default_rng(arrival_ss)
    length_rng = np.random.default_rng(length_ss)

    rates = workload.adapter_rates
    if workload.trace is None:
        counts = arrival_rng.poisson(rates * T)
    else:
        counts = np.zeros(rates.size, dtype=np.int64)
    n_base = int(arrival_rng.poisson(workload.base_model_rate_rps * T))
    n_poisson = int(counts.sum()) + n_base
    adapter = np.empty(n_poisson, dtype=np.int32)
    adapter[: n_poisson - n_base] = np.repeat(np.arange(rates.size, dtype=np.int32), counts)
    adapter[n_poisson - n_base :] = -1
    # uniform on [0, T): the nextafter guard removes the (rounding-only) chance of exactly T
    arrival = np.minimum(arrival_rng.random(n_poisson) * T, np.nextafter(T, 0.0))
    prompt, output = workload.lengths.sample(length_rng, n_poisson)

    if workload.trace is not None:
        from twin.azure_trace import load_azure_trace

        tr = workload.trace
        batch = load_azure_trace(
            tr.path,
            len(workload.adapters),
            mapping=tr.mapping,
            alpha=tr.alpha,
            seed=int(map_ss.generate_state(1)[0]),
            time_scale=tr.time_scale,
        )
        keep = batch.arrival_s < T
        arrival = np.concatenate([batch.arrival_s[keep], arrival])
        adapter = np.concatenate([batch.adapter[keep], adapter])
        prompt = np.concatenate([batch.prompt_len[keep], prompt])
        output = np.concatenate([batch.output_len[keep], output])

    order = np.argsort(arrival, kind="stable")
    return RequestBatch(
        arrival_s=arrival[order],
        adapter=adapter[order],
        prompt_len=prompt[order],
        output_len=output[order],
    )


# ---------------------------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------------------------


def _adapter_id(i: int) -> str:
    return f"adapter-{i:04d}"


def _check_n(n_adapters: Any) -> int:
    return _positive_int(n_adapters, "n_adapters")


def _rank_list(n: int, ranks: RankSpec, rng: np.random.Generator, *, shuffle: bool) -> list[int]:
    """Ranks for n adapters. A mapping {rank: fraction} is an exact-proportion mix (largest
    remainder) in shuffled order; a sequence is round-robin (shuffled only if asked)."""
    if isinstance(ranks, Mapping):
        if not ranks:
            raise WorkloadError("ranks: must not be empty")
        keys = []
        for k in ranks:
            key = int(k) if isinstance(k, str) and k.strip().isdigit() else k
            keys.append(_positive_int(key, f"ranks[{k!r}]"))
        fracs = np.array([_rate(v, f"ranks[{k!r}]") for k, v in ranks.items()], dtype=np.float64)
        if fracs.sum() <= 0:
            raise WorkloadError("ranks: fractions must not all be 0")
        share = fracs / fracs.sum() * n
        counts = np.floor(share).astype(np.int64)
        remainder_order = np.argsort(-(share - counts), kind="stable")
        counts[remainder_order[: n - int(counts.sum())]] += 1
        out = np.repeat(np.array(keys, dtype=np.int64), counts)
        rng.shuffle(out)
        return [int(r) for r in out]
    if isinstance(ranks, str | bytes) or not isinstance(ranks, Sequence) or len(ranks) == 0:
        raise WorkloadError(
            f"ranks: must be a non-empty list of ranks or a {{rank: fraction}} mapping, "
            f"got {ranks!r}"
        )
    values = [_positive_int(r, f"ranks[{i}]") for i, r in enumerate(ranks)]
    out_list = [values[i % len(values)] for i in range(n)]
    if shuffle:
        perm = rng.permutation(n)
        out_list = [out_list[j] for j in perm]
    return out_list


def _from_rates(
    name: str,
    rates: np.ndarray,
    ranks: list[int],
    lengths: LengthModel | None,
    duration_s: float,
) -> Workload:
    adapters = tuple(
        AdapterSpec(_adapter_id(i), ranks[i], float(rates[i])) for i in range(len(ranks))
    )
    return Workload(
        name=name,
        adapters=adapters,
        lengths=lengths if lengths is not None else LengthModel(kind="sharegpt"),
        duration_s=duration_s,
    )


def uniform_workload(
    n_adapters: int,
    total_rate_rps: float,
    ranks: RankSpec = DEFAULT_RANKS,
    lengths: LengthModel | None = None,
    name: str | None = None,
    seed: int = 0,
    duration_s: float = 3600.0,
) -> Workload:
    """Every adapter gets total/n req/s: the no-skew baseline."""
    n = _check_n(n_adapters)
    total = _rate(total_rate_rps, "total_rate_rps")
    rng = np.random.default_rng(_seed(seed, "seed"))
    return _from_rates(
        name or f"uniform-{n}",
        np.full(n, total / n),
        _rank_list(n, ranks, rng, shuffle=False),
        lengths,
        duration_s,
    )


def zipf_workload(
    n_adapters: int,
    total_rate_rps: float,
    alpha: float = 1.0,
    ranks: RankSpec = DEFAULT_RANKS,
    lengths: LengthModel | None = None,
    name: str | None = None,
    seed: int = 0,
    duration_s: float = 3600.0,
) -> Workload:
    """Rate of adapter i proportional to 1/(i+1)^alpha (adapter 0 hottest): skewed popularity,
    as in production multi-LoRA traffic."""
    n = _check_n(n_adapters)
    total = _rate(total_rate_rps, "total_rate_rps")
    alpha = _number(alpha, "alpha", allow_zero=True)
    rng = np.random.default_rng(_seed(seed, "seed"))
    w = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return _from_rates(
        name or f"zipf{alpha:g}-{n}",
        total * w / w.sum(),
        _rank_list(n, ranks, rng, shuffle=False),
        lengths,
        duration_s,
    )


def few_hot_workload(
    n_adapters: int,
    total_rate_rps: float,
    n_hot: int = 4,
    hot_share: float = 0.8,
    ranks: RankSpec = DEFAULT_RANKS,
    lengths: LengthModel | None = None,
    name: str | None = None,
    seed: int = 0,
    duration_s: float = 3600.0,
) -> Workload:
    """Adapters 0..n_hot-1 share ``hot_share`` of the traffic equally, the rest share the
    remainder equally (if every adapter is hot they take all of it)."""
    n = _check_n(n_adapters)
    total = _rate(total_rate_rps, "total_rate_rps")
    n_hot = _positive_int(n_hot, "n_hot")
    if n_hot > n:
        raise WorkloadError(f"n_hot: must be <= n_adapters ({n}), got {n_hot}")
    hot_share = _rate(hot_share, "hot_share")
    if hot_share > 1:
        raise WorkloadError(f"hot_share: must be within [0, 1], got {hot_share}")
    rng = np.random.default_rng(_seed(seed, "seed"))
    rates = np.empty(n)
    if n_hot == n:
        rates[:] = total / n
    else:
        rates[:n_hot] = total * hot_share / n_hot
        rates[n_hot:] = total * (1.0 - hot_share) / (n - n_hot)
    return _from_rates(
        name or f"few_hot{n_hot}-{n}",
        rates,
        _rank_list(n, ranks, rng, shuffle=False),
        lengths,
        duration_s,
    )


def reference_workload(
    n_adapters: int,
    rates: Sequence[float],
    ranks: Sequence[int],
    seed: int = 0,
    lengths: LengthModel | None = None,
) -> Workload:
    """The Agullo et al. one-hour-run recipe: rates assigned round-robin over the adapters then
    shuffled; ranks assigned round-robin over the `ranks` list (repeated entries weight the mix)
    then shuffled; ShareGPT-like lengths; 3600 s window."""
    n = _check_n(n_adapters)
    if isinstance(rates, str | bytes) or not isinstance(rates, Sequence) or len(rates) == 0:
        raise WorkloadError(f"rates: must be a non-empty list of rates, got {rates!r}")
    rate_values = [_rate(r, f"rates[{i}]") for i, r in enumerate(rates)]
    if isinstance(ranks, Mapping):
        raise WorkloadError("ranks: must be a list for the reference recipe (repeat to weight)")
    rng = np.random.default_rng(_seed(seed, "seed"))
    per_adapter = np.array([rate_values[i % len(rate_values)] for i in range(n)])
    per_adapter = per_adapter[rng.permutation(n)]
    rank_values = _rank_list(n, ranks, rng, shuffle=True)
    return _from_rates(f"reference-{n}", per_adapter, rank_values, lengths, 3600.0)


# ---------------------------------------------------------------------------------------------
# YAML helpers
# ---------------------------------------------------------------------------------------------


def _adapter_list(items: Any) -> tuple[AdapterSpec, ...]:
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise WorkloadError(f"adapters: must be a list of {{id, rank, rate_rps}}, got {items!r}")
    return tuple(
        AdapterSpec.from_dict(item, f"adapters[{i}]", default_id=_adapter_id(i))
        for i, item in enumerate(items)
    )


def _expand_generate(block: Any, lengths: LengthModel, duration: float) -> Workload:
    g = _mapping(block, "generate")
    all_keys = sorted({k for keys in _GENERATE_KEYS.values() for k in keys})
    _check_keys(g, all_keys, "generate")
    shape = g.get("shape")
    if shape not in SHAPES:
        raise WorkloadError(f"generate.shape: must be one of {list(SHAPES)}, got {shape!r}")
    for key in g:
        if key not in _GENERATE_KEYS[shape]:
            raise WorkloadError(f"generate.{key}: not used by shape {shape!r}")
    required = ("n_adapters", "rates") if shape == "reference" else ("n_adapters", "total_rate_rps")
    for key in required:
        if key not in g:
            raise WorkloadError(f"generate.{key}: required for shape {shape!r}")
    kwargs = {k: v for k, v in g.items() if k != "shape"}
    try:
        if shape == "reference":
            w = reference_workload(
                kwargs["n_adapters"],
                kwargs["rates"],
                kwargs.get("ranks", list(DEFAULT_RANKS)),
                seed=kwargs.get("seed", 0),
                lengths=lengths,
            )
            return replace(w, duration_s=duration)
        fn = {"uniform": uniform_workload, "zipf": zipf_workload, "few_hot": few_hot_workload}[
            shape
        ]
        return fn(lengths=lengths, duration_s=duration, **kwargs)
    except WorkloadError as exc:
        raise WorkloadError(f"generate.{exc}") from None


def _trace_adapters(
    items: Any, trace: TraceSpec, extra: dict[str, Any], duration: float
) -> tuple[AdapterSpec, ...]:
    """Adapters of a trace workload; omitted rates are the trace's expected per-adapter rates
    within [0, duration) under the mapping, so placement sees the load the replay will offer."""
    from twin.azure_trace import adapter_weights, read_azure_trace

    if items is not None and "n_adapters" in extra:
        raise WorkloadError("trace.n_adapters: cannot be combined with an 'adapters' list")
    if items is not None:
        if extra:
            raise WorkloadError(f"trace.{next(iter(extra))}: only used with trace.n_adapters")
        if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
            raise WorkloadError(f"adapters: must be a list of {{id, rank}}, got {items!r}")
        n = len(items)
    elif "n_adapters" in extra:
        n = _positive_int(extra["n_adapters"], "trace.n_adapters")
    else:
        raise WorkloadError(
            "adapters: missing; a trace needs an 'adapters' list or trace.n_adapters"
        )
    if n == 0:
        raise WorkloadError("adapters: a trace workload needs at least one adapter")
    arrival = read_azure_trace(trace.path)[0] * trace.time_scale
    total = float(np.count_nonzero(arrival < duration)) / duration
    rates = total * adapter_weights(n, trace.mapping, trace.alpha)
    if items is not None:
        return tuple(
            AdapterSpec.from_dict(
                item, f"adapters[{i}]", default_id=_adapter_id(i), default_rate=float(rates[i])
            )
            for i, item in enumerate(items)
        )
    try:
        rng = np.random.default_rng(_seed(extra.get("seed", 0), "seed"))
        ranks = _rank_list(n, extra.get("ranks", list(DEFAULT_RANKS)), rng, shuffle=False)
    except WorkloadError as exc:
        raise WorkloadError(f"trace.{exc}") from None
    return tuple(AdapterSpec(_adapter_id(i), ranks[i], float(rates[i])) for i in range(n))


class _FlowMap(dict):
    """Marker: dump this mapping on one line (keeps 5,000-adapter YAMLs readable)."""


class _Dumper(yaml.SafeDumper):
    pass


def _represent_flow(dumper: yaml.SafeDumper, data: _FlowMap) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_Dumper.add_representer(_FlowMap, _represent_flow)
