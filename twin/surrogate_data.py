"""Training data for the surrogate: a designed space of replicas, each run once in the twin.

``sample_space`` draws ``SampleSpec``s — small, seeded, self-contained descriptions of one
(ReplicaLoad, EngineConfig) — over the space placement explores: 1 to 1,500 adapters, uniform /
Zipf / few-hot / three-level rates, rank mixes of 8/16/32/64, a max_loras grid, several length
models, and offered loads from light to heavily overloaded. The load is set relative to the
analytic capacity estimate of ``twin.surrogate_features`` and concentrated around it, because
the saturation boundary is where placement decides and where the targets bend. A spec rebuilds
its load and config exactly (``SampleSpec.build``), so a stored table can be re-featurised
without re-running the twin.

``run_samples`` runs the twin on every spec (processes, tasks batched to >= 50 ms) and returns
one DataFrame row per run: spec columns (``spec_*``), FEATURE_NAMES, and the twin's targets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

from twin.config import VALID_MAX_LORA_RANKS, ConfigError, EngineConfig
from twin.lengths import LengthModel, sharegpt
from twin.profile import InfeasibleConfigError, Profile
from twin.replica import PREDICTED_METRICS, ReplicaLoad, TwinPredictor
from twin.surrogate_features import FEATURE_NAMES, FeatureBuilder

RATE_SHAPES: tuple[str, ...] = ("uniform", "zipf", "few_hot", "levels")
RANKS: tuple[int, ...] = (8, 16, 32, 64)
MAX_LORAS_GRID: tuple[int, ...] = (
    1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 384, 512,
)
MAX_NUM_SEQS: dict[int, float] = {64: 0.05, 128: 0.1, 256: 0.25, 512: 0.15, 1024: 0.15, 2048: 0.3}
BUDGETS: dict[int, float] = {2048: 0.5, 4096: 0.25, 8192: 0.25}
# offered load / analytic capacity: (weight, low, high), log-uniform within each band
LOAD_BANDS: tuple[tuple[float, float, float], ...] = (
    (0.15, 0.03, 0.25), (0.62, 0.25, 1.2), (0.23, 1.2, 4.0),
)
# The capped design (``sample_space(..., design="capped")``): a client holding at most C requests in
# flight (C log-uniform in CAP_RANGE) in front of replicas offered CAPPED_LOAD times their analytic
# capacity, where the cap decides how long a queue the engine walks. Beyond ~10x a capped queue
# is full within minutes, so heavier overloads look alike and the trees' flat extrapolation fits.
CAP_RANGE: tuple[float, float] = (2_000.0, 60_000.0)
CAPPED_LOAD: tuple[tuple[float, float, float], ...] = ((1.0, 0.8, 10.0),)
# The light capped design: the same client in front of replicas offered 0.1-0.8x their capacity.
# A measured run is behind its harness's cap whatever its load, so the capped ensemble must see
# capped replicas that are not overloaded too; without them it read light capped loads from
# overloaded ones (on 200 held-out such twin runs, Llama / Qwen: throughput SMAPE 6.7 / 6.6 %
# without them, 4.7 / 5.8 % with; starvation macro-F1 0.920 / 0.956 without, 0.926 / 0.962 with).
CAPPED_LIGHT_LOAD: tuple[tuple[float, float, float], ...] = ((1.0, 0.1, 0.8),)


# The wide design: what users bring beyond the first design's menu (issue #17: a 400-adapter
# classification service with 64-token prompts and 24-token answers planned 90 replicas where
# one serves). Lengths are drawn, not picked from a menu: prompt and output means log-uniform over
# WIDE_PROMPT / WIDE_OUTPUT tokens, lognormal (spread WIDE_CV) or fixed; adapters up to
# WIDE_MAX_ADAPTERS (so per-adapter rates reach 0.001 req/s and below); max_loras from the grid
# placement chooses from (placement.policy.DEFAULT_MAX_LORAS_GRID), plus every adapter on its slot.
WIDE_PROMPT: tuple[float, float] = (4.0, 4000.0)
WIDE_OUTPUT: tuple[float, float] = (2.0, 2000.0)
WIDE_CV: tuple[float, float] = (0.2, 1.2)
WIDE_FIXED_SHARE = 0.3
WIDE_MAX_ADAPTERS = 5000
WIDE_MAX_TOTAL = 8192  # longest prompt + output drawn (and at most the profile's context)
PLACEMENT_MAX_LORAS: tuple[int, ...] = (
    1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
)


@dataclass(frozen=True)
class Design:
    """One part of the training design. Each draws from its own random stream, so adding runs
    of one part never changes the specs (or the held-out split) of another."""

    stream: int  # 0: the plain seed (the first design); k: the stream [seed, k]
    load_bands: tuple[tuple[float, float, float], ...]  # offered / analytic capacity
    capped: bool  # behind a client holding at most C (CAP_RANGE) requests in flight
    wide: bool = False  # drawn lengths, up to WIDE_MAX_ADAPTERS adapters, placement's grid


DESIGNS: dict[str, Design] = {
    "uncapped": Design(0, LOAD_BANDS, capped=False),
    "capped": Design(1, CAPPED_LOAD, capped=True),
    "capped_light": Design(2, CAPPED_LIGHT_LOAD, capped=True),
    "wide": Design(3, LOAD_BANDS, capped=False, wide=True),
}
MIN_REQUESTS = 20  # a run with fewer offered requests says nothing about the replica
TARGET_TASK_S = 0.05  # batch runs into tasks of at least this much estimated work
_S_PER_REQUEST = 1.6e-6  # twin cost per offered request (benchmarks: ~1.5 us), for batching
_S_PER_RUN = 0.01
TARGETS: tuple[str, ...] = PREDICTED_METRICS


def length_menu(max_model_len: int) -> tuple[tuple[str, LengthModel, float], ...]:
    """(name, length model, weight) choices; CPU-sized when the context is short."""
    if max_model_len >= 4096:
        return (
            ("sharegpt", sharegpt(), 0.4),
            ("sharegpt-short", sharegpt(120.0, 100.0), 0.1),
            ("sharegpt-long", sharegpt(400.0, 320.0), 0.1),
            ("chat", LengthModel(kind="lognormal", prompt_mean=80.0, prompt_std=60.0,
                                 output_mean=350.0, output_std=250.0, max_total=4096), 0.15),
            ("rag", LengthModel(kind="lognormal", prompt_mean=1500.0, prompt_std=900.0,
                                output_mean=120.0, output_std=80.0, max_total=4096), 0.15),
            ("fixed-512-128", LengthModel(kind="fixed", prompt=512, output=128), 0.1),
        )
    cap = max(max_model_len - 8, 16)
    return (
        ("cpu-short", LengthModel(kind="lognormal", prompt_mean=96.0, prompt_std=60.0,
                                  output_mean=48.0, output_std=30.0, max_total=cap), 0.5),
        ("cpu-chat", LengthModel(kind="lognormal", prompt_mean=40.0, prompt_std=25.0,
                                 output_mean=120.0, output_std=60.0, max_total=cap), 0.25),
        ("cpu-fixed", LengthModel(kind="fixed", prompt=min(128, cap // 2),
                                  output=min(32, cap // 4)), 0.25),
    )


@dataclass(frozen=True)
class SampleSpec:
    """One designed replica; ``build`` turns it into (load, config) deterministically."""

    seed: int
    n_adapters: int
    shape: str
    shape_param: float  # zipf alpha; few_hot hot share; unused otherwise
    n_hot: int
    ranks: str  # "8:0.5,16:0.5"
    lengths: str  # a name in length_menu
    total_rate_rps: float
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_num_seqs: int
    max_num_batched_tokens: int
    client_max_inflight: int = 0  # 0: an unbounded client (tables written before it: 0)

    def weights(self) -> np.ndarray:
        """Relative per-adapter rates (sum 1), hottest first (rank assignment is shuffled)."""
        n = self.n_adapters
        if self.shape == "uniform":
            w = np.ones(n)
        elif self.shape == "zipf":
            w = np.arange(1, n + 1, dtype=float) ** -self.shape_param
        elif self.shape == "few_hot":
            hot = min(self.n_hot, n)
            w = np.full(n, (1 - self.shape_param) / max(n - hot, 1))
            w[:hot] = self.shape_param / hot if hot < n else 1.0 / n
        elif self.shape == "levels":  # the reference runs' recipe: rates 4:2:1 round-robin
            w = np.array([4.0, 2.0, 1.0])[np.arange(n) % 3]
        else:
            raise ValueError(f"shape: must be one of {list(RATE_SHAPES)}, got {self.shape!r}")
        return w / w.sum()

    def rank_list(self) -> np.ndarray:
        """Exact-proportion rank mix (largest remainder), shuffled with the spec's seed."""
        pairs = [(int(r), float(f)) for r, f in (p.split(":") for p in self.ranks.split(","))]
        exact = np.array([f for _, f in pairs]) * self.n_adapters
        counts = np.floor(exact).astype(int)
        short = self.n_adapters - counts.sum()
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        ranks = np.repeat([r for r, _ in pairs], counts)
        return np.random.default_rng(self.seed).permutation(ranks)

    def build(self, menu: dict[str, LengthModel]) -> tuple[ReplicaLoad, EngineConfig]:
        lengths = menu.get(self.lengths) or parse_lengths(self.lengths)
        load = ReplicaLoad(
            adapter_ids=tuple(f"a{i}" for i in range(self.n_adapters)),
            ranks=self.rank_list(),
            rates_rps=self.total_rate_rps * self.weights(),
            lengths=lengths,
            client_max_inflight=self.client_max_inflight or None,
        )
        config = EngineConfig(
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )
        return load, config

    def to_row(self) -> dict[str, Any]:
        return {f"spec_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: pd.Series | dict[str, Any]) -> SampleSpec:
        kw = {}
        for f in fields(cls):
            key = f"spec_{f.name}"
            if f.default is not MISSING and (key not in row or pd.isna(row[key])):
                continue  # a column newer than the table (client_max_inflight): its default
            v = row[key]
            kw[f.name] = v if f.type == "str" else (float(v) if f.type == "float" else int(v))
        return cls(**kw)


def lengths_name(model: LengthModel) -> str:
    """A drawn length model as the spec's ``lengths`` text (``parse_lengths`` reads it back):
    ``fixed:P:O`` or ``lognormal:Pmean:Pstd:Omean:Ostd:max_total``."""
    if model.kind == "fixed":
        return f"fixed:{model.prompt}:{model.output}"
    if model.kind == "lognormal":
        return (f"lognormal:{model.prompt_mean:g}:{model.prompt_std:g}:{model.output_mean:g}:"
                f"{model.output_std:g}:{model.max_total}")
    raise ValueError(f"lengths: only fixed and lognormal models are drawn, got {model.kind!r}")


def parse_lengths(text: str) -> LengthModel:
    """The length model a spec's ``lengths`` names when it is not a menu entry (the wide
    design's drawn ones, ``lengths_name``); ValueError naming the text otherwise."""
    kind, _, rest = text.partition(":")
    try:
        values = [float(v) for v in rest.split(":")] if rest else []
        if kind == "fixed" and len(values) == 2:
            return LengthModel(kind="fixed", prompt=int(values[0]), output=int(values[1]))
        if kind == "lognormal" and len(values) == 5:
            return LengthModel(kind="lognormal", prompt_mean=values[0], prompt_std=values[1],
                               output_mean=values[2], output_std=values[3],
                               max_total=int(values[4]))
    except ValueError:
        pass
    raise ValueError(f"lengths: {text!r} is neither a menu entry nor a drawn length model "
                     "(fixed:P:O or lognormal:Pmean:Pstd:Omean:Ostd:max_total)")


def _draw_lengths(rng: np.random.Generator, max_model_len: int) -> LengthModel:
    """The wide design's length model: means log-uniform over WIDE_PROMPT / WIDE_OUTPUT (both
    within the context), lognormal with a drawn spread or fixed."""
    top = min(WIDE_MAX_TOTAL, max_model_len - 8)
    prompt = _log_uniform(rng, WIDE_PROMPT[0], min(WIDE_PROMPT[1], top / 2))
    output = _log_uniform(rng, WIDE_OUTPUT[0], min(WIDE_OUTPUT[1], top - prompt))
    if rng.random() < WIDE_FIXED_SHARE:
        return LengthModel(kind="fixed", prompt=max(1, round(prompt)), output=max(1, round(output)))
    cv_p, cv_o = (float(rng.uniform(*WIDE_CV)) for _ in range(2))
    return LengthModel(kind="lognormal", prompt_mean=round(prompt, 1),
                       prompt_std=round(prompt * cv_p, 1), output_mean=round(output, 1),
                       output_std=round(output * cv_o, 1), max_total=int(top))


def _choice(rng: np.random.Generator, table: dict[int, float]) -> int:
    keys = list(table)
    p = np.array([table[k] for k in keys])
    return int(keys[rng.choice(len(keys), p=p / p.sum())])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_shape(rng: np.random.Generator, n: int) -> tuple[str, float, int]:
    shape = RATE_SHAPES[rng.choice(4, p=[0.25, 0.3, 0.25, 0.2])]
    if shape == "zipf":
        return shape, float(rng.uniform(0.6, 1.6)), 0
    if shape == "few_hot":
        return shape, float(rng.uniform(0.5, 0.95)), int(rng.integers(1, min(8, n) + 1))
    return shape, 0.0, 0


def _draw_ranks(rng: np.random.Generator) -> str:
    k = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.35, 0.2, 0.1]))
    chosen = sorted(rng.choice(RANKS, size=k, replace=False).tolist())
    frac = rng.dirichlet(np.ones(k))
    return ",".join(f"{r}:{f:.4f}" for r, f in zip(chosen, frac, strict=True))


