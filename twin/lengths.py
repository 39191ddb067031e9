"""Request-length models: how many prompt and output tokens each request carries.

A request's cost in the twin is its prefill (prompt tokens) and decode (output tokens) work, so a
workload needs a joint distribution of both. ``LengthModel`` is one frozen spec covering the
kinds we use; ``sample`` is vectorised and driven only by the ``numpy`` Generator it is given, so
the same generator state always yields the same arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class WorkloadError(ValueError):
    """A workload/length spec that cannot be used; the message starts with the offending field."""


KINDS: tuple[str, ...] = ("fixed", "normal", "lognormal", "empirical", "sharegpt")

# ---------------------------------------------------------------------------------------------
# ShareGPT stand-in.
#
# vLLM's serving benchmark samples ShareGPT V3 (ShareGPT_V3_unfiltered_cleaned_split.json): first
# human turn = prompt, first model turn = completion, keeping pairs with prompt 4..1024 tokens,
# completion >= 4 tokens and prompt + completion <= 2048 tokens. Facts about that filtered pool
# (Agullo et al., reference-data README of the LoRA-serving digital twin):
#   * Llama-3 tokenizer: mean 222.7 prompt tokens, 198 output tokens per request;
#   * Llama-2 tokenizer: prompt mean 250.9, P25 23, P75 423; output mean 231.5, P25 27, P75 359.
# We do not ship the data set. Instead each dimension is a 2-component lognormal mixture (a short
# "chat question / short answer" mode and a long "pasted text / long answer" mode) fitted, under
# the filters, to the Llama-2 quartiles scaled to Llama-3 units (x 222.7/250.9 for prompts,
# x 198/231.5 for outputs). Prompt and output are drawn independently and the filters are applied
# by rejection on the rounded integers, exactly like the benchmark filters the real pool. At run
# time the mixtures are rescaled (a common factor per dimension) so that the filtered means hit
# the targets exactly (222.7 / 198 by default, or ``prompt_mean`` / ``output_mean``).
# ---------------------------------------------------------------------------------------------
SHAREGPT_PROMPT_MEAN = 222.7
SHAREGPT_OUTPUT_MEAN = 198.0
SHAREGPT_LLAMA2 = {
    "prompt": {"mean": 250.9, "p25": 23.0, "p75": 423.0},
    "output": {"mean": 231.5, "p25": 27.0, "p75": 359.0},
}
SHAREGPT_FILTERS: dict[str, int] = {
    "min_prompt": 4,
    "max_prompt": 1024,
    "min_output": 4,
    "max_total": 2048,
}
# (weight, mu, sigma) of ln(tokens) per component, Llama-3 units, before mean calibration.
_SHAREGPT_PROMPT_MIX: tuple[tuple[float, float, float], ...] = (
    (0.4649, 2.9032, 0.8383),
    (0.5351, 5.8878, 0.5133),
)
_SHAREGPT_OUTPUT_MIX: tuple[tuple[float, float, float], ...] = (
    (0.5240, 3.1714, 0.7929),
    (0.4760, 5.7600, 0.6170),
)

_INT_FIELDS = (
    "prompt",
    "output",
    "min_prompt",
    "max_prompt",
    "min_output",
    "max_output",
    "max_total",
)
_FLOAT_FIELDS = ("prompt_mean", "prompt_std", "output_mean", "output_std")
_BOUND_FIELDS = ("min_prompt", "max_prompt", "min_output", "max_output", "max_total")
_KIND_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required, optional)
    "fixed": (("prompt", "output"), ()),
    "normal": (("prompt_mean", "prompt_std", "output_mean", "output_std"), _BOUND_FIELDS),
    "lognormal": (("prompt_mean", "prompt_std", "output_mean", "output_std"), _BOUND_FIELDS),
    "empirical": (("path",), _BOUND_FIELDS),
    "sharegpt": ((), ("prompt_mean", "output_mean", *_BOUND_FIELDS)),
}
# Column names accepted by the empirical kind: our own, then the Azure LLM trace's.
_EMPIRICAL_COLUMNS = (("prompt_tokens", "output_tokens"), ("ContextTokens", "GeneratedTokens"))
_INT32_MAX = 2**31 - 1
_MEAN_SAMPLES = 1_000_000  # sample size of the deterministic mean estimate (normal/lognormal)


class Bounds(NamedTuple):
    """Effective token bounds of a model (``None`` = unbounded)."""

    min_prompt: int
    max_prompt: int | None
    min_output: int
    max_output: int | None
    max_total: int | None


@dataclass(frozen=True)
class LengthModel:
    """Joint distribution of (prompt, output) token counts of one request.

    Kinds and their fields:

    * ``fixed``: ``prompt``, ``output``: every request identical.
    * ``normal``: ``prompt_mean``, ``prompt_std``, ``output_mean``, ``output_std``; rounded.
    * ``lognormal``: same fields, the mean/std of the lognormal variable itself (not of its log).
    * ``empirical``: ``path`` to a CSV with ``prompt_tokens,output_tokens`` (or the Azure trace's
      ``ContextTokens,GeneratedTokens``); rows are resampled with replacement, pairs kept joint.
    * ``sharegpt``: built-in stand-in for vLLM's ShareGPT V3 benchmark pool (see module notes);
      ``prompt_mean``/``output_mean`` rescale it to another pool's means (defaults 222.7 / 198).

    Bounds ``min_prompt``, ``max_prompt``, ``min_output``, ``max_output``, ``max_total``
    (prompt + output) *clamp* samples for normal/lognormal/empirical (mins default to 1). For
    sharegpt they are the benchmark's *filters*, applied by rejection (defaults 4, 1024, 4, none,
    2048). Every sampled value is >= 1.
    """

    kind: str
    prompt: int | None = None
    output: int | None = None
    prompt_mean: float | None = None
    prompt_std: float | None = None
    output_mean: float | None = None
    output_std: float | None = None
    path: str | None = None
    min_prompt: int | None = None
    max_prompt: int | None = None
    min_output: int | None = None
    max_output: int | None = None
    max_total: int | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in _validate(values, "lengths").items():
            object.__setattr__(self, name, value)

    # -- construction / serialisation ---------------------------------------------------------

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], where: str = "lengths", *, base_dir: str | Path | None = None
    ) -> LengthModel:
        """Build from a YAML mapping; errors name ``where.<field>``. Relative ``path`` values
        are resolved against ``base_dir`` (the YAML file's directory) when given."""
        if not isinstance(d, Mapping):
            raise WorkloadError(f"{where}: must be a mapping with a 'kind', got {d!r}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise WorkloadError(f"{where}.{key}: unknown key; expected one of {sorted(known)}")
        values = dict(d)
        if "kind" in values and values["kind"] == "empirical" and "path" in values:
            values["path"] = _resolve(values["path"], base_dir, f"{where}.path")
        values = _validate(values, where)
        model = cls(**values)
        if model.kind == "empirical":
            _load_empirical_checked(model.path, f"{where}.path")  # fail at the boundary
        return model

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set, ``kind`` first (round-trips through ``from_dict``)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "kind" and value is not None:
                out[f.name] = value
        return out

    # -- behaviour -----------------------------------------------------------------------------

    @property
    def bounds(self) -> Bounds:
        """Effective bounds: sharegpt's filters by default, otherwise just ``>= 1``."""
        if self.kind == "sharegpt":
            d = SHAREGPT_FILTERS
            return Bounds(
                self.min_prompt if self.min_prompt is not None else d["min_prompt"],
                self.max_prompt if self.max_prompt is not None else d["max_prompt"],
                self.min_output if self.min_output is not None else d["min_output"],
                self.max_output,
                self.max_total if self.max_total is not None else d["max_total"],
            )
        return Bounds(
            self.min_prompt if self.min_prompt is not None else 1,
            self.max_prompt,
            self.min_output if self.min_output is not None else 1,
            self.max_output,
            self.max_total,
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_len int32[n], output_len int32[n]); every value >= 1."""
        if n < 0:
            raise WorkloadError(f"n: must be >= 0, got {n}")
        if self.kind == "sharegpt":
            p, o = _sample_sharegpt(self, rng, n)
        else:
            if self.kind == "fixed":
                assert self.prompt is not None and self.output is not None
                p = np.full(n, self.prompt, dtype=np.int64)
                o = np.full(n, self.output, dtype=np.int64)
            elif self.kind == "normal":
                p = _round(rng.normal(self.prompt_mean, self.prompt_std, n))
                o = _round(rng.normal(self.output_mean, self.output_std, n))
            elif self.kind == "lognormal":
                p = _round(_lognormal(rng, self.prompt_mean, self.prompt_std, n))
                o = _round(_lognormal(rng, self.output_mean, self.output_std, n))
            else:  # empirical
                table_p, table_o = _load_empirical_checked(self.path, "lengths.path")
                idx = rng.integers(0, table_p.size, n)
                p, o = table_p[idx], table_o[idx]
            p, o = _clamp(p, o, self.bounds)
        return p.astype(np.int32), o.astype(np.int32)

    def mean_prompt(self) -> float:
        """Expected prompt tokens per request (exact, or a fixed-seed 1M-sample estimate)."""
        return _means(self)[0]

    def mean_output(self) -> float:
        """Expected output tokens per request (exact, or a fixed-seed 1M-sample estimate)."""
        return _means(self)[1]


def sharegpt(prompt_mean: float | None = None, output_mean: float | None = None) -> LengthModel:
    """The ShareGPT stand-in (optionally rescaled to other pool means)."""
    return LengthModel(kind="sharegpt", prompt_mean=prompt_mean, output_mean=output_mean)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check one model's field values; return them normalised (ints as int, floats as float)."""
    kind = values.get("kind")
    if kind is None:
        raise WorkloadError(f"{where}.kind: missing; expected one of {list(KINDS)}")
    if kind not in KINDS:
        raise WorkloadError(f"{where}.kind: must be one of {list(KINDS)}, got {kind!r}")
    required, optional = _KIND_FIELDS[kind]
    out = dict(values)
    for name, value in values.items():
        if name == "kind" or value is None:
            continue
        if name not in required and name not in optional:
            raise WorkloadError(f"{where}.{name}: not used by kind {kind!r}")
    for name in required:
        if values.get(name) is None:
            raise WorkloadError(f"{where}.{name}: required for kind {kind!r}")
    for name in _INT_FIELDS:
        if values.get(name) is not None:
            out[name] = _positive_int(values[name], f"{where}.{name}")
    for name in _FLOAT_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        is_std = name.endswith("_std")
        out[name] = _number(value, f"{where}.{name}", allow_zero=is_std)
    if values.get("path") is not None and (
        not isinstance(values["path"], str | os.PathLike) or not str(values["path"])
    ):
        raise WorkloadError(f"{where}.path: must be a file path, got {values['path']!r}")
    if values.get("path") is not None:
        out["path"] = str(values["path"])

    def get(name: str) -> int | None:
        return out.get(name)

    for lo, hi in (("min_prompt", "max_prompt"), ("min_output", "max_output")):
        lo_v = get(lo) if get(lo) is not None else _default_bound(kind, lo)
        hi_v = get(hi) if get(hi) is not None else _default_bound(kind, hi)
        if lo_v is not None and hi_v is not None and hi_v < lo_v:
            raise WorkloadError(f"{where}.{hi}: must be >= {lo} ({lo_v}), got {hi_v}")
    total = get("max_total") if get("max_total") is not None else _default_bound(kind, "max_total")
    if total is not None:
        min_p = get("min_prompt") or _default_bound(kind, "min_prompt") or 1
        min_o = get("min_output") or _default_bound(kind, "min_output") or 1
        if total < min_p + min_o:
            raise WorkloadError(
                f"{where}.max_total: must be >= min_prompt + min_output ({min_p + min_o}), "
                f"got {total}"
            )
    if kind == "sharegpt":
        for name, default in (
            ("prompt_mean", SHAREGPT_PROMPT_MEAN),
            ("output_mean", SHAREGPT_OUTPUT_MEAN),
        ):
            target = out.get(name)
            if target is not None and target != default:
                _sharegpt_log_scales(
                    out.get("prompt_mean") or SHAREGPT_PROMPT_MEAN,
                    out.get("output_mean") or SHAREGPT_OUTPUT_MEAN,
                    where,
                )
                break
    return out


def _default_bound(kind: str, name: str) -> int | None:
    if kind == "sharegpt":
        return SHAREGPT_FILTERS.get(name)
    return 1 if name.startswith("min_") else None


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise WorkloadError(f"{where}: must be a positive integer, got {value!r}")
    return int(value)


def _number(value: Any, where: str, *, allow_zero: bool) -> float:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if ok and math.isfinite(value) and (value > 0 or (allow_zero and value == 0)):
        return float(value)
    need = "a finite number >= 0" if allow_zero else "a finite number > 0"
    raise WorkloadError(f"{where}: must be {need}, got {value!r}")


def _resolve(path: Any, base_dir: str | Path | None, where: str) -> Any:
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise WorkloadError(f"{where}: must be a file path, got {path!r}")
    p = Path(path)
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    return str(p)


# ---------------------------------------------------------------------------------------------
# plain sampling helpers
# ---------------------------------------------------------------------------------------------


def _round(x: np.ndarray) -> np.ndarray:
    """Continuous draws -> int64 token counts (clipped so the int32 cast is always safe)."""
    return np.rint(np.clip(x, 0.0, float(_INT32_MAX))).astype(np.int64)


def _lognormal(rng: np.random.Generator, mean: float | None, std: float | None, n: int):
    """Lognormal parametrised by the mean and std of the variable itself."""
    assert mean is not None and std is not None
    sigma2 = math.log1p((std / mean) ** 2)
    return rng.lognormal(math.log(mean) - sigma2 / 2.0, math.sqrt(sigma2), n)


def _clamp(p: np.ndarray, o: np.ndarray, b: Bounds) -> tuple[np.ndarray, np.ndarray]:
    """Clamp (not reject) to the bounds; max_total trims the prompt first, then the output."""
    p = np.clip(p, b.min_prompt, b.max_prompt if b.max_prompt is not None else _INT32_MAX)
    o = np.clip(o, b.min_output, b.max_output if b.max_output is not None else _INT32_MAX)
    if b.max_total is not None:
        p = np.minimum(p, b.max_total - b.min_output)
        o = np.minimum(o, b.max_total - p)
    return p, o


def _accept(p: np.ndarray, o: np.ndarray, b: Bounds) -> np.ndarray:
    keep = (p >= b.min_prompt) & (o >= b.min_output)
    if b.max_prompt is not None:
        keep &= p <= b.max_prompt
    if b.max_output is not None:
        keep &= o <= b.max_output
    if b.max_total is not None:
        keep &= p + o <= b.max_total
    return keep


@lru_cache(maxsize=64)
def _load_empirical(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as exc:  # parse errors of any flavour
        raise WorkloadError(f"cannot read CSV {path}: {exc}") from None
    cols = {str(c).strip(): c for c in df.columns}
    for p_col, o_col in _EMPIRICAL_COLUMNS:
        if p_col in cols and o_col in cols:
            break
    else:
        raise WorkloadError(
            f"CSV {path} has no columns prompt_tokens,output_tokens "
            f"(or ContextTokens,GeneratedTokens); found {list(cols)}"
        )
    if len(df) == 0:
        raise WorkloadError(f"CSV {path} has no rows")
    out = []
    for col in (p_col, o_col):
        values = pd.to_numeric(df[cols[col]], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise WorkloadError(f"CSV {path} column {col}: non-numeric value at row {bad}")
        arr = np.maximum(_round(values), 1)
        arr.setflags(write=False)
        out.append(arr)
    return out[0], out[1]


def _load_empirical_checked(path: str | None, where: str) -> tuple[np.ndarray, np.ndarray]:
    if path is None or not os.path.isfile(path):
        raise WorkloadError(f"{where}: file not found: {path}")
    st = os.stat(path)
    try:
        return _load_empirical(os.path.abspath(path), st.st_mtime_ns, st.st_size)
    except WorkloadError as exc:
        raise WorkloadError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# ShareGPT mixture: exact discrete moments, calibration, rejection sampling
# ---------------------------------------------------------------------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)
Mix = tuple[tuple[float, float, float], ...]


def _shift(mix: Mix, log_scale: float) -> Mix:
    return tuple((w, mu + log_scale, s) for w, mu, s in mix)


def _mix_pmf(lo: int, hi: int, mix: Mix) -> np.ndarray:
    """P(rint(X) = k) for k = lo..hi, X a lognormal mixture."""
    edges = np.log(np.arange(lo, hi + 2, dtype=np.float64) - 0.5)
    cdf = np.zeros_like(edges)
    for w, mu, s in mix:
        z = (edges - mu) / (s * math.sqrt(2.0))
        cdf += w * 0.5 * (1.0 + _erf(z).astype(np.float64))
    return np.diff(cdf)


def _filtered_moments(p_mix: Mix, o_mix: Mix, b: Bounds) -> tuple[float, float, float]:
    """(E[prompt], E[output], acceptance) of independent mixtures after the rejection filters."""
    assert b.max_prompt is not None and b.max_total is not None
    p = np.arange(b.min_prompt, b.max_prompt + 1)
    o_hi = b.max_total - b.min_prompt
    if b.max_output is not None:
        o_hi = min(o_hi, b.max_output)
    o = np.arange(b.min_output, o_hi + 1)
    pp = _mix_pmf(b.min_prompt, b.max_prompt, p_mix)
    po = _mix_pmf(b.min_output, o_hi, o_mix)
    c_o = np.concatenate(([0.0], np.cumsum(po)))
    m_o = np.concatenate(([0.0], np.cumsum(o * po)))
    n_ok = np.clip(np.minimum(o_hi, b.max_total - p) - b.min_output + 1, 0, o.size)
    w = pp * c_o[n_ok]
    z = float(w.sum())
    return float((p * w).sum() / z), float((pp * m_o[n_ok]).sum() / z), z


def _standard_bounds() -> Bounds:
    f = SHAREGPT_FILTERS
    return Bounds(f["min_prompt"], f["max_prompt"], f["min_output"], None, f["max_total"])


def _solve_log_scale(fn: Callable[[float], float], target: float, where: str) -> float:
    """Log scale nearest 0 with fn(l) = target.

    The filtered mean is not monotone in the scale (pushing a mixture component past the
    max-prompt filter removes it), so walk outwards from 0 to the first sign change, then refine
    that bracket by Illinois false position.
    """
    f0 = math.log(fn(0.0) / target)
    if f0 == 0.0:
        return 0.0
    direction = 1.0 if f0 < 0 else -1.0
    lo, f_lo = 0.0, f0
    best = fn(0.0)
    for i in range(1, 161):
        x = direction * 0.05 * i
        value = fn(x)
        best = max(best, value) if direction > 0 else min(best, value)
        f_x = math.log(value / target)
        if (f_x > 0) != (f0 > 0) or f_x == 0.0:
            hi, f_hi = x, f_x
            break
        lo, f_lo = x, f_x
    else:
        bound = "at most" if direction > 0 else "at least"
        raise WorkloadError(
            f"{where}: must be reachable under the ShareGPT filters ({bound} about "
            f"{best:.1f}), got {target}"
        )
    side = 0
    x = hi
    for _ in range(200):
        if f_hi == f_lo:
            break
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        f_x = math.log(fn(x) / target)
        if abs(f_x) < 1e-12 or abs(hi - lo) < 1e-12:
            break
        if (f_x > 0) == (f_hi > 0):
            hi, f_hi = x, f_x
            if side == 1:
                f_lo /= 2.0
            side = 1
        else:
            lo, f_lo = x, f_x
            if side == -1:
                f_hi /= 2.0
            side = -1
    return x


def _prompt_mean_at(log_scale: float, o_mix: Mix, b: Bounds) -> float:
    return _filtered_moments(_shift(_SHAREGPT_PROMPT_MIX, log_scale), o_mix, b)[0]


def _output_mean_at(log_scale: float, p_mix: Mix, b: Bounds) -> float:
    return _filtered_moments(p_mix, _shift(_SHAREGPT_OUTPUT_MIX, log_scale), b)[1]


@lru_cache(maxsize=64)
def _sharegpt_log_scales(
    prompt_mean: float, output_mean: float, where: str = "lengths"
) -> tuple[float, float]:
    """Per-dimension log scale factors that put the filtered means on the targets (standard
    filters; the joint prompt+output cap couples them, so alternate 1-D solves)."""
    b = _standard_bounds()
    lp = lo = 0.0
    for _ in range(50):
        o_mix = _shift(_SHAREGPT_OUTPUT_MIX, lo)
        lp = _solve_log_scale(
            partial(_prompt_mean_at, o_mix=o_mix, b=b), prompt_mean, f"{where}.prompt_mean"
        )
        p_mix = _shift(_SHAREGPT_PROMPT_MIX, lp)
        lo = _solve_log_scale(
            partial(_output_mean_at, p_mix=p_mix, b=b), output_mean, f"{where}.output_mean"
        )
        mp, mo, _ = _filtered_moments(p_mix, _shift(_SHAREGPT_OUTPUT_MIX, lo), b)
        if abs(mp / prompt_mean - 1) < 1e-9 and abs(mo / output_mean - 1) < 1e-9:
            break
    return lp, lo


def _sharegpt_mixes(model: LengthModel) -> tuple[Mix, Mix]:
    lp, lo = _sharegpt_log_scales(
        model.prompt_mean if model.prompt_mean is not None else SHAREGPT_PROMPT_MEAN,
        model.output_mean if model.output_mean is not None else SHAREGPT_OUTPUT_MEAN,
    )
    return _shift(_SHAREGPT_PROMPT_MIX, lp), _shift(_SHAREGPT_OUTPUT_MIX, lo)


def _draw_mix(rng: np.random.Generator, mix: Mix, m: int) -> np.ndarray:
    weights = np.cumsum([w for w, _, _ in mix])
    comp = np.minimum(
        np.searchsorted(weights / weights[-1], rng.random(m), side="right"), len(mix) - 1
    )
    mu = np.array([c[1] for c in mix])[comp]
    sigma = np.array([c[2] for c in mix])[comp]
    return _round(np.exp(np.minimum(mu + sigma * rng.standard_normal(m), 30.0)))


def _sample_sharegpt(
    model: LengthModel, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, np.ndarray]:
    p_mix, o_mix = _sharegpt_mixes(model)
    b = model.bounds
    acceptance = max(_moments_sharegpt(model)[2], 1e-3)
    ps: list[np.ndarray] = []
    os_: list[np.ndarray] = []
    have = 0
    while have < n:
        m = int((n - have) / acceptance * 1.05) + 64
        p = _draw_mix(rng, p_mix, m)
        o = _draw_mix(rng, o_mix, m)
        keep = _accept(p, o, b)
        ps.append(p[keep])
        os_.append(o[keep])
        have += int(keep.sum())
    if not ps:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ps)[:n], np.concatenate(os_)[:n]


@lru_cache(maxsize=64)
def _moments_sharegpt(model: LengthModel) -> tuple[float, float, float]:
    p_mix, o_mix = _sharegpt_mixes(model)
    return _filtered_moments(p_mix, o_mix, model.bounds)


@lru_cache(maxsize=256)
def _means(model: LengthModel) -> tuple[float, float]:
    """Deterministic means: exact for fixed/empirical/sharegpt, fixed-seed sample otherwise."""
    if model.kind == "sharegpt":
        mp, mo, _ = _moments_sharegpt(model)
        return mp, mo
    if model.kind == "fixed":
        p, o = model.sample(np.random.default_rng(0), 1)
    elif model.kind == "empirical":
        table_p, table_o = _load_empirical_checked(model.path, "lengths.path")
        p, o = _clamp(table_p, table_o, model.bounds)
    else:
        p, o = model.sample(np.random.default_rng(0x5EED), _MEAN_SAMPLES)
    return float(np.mean(p, dtype=np.float64)), float(np.mean(o, dtype=np.float64))
