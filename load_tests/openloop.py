"""Open-loop load generator for a deployed lorafleet: ``python -m load_tests.openloop``.

Replays, against the HTTP API, exactly the requests the twin simulates for a workload
(``twin.workload.generate_requests``: per-adapter Poisson arrivals, or a trace replay, with the
workload's length model and the same seed): request i is sent at its arrival time whatever the
service's state (open loop - a closed loop would hide queueing), streamed, every chunk
timestamped. Prompts are token ids (exact prompt lengths on any backend) and ``ignore_eos``
makes every request produce exactly its output length, as in ``lorafleet bench``.

Scoring uses the twin's own metric code (``orchestrator.measure.bench.measured_metrics``, i.e.
``twin.metrics.aggregate_metrics``): throughput counts completed requests in the window, TTFT and
TPOT over completed requests, ITL pools the gaps. The same figures are computed per replica from
the ``x-lorafleet-replica`` header, and a row in the runs-table format of ``lorafleet bench`` is
appended to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np

from twin.runs_table import (
    MEASURED_COLUMNS,
    Measurement,
    append_row,
    jsonable,
    machine_label,
    measured_metrics,
)
from twin.workload import RequestBatch, Workload, generate_requests

DEFAULT_VOCAB = 2048  # the tiny model's; ids only need to be valid tokens
DRAIN_S = 10.0
FIRST_PROMPT_TOKEN = 7  # the tiny tokenizer's ids 0..6 are special tokens; prompts avoid them

PROMPT_SEED_SALT = 0x7B0C  # prompt token ids use a stream independent of generate_requests'


async def dispatch_open_loop(
    arrival_s: np.ndarray, t0: float, clock: Callable[[], float],
    one: Callable[[int], Coroutine[Any, Any, None]], tasks: list[asyncio.Task],
) -> None:
    """Start request i at ``t0 + arrival_s[i]``, never waiting for earlier ones (open loop, like
    the reference benchmark); the started tasks go to ``tasks`` for the caller to drain."""
    for i in range(len(arrival_s)):
        delay = t0 + float(arrival_s[i]) - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))


@dataclass
class OpenLoopResult:
    workload: Workload
    batch: RequestBatch
    meas: Measurement
    replica: list[str]  # per request: x-lorafleet-replica ("" if none)
    engine: str
    metrics: dict[str, Any]
    per_replica: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # with ``timing``: per request, wall-clock seconds at each hop (STAMPS; NaN: none)
    stamps: dict[str, np.ndarray] | None = None


# the serving path's hops in order: the client's send, the ingress (ingress.TIMING_HEADER), the
# engine replica's arrival and first output, the ingress's first chunk, the client's first chunk
STAMPS = ("client_send", "ingress_arrival", "engine_arrival", "engine_first", "ingress_first",
          "client_first")


def prompt_ids(seed: int, i: int, n: int, vocab: int) -> list[int]:
    """Request i's prompt: n random non-special ids, seeded per (seed, request)."""
    rng = np.random.default_rng([seed, PROMPT_SEED_SALT, i])
    return rng.integers(FIRST_PROMPT_TOKEN, vocab, size=n).tolist()


def subset(batch: RequestBatch, meas: Measurement, idx: np.ndarray
           ) -> tuple[RequestBatch, Measurement]:
    """The requests ``idx`` only (per-replica figures)."""
    b = RequestBatch(batch.arrival_s[idx], batch.adapter[idx], batch.prompt_len[idx],
                     batch.output_len[idx])
    m = Measurement(meas.window_s, meas.send_s[idx], meas.first_token_s[idx],
                    meas.finish_s[idx], meas.generated[idx], meas.failed[idx],
                    [meas.itl_gaps_ms[i] for i in idx])
    return b, m