def _slot_rank(max_rank: int, rng: np.random.Generator) -> int:
    """The smallest vLLM slot rank that holds the adapters; sometimes one size larger."""
    valid = [r for r in VALID_MAX_LORA_RANKS if r >= max_rank]
    return valid[1] if len(valid) > 1 and valid[1] <= 128 and rng.random() < 0.1 else valid[0]


def _draw_one(
    rng: np.random.Generator, profile: Profile, builder: FeatureBuilder,
    menu: tuple[tuple[str, LengthModel, float], ...], duration_s: float, design: Design,
) -> SampleSpec | None:
    """One spec, or None when no max_loras of the grid fits this profile's memory."""
    seed = int(rng.integers(0, 2**31 - 1))
    most = WIDE_MAX_ADAPTERS if design.wide else 1500
    n = int(rng.integers(1, 8)) if rng.random() < 0.1 else round(_log_uniform(rng, 8, most))
    shape, param, n_hot = _draw_shape(rng, n)
    ranks = _draw_ranks(rng)
    max_rank = max(int(p.split(":")[0]) for p in ranks.split(","))
    slot_rank = _slot_rank(max_rank, rng)
    grid = [g for g in (PLACEMENT_MAX_LORAS if design.wide else MAX_LORAS_GRID) if g <= n]
    if n not in grid and rng.random() < 0.15:
        grid = [n]
    feasible = []
    for g in grid:
        try:
            profile.check_feasible(EngineConfig(max_loras=g, max_lora_rank=slot_rank))
            feasible.append(g)
        except InfeasibleConfigError:
            break  # KV capacity falls with max_loras: larger ones cannot fit either
    if not feasible:
        return None
    max_loras = int(feasible[rng.integers(len(feasible))])
    cpu = n if rng.random() < 0.85 else int(rng.integers(max_loras, n + 1))
    mns = _choice(rng, MAX_NUM_SEQS)
    budget = max(_choice(rng, BUDGETS), mns)
    if design.wide:
        drawn = _draw_lengths(rng, profile.max_model_len)
        lengths = lengths_name(drawn)
        menu = (*menu, (lengths, drawn, 0.0))
    else:
        names, _, weights = zip(*menu, strict=True)
        lengths = names[rng.choice(len(names), p=np.array(weights) / sum(weights))]
    bands = design.load_bands
    band = bands[rng.choice(len(bands), p=[b[0] for b in bands])]
    ratio = _log_uniform(rng, band[1], band[2])
    cap = round(_log_uniform(rng, *CAP_RANGE)) if design.capped else 0
    spec = SampleSpec(seed, n, shape, param, n_hot, ranks, lengths, 1.0, max_loras, max(cpu, 1),
                      slot_rank, mns, budget, cap)
    load, config = spec.build({name: lm for name, lm, _ in menu})
    capacity_rps = builder([load], [config])[0, FEATURE_NAMES.index("capacity_rps")]
    rate = max(ratio * capacity_rps, MIN_REQUESTS / duration_s)
    return SampleSpec(**{**asdict(spec), "total_rate_rps": float(rate)})


