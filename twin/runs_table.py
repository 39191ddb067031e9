"""The measured-runs table: one row per run (the columns of data/reference/.../
validation_runs.csv, which ``twin.validate`` replays), and how a live measurement becomes the
twin's own figures.

``Measurement`` holds a run's client-side timestamps; ``measured_metrics`` scores it with the
twin's ``aggregate_metrics`` (one definition for measured and predicted numbers);
``append_row`` adds a row to a runs CSV without re-parsing earlier rows. Below both the live
bench (orchestrator/measure/bench.py) and the open-loop load generator (load_tests/openloop.py),
which write such rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin.metrics import RequestRecords, aggregate_metrics
from twin.requests import RequestBatch

MEASURED_COLUMNS = (
    "completed", "duration_s", "total_input_tokens", "total_output_tokens",
    "request_throughput_rps", "input_throughput_tps", "output_throughput_tps",
    "total_throughput_tps",
    "ttft_mean_ms", "ttft_median_ms", "ttft_p99_ms",
    "tpot_mean_ms", "tpot_median_ms", "tpot_p99_ms",
    "itl_mean_ms", "itl_median_ms", "itl_p99_ms",
)


@dataclass
class Measurement:
    """Client-side timestamps of one run, seconds from the window start (NaN = did not happen).

    ``finish_s`` is set only for requests that finished on their own (not aborted);
    ``itl_gaps_ms[i]`` are request i's gaps between consecutive streamed outputs (one output is
    one token unless the client fell behind; ``engine["multi_token_chunks"]`` counts those).
    """

    window_s: float
    send_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    generated: np.ndarray
    failed: np.ndarray
    itl_gaps_ms: list[list[float]]
    engine: dict[str, Any] = field(default_factory=dict)


def request_records(batch: RequestBatch, meas: Measurement) -> RequestRecords:
    """The run in the twin's record format.

    Arrival is the moment the request was handed to the engine (the benchmark's clock starts
    at the send too); failed requests count as rejected and never as completed.
    """
    n = len(batch)
    arrival = np.where(np.isfinite(meas.send_s), meas.send_s, batch.arrival_s)
    finish = np.where(meas.failed, np.nan, meas.finish_s)
    return RequestRecords(
        arrival_s=arrival.astype(float),
        adapter=batch.adapter.copy(),
        prompt_len=batch.prompt_len.copy(),
        output_len=batch.output_len.copy(),
        first_token_s=meas.first_token_s.astype(float),
        finish_s=finish.astype(float),
        generated=meas.generated.astype(np.int64),
        preemptions=np.zeros(n, dtype=np.int64),
        rejected=meas.failed.astype(bool),
    )


def measured_metrics(batch: RequestBatch, meas: Measurement) -> dict[str, Any]:
    """The benchmark figures of a live run, computed by the twin's ``aggregate_metrics``.

    Delegating (instead of re-implementing the formulas) guarantees measured and predicted
    numbers share one definition. ITL pools the gaps of completed requests only, weight 1 each,
    as the serving benchmark does; a live engine has no separate preemption gaps.
    """
    rec = request_records(batch, meas)
    done = rec.completed_mask(meas.window_s)
    pooled = [g for i in np.flatnonzero(done) for g in meas.itl_gaps_ms[i]]
    gaps = np.asarray(pooled, dtype=float)
    return aggregate_metrics(
        rec, meas.window_s, itl_gap_ms=gaps, itl_weight=np.ones(len(gaps)),
        preempt_gap_ms=np.empty(0),
    )


def machine_label() -> str:
    """``cpu <model name> x<cores>``: which machine measured the row."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu {name} x{cores}"


def csv_value(v: Any) -> str:
    """Cell text: empty for missing, full-precision floats, JSON for containers."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating):
        return repr(float(v))
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, dict | list | tuple):
        return json.dumps(v)
    return str(v)


def append_row(path: str | Path, row: Mapping[str, Any]) -> int:
    """Append ``row`` to a runs CSV (created with a header if absent); returns the row count.

    Earlier rows are never re-parsed into values: a plain append when the header already has
    every column, else a rewrite that only widens the header (old cells kept verbatim, new
    columns empty), so the reference file's formatting survives.
    """
    path = Path(path)
    cells = {k: csv_value(v) for k, v in row.items()}
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(cells), lineterminator="\n")
            writer.writeheader()
            writer.writerow(cells)
        return 1
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        old_rows = list(reader)
    new_cols = [k for k in cells if k not in header]
    if not new_cols:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) not in (b"\n", b"\r")
        with path.open("a", newline="") as f:
            if needs_newline:
                f.write("\n")
            csv.DictWriter(f, fieldnames=header, lineterminator="\n").writerow(cells)
        return len(old_rows) + 1
    fieldnames = header + new_cols
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(fieldnames)
        for old in old_rows:
            writer.writerow(old + [""] * (len(fieldnames) - len(old)))
        writer.writerow([cells.get(k, "") for k in fieldnames])
    os.replace(tmp, path)
    return len(old_rows) + 1


def jsonable(obj: Any) -> Any:
    """JSON has no NaN or numpy scalars: null and plain Python numbers instead."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
