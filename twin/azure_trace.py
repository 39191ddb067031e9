"""Loader for the Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens`` CSV).

The public Azure traces give real arrival burstiness and real prompt/output lengths but no
adapter identity, so requests are mapped onto the workload's adapters by a popularity rule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from twin.lengths import WorkloadError
from twin.requests import RequestBatch

AZURE_COLUMNS: tuple[str, ...] = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAPPINGS: tuple[str, ...] = ("zipf", "uniform", "round_robin")


def adapter_weights(n_adapters: int, mapping: str = "zipf", alpha: float = 1.0) -> np.ndarray:
    """Share of trace requests each adapter receives under ``mapping`` (sums to 1).

    zipf: adapter i gets a share proportional to 1/(i+1)^alpha (adapter 0 hottest); uniform and
    round_robin: 1/n each.
    """
    if mapping not in MAPPINGS:
        raise WorkloadError(f"mapping: must be one of {list(MAPPINGS)}, got {mapping!r}")
    if n_adapters < 1:
        raise WorkloadError(f"n_adapters: must be a positive integer, got {n_adapters}")
    if mapping == "zipf":
        w = np.arange(1, n_adapters + 1, dtype=np.float64) ** -float(alpha)
        return w / w.sum()
    return np.full(n_adapters, 1.0 / n_adapters)


def read_azure_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival_s float64 from 0, context int32 >= 1, generated int32 >= 1), arrival-sorted.

    Parsed once per file version (cached on path, mtime and size); arrays are read-only.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.isfile(p):
        raise WorkloadError(f"{path}: file not found")
    st = os.stat(p)
    return _read_cached(p, st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many parser error types
        raise WorkloadError(f"{path}: cannot read CSV: {exc}") from None
    by_name = {str(c).strip().lower(): c for c in df.columns}
    missing = [c for c in AZURE_COLUMNS if c.lower() not in by_name]
    if missing:
        raise WorkloadError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {list(df.columns)})"
        )
    if len(df) == 0:
        raise WorkloadError(f"{path}: no requests in trace")
    arrival = _parse_timestamps(df[by_name["timestamp"]], path)
    tokens = []
    for name in AZURE_COLUMNS[1:]:
        col = df[by_name[name.lower()]].str.strip()
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise WorkloadError(f"{path}: column {name}: not a number at row {row}: {col[row]!r}")
        tokens.append(np.clip(np.rint(values), 1, 2**31 - 1).astype(np.int32))
    order = np.argsort(arrival, kind="stable")
    out = (arrival[order] - arrival[order][0], tokens[0][order], tokens[1][order])
    for arr in out:
        arr.setflags(write=False)
    return out


def _parse_timestamps(col: Any, path: str) -> np.ndarray:
    """Seconds (float64) from a datetime-string or numeric-seconds column."""
    import pandas as pd

    text = col.str.strip()
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        return numeric.to_numpy(dtype=np.float64)
    parsed = None
    for fmt in ("ISO8601", "mixed"):
        try:
            parsed = pd.to_datetime(text, format=fmt)
            break
        except (ValueError, TypeError):
            continue
    if parsed is None:
        parsed = pd.to_datetime(text, format="mixed", errors="coerce")
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise WorkloadError(f"{path}: column TIMESTAMP: unparseable at row {row}: {text[row]!r}")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return (ns - ns.min()) / 1e9


def load_azure_trace(
    path: str | Path,
    n_adapters_or_adapters: int | Sequence[Any],
    mapping: str = "zipf",
    alpha: float = 1.0,
    seed: int = 0,
    time_scale: float = 1.0,
    max_requests: int | None = None,
) -> RequestBatch:
    """Trace -> ``RequestBatch`` with arrivals in seconds since the first request (x time_scale).

    Each request goes to an adapter index by ``mapping``: ``zipf`` (i.i.d. draws with Zipf(alpha)
    popularity, adapter 0 hottest), ``uniform`` (i.i.d. uniform) or ``round_robin`` (in arrival
    order). ``max_requests`` keeps the earliest requests. Token counts are clamped to >= 1.
    """
    if isinstance(n_adapters_or_adapters, int | np.integer) and not isinstance(
        n_adapters_or_adapters, bool
    ):
        n = int(n_adapters_or_adapters)
    elif isinstance(n_adapters_or_adapters, Sequence):
        n = len(n_adapters_or_adapters)
    else:
        raise WorkloadError(
            "n_adapters_or_adapters: must be an adapter count or a sequence of adapters, "
            f"got {n_adapters_or_adapters!r}"
        )
    if n < 1:
        raise WorkloadError(f"n_adapters_or_adapters: need at least one adapter, got {n}")
    if not (isinstance(time_scale, int | float) and np.isfinite(time_scale) and time_scale > 0):
        raise WorkloadError(f"time_scale: must be a finite number > 0, got {time_scale!r}")
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha >= 0):
        raise WorkloadError(f"alpha: must be a finite number >= 0, got {alpha!r}")
    if max_requests is not None and (not isinstance(max_requests, int) or max_requests < 0):
        raise WorkloadError(f"max_requests: must be a non-negative integer, got {max_requests!r}")
    weights = adapter_weights(n, mapping, alpha)

    arrival, context, generated = read_azure_trace(path)
    if max_requests is not None:
        arrival, context, generated = (
            arrival[:max_requests],
            context[:max_requests],
            generated[:max_requests],
        )
    m = arrival.size
    rng = np.random.default_rng(seed)
    if mapping == "round_robin":
        adapter = (np.arange(m) % n).astype(np.int32)
    elif mapping == "uniform":
        adapter = rng.integers(0, n, m).astype(np.int32)
    else:
        cdf = np.cumsum(weights)
        adapter = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(m), side="right"), n - 1)
        adapter = adapter.astype(np.int32)
    return RequestBatch(
        arrival_s=arrival * float(time_scale),
        adapter=adapter,
        prompt_len=context.copy(),
        output_len=generated.copy(),
    )