def sample_space(
    n: int, profile: Profile, seed: int = 0, duration_s: float = 3600.0, *,
    design: str = "uncapped",
) -> list[SampleSpec]:
    """``n`` seeded specs over the designed space (same inputs, same specs; a prefix of a larger
    design equals the smaller one).

    ``design``: a name in DESIGNS — ``uncapped`` (the planning model's), ``capped`` (overloaded
    replicas behind a client's in-flight cap) or ``capped_light`` (the same client, replicas
    below capacity).
    """
    if design not in DESIGNS:
        raise ValueError(f"design: one of {list(DESIGNS)}, got {design!r}")
    part = DESIGNS[design]
    rng = np.random.default_rng([seed, part.stream] if part.stream else seed)
    builder = FeatureBuilder(profile)
    menu = length_menu(profile.max_model_len)
    specs: list[SampleSpec] = []
    while len(specs) < n:
        spec = _draw_one(rng, profile, builder, menu, duration_s, part)
        if spec is not None:
            specs.append(spec)
    return specs


def table_designs(table: pd.DataFrame) -> np.ndarray:
    """Each row's design name; a table from before the ``design`` column holds the first two
    designs only, told apart by the client's cap."""
    if "design" in table:
        return table["design"].to_numpy(str)
    cap = table.get("spec_client_max_inflight", pd.Series(0, index=table.index))
    return np.where(cap.fillna(0).to_numpy() > 0, "capped", "uncapped")