async def run_openloop(
    workload: Workload, url: str, duration_s: float, *, seed: int = 0,
    api_key: str | None = None, vocab_size: int = DEFAULT_VOCAB, warmup: bool = True,
    timing: bool = False, progress: Callable[[str], None] = lambda _m: None,
) -> OpenLoopResult:
    """Drive ``url`` with the workload's requests for ``duration_s`` (module docstring).
    ``timing``: ask the ingress for each request's serving-path stamps (``STAMPS``)."""
    batch = generate_requests(workload, duration_s, seed)
    n = len(batch)
    ids = [a.id for a in workload.adapters]
    base_model = None
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    if timing:
        headers["x-lorafleet-timing"] = "1"
    stamps = {k: np.full(n, np.nan) for k in STAMPS}
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512)
    timeout = httpx.Timeout(duration_s + 120, connect=30)
    nan = np.full(n, np.nan)
    send, first, finish = nan.copy(), nan.copy(), nan.copy()
    generated = np.zeros(n, dtype=np.int64)
    failed = np.zeros(n, dtype=bool)
    gaps: list[list[float]] = [[] for _ in range(n)]
    replica = [""] * n
    engines: Counter[str] = Counter()
    errors: list[str] = []

    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        if (batch.adapter < 0).any():
            models = (await client.get("/v1/models")).json()["data"]
            base_model = next(m["id"] for m in models if m.get("parent") is None)
        if warmup:  # one short request per adapter: first-use costs stay out of the window
            sem = asyncio.Semaphore(16)

            async def warm(model: str) -> None:
                async with sem:
                    await client.post("/v1/completions", json={
                        "model": model, "prompt": [FIRST_PROMPT_TOKEN] * 8, "max_tokens": 2,
                        "ignore_eos": True})

            t = time.perf_counter()
            await asyncio.gather(*(warm(a) for a in sorted(set(ids[a] for a in batch.adapter
                                                               if a >= 0))))
            progress(f"warm-up: one request per adapter in {time.perf_counter() - t:.1f} s")

        clock = time.perf_counter
        t0, t0_wall = clock(), time.time()

        async def one(i: int) -> None:
            a = int(batch.adapter[i])
            body = {"model": ids[a] if a >= 0 else base_model,
                    "prompt": prompt_ids(seed, i, int(batch.prompt_len[i]), vocab_size),
                    "max_tokens": int(batch.output_len[i]), "stream": True, "ignore_eos": True,
                    "temperature": 0.0}
            send[i] = clock() - t0
            last = math.nan
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    replica[i] = r.headers.get("x-lorafleet-replica", "")
                    engines[r.headers.get("x-lorafleet-engine", "")] += 1
                    if r.status_code != 200:
                        failed[i] = True
                        errors.append(f"req-{i}: HTTP {r.status_code}: "
                                      f"{(await r.aread())[:300]!r}")
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "lorafleet_timing" in chunk:
                            for k, v in chunk["lorafleet_timing"].items():
                                if k in stamps and v is not None:
                                    stamps[k][i] = float(v)
                            continue
                        if "error" in chunk:
                            failed[i] = True
                            errors.append(f"req-{i}: {chunk['error'].get('message')}")
                            return
                        choice = chunk["choices"][0] if chunk.get("choices") else None
                        if choice is None:
                            continue
                        now = clock() - t0
                        if choice.get("text"):
                            if math.isnan(last):
                                first[i] = now
                            else:
                                gaps[i].append((now - last) * 1e3)
                            last = now
                            generated[i] += 1
                        if choice.get("finish_reason"):
                            finish[i] = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed[i] = True
                errors.append(f"req-{i}: {type(exc).__name__}: {exc}")

        tasks: list[asyncio.Task] = []

        async def report() -> None:
            every = max(5.0, duration_s / 6)
            while True:
                await asyncio.sleep(every)
                progress(f"t={clock() - t0:4.0f}/{duration_s:g} s  sent {len(tasks)}/{n}  "
                         f"done {int(np.isfinite(finish).sum())}  failed {int(failed.sum())}")

        dispatcher = asyncio.create_task(
            dispatch_open_loop(batch.arrival_s, t0, clock, one, tasks)
        )
        reporter = asyncio.create_task(report())
        await asyncio.sleep(max(0.0, t0 + duration_s - clock()))
        reporter.cancel()
        dispatcher.cancel()
        unfinished = [t for t in tasks if not t.done()]
        for t in unfinished:  # closing the stream aborts the request in the engine
            t.cancel()
        await asyncio.gather(*tasks, dispatcher, reporter, return_exceptions=True)

    # a token counted per chunk: the sim and vLLM stream one token per chunk when the client
    # keeps up; the engine's usage would be exact, chunk counts are what a client sees.
    meas = Measurement(duration_s, send, first, finish, generated, failed, gaps,
                       engine={"aborted_requests": len(unfinished),
                               "failed_requests": int(failed.sum()), "sent_requests": len(tasks)})
    metrics = measured_metrics(batch, meas)
    stamps["client_send"], stamps["client_first"] = t0_wall + send, t0_wall + first
    per: dict[str, dict[str, Any]] = {}
    rep = np.asarray(replica)
    for r in sorted(set(replica) - {""}):
        b, m = subset(batch, meas, np.flatnonzero(rep == r))
        per[r] = measured_metrics(b, m)
    engine = engines.most_common(1)[0][0] if engines else ""
    return OpenLoopResult(workload, batch, meas, replica, engine, metrics, per, errors,
                          stamps if timing else None)