def _estimated_s(spec: SampleSpec, duration_s: float) -> float:
    return _S_PER_RUN + _S_PER_REQUEST * spec.total_rate_rps * duration_s


def _batches(
    specs: Sequence[SampleSpec], duration_s: float, min_task_s: float
) -> Iterator[list[int]]:
    """Consecutive indices grouped into tasks of at least ``min_task_s`` estimated seconds."""
    batch: list[int] = []
    cost = 0.0
    for i, spec in enumerate(specs):
        batch.append(i)
        cost += _estimated_s(spec, duration_s)
        if cost >= min_task_s:
            yield batch
            batch, cost = [], 0.0
    if batch:
        yield batch


def _run_batch(
    specs: list[SampleSpec], profile: Profile, duration_s: float
) -> list[dict[str, Any] | None]:
    """Twin runs of a batch (None for a config the profile cannot start)."""
    menu = {name: lm for name, lm, _ in length_menu(profile.max_model_len)}
    out: list[dict[str, Any] | None] = []
    for spec in specs:
        load, config = spec.build(menu)
        twin = TwinPredictor(profile, duration_s=duration_s, seed=spec.seed)
        t0 = time.perf_counter()
        try:
            metrics = twin.predict_one(load, config)
        except (InfeasibleConfigError, ConfigError):
            out.append(None)
            continue
        out.append({**metrics, "twin_wall_s": time.perf_counter() - t0})
    return out


def featurize(specs: Sequence[SampleSpec], profile: Profile) -> np.ndarray:
    """Feature matrix of stored specs (rebuilds each load; no twin run)."""
    menu = {name: lm for name, lm, _ in length_menu(profile.max_model_len)}
    pairs = [s.build(menu) for s in specs]
    return FeatureBuilder(profile)([p[0] for p in pairs], [p[1] for p in pairs])


def run_samples(
    specs: Sequence[SampleSpec],
    profile: Profile,
    *,
    duration_s: float = 3600.0,
    workers: int = 2,
    min_task_s: float = TARGET_TASK_S,
    progress: bool | Callable[[int, int], None] = False,
) -> pd.DataFrame:
    """Run the twin on every spec; one row per feasible spec (spec, features, targets)."""
    results: list[dict[str, Any] | None] = [None] * len(specs)
    batches = list(_batches(specs, duration_s, min_task_s))
    with _Progress(progress, len(specs)) as advance:
        if workers <= 1:
            for idx in batches:
                for i, res in zip(idx, _run_batch([specs[i] for i in idx], profile, duration_s),
                                  strict=True):
                    results[i] = res
                advance(len(idx))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {
                    pool.submit(_run_batch, [specs[i] for i in idx], profile, duration_s): idx
                    for idx in batches
                }
                for fut in as_completed(futures):
                    idx = futures[fut]
                    for i, res in zip(idx, fut.result(), strict=True):
                        results[i] = res
                    advance(len(idx))
    keep = [i for i, r in enumerate(results) if r is not None]
    kept = [specs[i] for i in keep]
    spec_cols = [f"spec_{f.name}" for f in fields(SampleSpec)]
    table = pd.concat(
        [
            pd.DataFrame([s.to_row() for s in kept], columns=spec_cols),
            pd.DataFrame(featurize(kept, profile) if kept else None,
                         columns=list(FEATURE_NAMES)),
            pd.DataFrame([results[i] for i in keep], columns=[*TARGETS, "twin_wall_s"]),
        ],
        axis=1,
    )
    table["spec_duration_s"] = duration_s
    table["starved"] = table["starved"].astype(bool)
    return table


class _Progress:
    """Context manager yielding ``advance(k)``: a rich bar, a callback, or nothing."""

    def __init__(self, progress: bool | Callable[[int, int], None], total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if self.progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                "twin runs", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task("runs", total=self.total)
        return self._advance

    def _advance(self, k: int) -> None:
        self.done += k
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif callable(self.progress):
            self.progress(self.done, self.total)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