def build_openloop_row(res: OpenLoopResult, *, url: str, seed: int, model_name: str,
                       plan_path: str | None = None, created: datetime | None = None
                       ) -> dict[str, Any]:
    """A runs-table row like ``lorafleet bench`` writes (orchestrator/live_bench.build_row),
    for the whole deployment: ``replicas`` and ``per_replica_json`` say what served it."""
    created = created or datetime.now(UTC)
    w, b, m = res.workload, res.batch, res.metrics
    ranks = Counter(a.rank for a in w.adapters)
    pool_in = int(b.prompt_len.sum(dtype=np.int64))
    pool_out = int(b.output_len.sum(dtype=np.int64))
    row: dict[str, Any] = {
        "model": model_name, "workload": w.name,
        "run": f"_serve_{res.engine}_s{seed}-{created:%Y%m%dT%H%M%S}",
        "status": "ok", "quality_flag": "", "engine": f"lorafleet-serve:{res.engine}",
        "served_adapters": len(w.adapters),
        "rank_mix": json.dumps({str(r): ranks[r] for r in sorted(ranks)}),
        "base_model_rate_rps": w.base_model_rate_rps,
        "nominal_request_rate_rps": w.total_rate_rps,
        "offered_request_rate_rps": len(b) / res.meas.window_s,
        "window_s": res.meas.window_s, "pool_prompts": len(b),
        "pool_input_tokens": pool_in, "pool_output_tokens": pool_out,
        "offered_total_tps_est": (pool_in + pool_out) / res.meas.window_s,
    }
    row.update({k: m[k] for k in MEASURED_COLUMNS})
    row.update({
        "offered_requests": m["offered_requests"],
        "aborted_requests": res.meas.engine.get("aborted_requests"),
        "failed_requests": res.meas.engine.get("failed_requests"),
        "completed_token_fraction": m["completed_token_fraction"], "starved": m["starved"],
        "replicas": len(res.per_replica),
        "per_replica_json": json.dumps(jsonable({
            r: {k: v[k] for k in ("completed", "total_throughput_tps", "ttft_median_ms",
                                  "itl_median_ms")} for r, v in res.per_replica.items()})),
        "serving_url": url, "plan_path": plan_path or "", "machine": machine_label(),
        "created_utc": created.isoformat(timespec="seconds"), "seed": seed,
        "workload_json": json.dumps(w.to_dict(), sort_keys=True),
    })
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.openloop", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("workload", help="workload YAML (docs/workload_format.md)")
    p.add_argument("--url", required=True, help="the deployment's base URL (http://host:port)")
    p.add_argument("--duration", type=float, default=None,
                   help="window in seconds (default: the workload's duration_s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help="prompt token ids are drawn below this (the model's vocabulary)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--model-name", default="tiny-llama-cpu", help="`model` column of the row")
    p.add_argument("--out", default=None, help="runs CSV to append the measured row to")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    workload = Workload.from_yaml(args.workload)
    duration = float(args.duration or workload.duration_s)
    res = asyncio.run(run_openloop(
        workload, args.url, duration, seed=args.seed, api_key=args.api_key,
        vocab_size=args.vocab_size, warmup=not args.no_warmup,
        progress=lambda msg: err.print(msg, highlight=False)))
    if res.errors:
        err.print(f"{len(res.errors)} request(s) failed; first: {res.errors[0]}")
    row = build_openloop_row(res, url=args.url, seed=args.seed, model_name=args.model_name)
    if args.out:
        n = append_row(args.out, row)
        err.print(f"appended row {n} to {args.out}")
    if args.json:
        print(json.dumps(jsonable({"metrics": res.metrics, "per_replica": res.per_replica,
                                    "engine": res.engine, "errors": len(res.errors)})))
        return 0
    t = Table(title=f"open loop: {workload.name}, {duration:g} s, {len(res.batch)} requests "
              f"({res.engine})", header_style="bold")
    cols = ("", "completed", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT ms",
            "ITL p50 ms", "starved")
    for c in cols:
        t.add_column(c, justify="left" if not c else "right")
    for name, mm in [("all", res.metrics), *res.per_replica.items()]:
        t.add_row(name, str(mm["completed"]), f"{mm['total_throughput_tps']:,.1f}",
                  f"{mm['request_throughput_rps']:.2f}", f"{mm['ttft_median_ms']:.1f}",
                  f"{mm['ttft_p99_ms']:.1f}", f"{mm['tpot_mean_ms']:.2f}",
                  f"{mm['itl_median_ms']:.2f}", str(mm["starved"]))
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
