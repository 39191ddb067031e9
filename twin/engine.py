"""Step-by-step emulation of one vLLM V1 engine serving LoRA adapters, in simulated time.

What it reproduces (see docs/vllm_v1_semantics.md for the source references):

* ``schedule()``: running requests first (a decode is 1 token, an unfinished prefill gets its next
  chunk) within the token budget, then waiting requests in FCFS order, chunked prefill, at most
  ``max_num_seqs`` running, no waiting admissions in a step that preempted;
* the LoRA admission rule: once the step's adapter set holds ``max_loras`` adapters, a waiting
  request of another adapter is skipped (the scan goes on, order is preserved);
* paged KV: blocks of ``block_size`` tokens (one reserved as vLLM's null block), allocated on
  demand (plus the version's preallocation; it is not capped at max_model_len, which over-counts
  at most that many blocks for a request that ends within them of max_model_len);
  when a running request cannot get a block, the newest running request is preempted (recompute:
  its KV is freed and it goes back to the front of the queue);
* adapters: GPU slots and the CPU cache are LRUs of ``max_loras`` / ``max_cpu_loras`` entries
  walked the way vLLM's worker walks them (``twin.adapters``), and a missing adapter costs a
  disk->CPU and/or CPU->GPU load in the step that needs it;
* optionally, the load generator's cap on requests in flight (``client_max_inflight``): requests
  arriving beyond it fail at the client and never reach the engine.

Speed: the loop's work per step is O(changes), never O(batch). Decoding requests are not touched
per step: each stores the engine's decode clock when it entered decode, from which its token count
is derived; finishes are bucketed by that clock; the number of requests that need a new
KV block in a step comes from a histogram of (block-boundary clock mod allocation period). Waiting
requests sit in per-adapter FIFOs plus the global FCFS order, with a lazy heap over the heads of
in-set adapters, so the skip-scan of the LoRA rule costs O(log n) per admission, not a queue scan.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from twin.adapters import AdapterCaches
from twin.config import EngineConfig
from twin.latency import StepCost
from twin.profile import Profile

# request states
_PENDING, _WAITING, _RUNNING, _DONE, _REJECTED, _DROPPED = 0, 1, 2, 3, 4, 5


@dataclass
class StepTrace:
    """Per-step features and durations (only collected when asked: calibration, debugging)."""

    prefill_tokens: list[int] = field(default_factory=list)
    decode_seqs: list[int] = field(default_factory=list)
    ctx_tokens: list[int] = field(default_factory=list)
    lora_adapters: list[int] = field(default_factory=list)
    loads: list[int] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)  # requests newly admitted this step
    scanned: list[int] = field(default_factory=list)  # waiting requests the waiting loop examined
    finished: list[int] = field(default_factory=list)  # requests that finished in this step
    step_ms: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.__dict__.items()}


@dataclass
class EngineResult:
    """Raw outcome of one engine run; ``twin.metrics`` turns it into the benchmark's figures."""

    first_token_s: np.ndarray  # nan where no token was produced
    finish_s: np.ndarray  # nan where unfinished
    generated: np.ndarray  # output tokens produced (at the end of the run)
    preemptions: np.ndarray  # per request
    rejected: np.ndarray  # bool: longer than max_model_len
    dropped: np.ndarray  # bool: failed at the client (client_max_inflight reached)
    itl_gap_ms: np.ndarray  # distinct decode-step durations ...
    itl_weight: np.ndarray  # ... and how many decode tokens each produced
    preempt_gap_ms: np.ndarray  # extra inter-token gaps of requests resumed after preemption
    engine_steps: int
    simulated_s: float
    wall_s: float
    kv_blocks_total: int
    gpu_loads: int
    disk_loads: int
    timeseries: dict[str, np.ndarray]
    trace: StepTrace | None = None


def run_engine(
    arrival_s: np.ndarray,
    adapter: np.ndarray,
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    adapter_ranks: list[int] | np.ndarray,
    config: EngineConfig,
    profile: Profile,
    duration_s: float,
    *,
    timeseries_interval_s: float = 10.0,
    record_trace: bool = False,
    preload_cpu: bool = True,
    client_max_inflight: int | None = None,
) -> EngineResult:
    """Emulate one engine on arrival-sorted requests until ``duration_s`` of simulated time.

    A pure function of its inputs (no randomness inside): identical inputs give identical output.
    ``adapter[i] == -1`` is a base-model request. ``preload_cpu`` registers the adapters in the
    CPU cache at start (the reference servers pre-register theirs), up to ``max_cpu_loras``.
    ``client_max_inflight`` models a load generator that cannot hold more requests in flight
    (e.g. one TCP connection per request and a finite ephemeral-port range): a request arriving
    while that many are running or waiting fails at once and is never served.
    """
    wall0 = time.perf_counter()
    kv_tokens = profile.check_feasible(config)
    max_len = profile.effective_max_model_len(config)

    bs = config.block_size
    pre = profile.scheduler.kv_preallocate_blocks
    full_prompt_check = profile.scheduler.admit_only_if_prompt_fits
    grab = 1 + pre  # blocks a decode takes when it crosses a block boundary (if free)
    period = bs * grab  # decode steps between two allocations of one request
    total_blocks = kv_tokens // bs - 1  # vLLM reserves one null block
    max_blocks_req = -(-max_len // bs)
    budget_max = config.max_num_batched_tokens
    max_seqs = config.max_num_seqs
    max_loras = config.max_loras if config.enable_lora else 0
    lora_on = config.enable_lora
    max_rank = config.max_lora_rank
    gpu_slots = config.max_loras
    cpu_slots = config.cpu_slots

    step_ms = StepCost.for_engine(
        profile.step_model, lora_enabled=lora_on, max_lora_rank=max_rank, max_loras=gpu_slots,
        scan_us_per_waiting=profile.scheduler.scan_us_per_waiting,
    ).ms
    loads_tab = profile.adapter_loads
    ranks = [int(r) for r in adapter_ranks]
    gpu_ms = [loads_tab.gpu_load_ms(max_rank, r) for r in ranks]
    disk_ms = [loads_tab.disk_load_ms(r) for r in ranks]

    arr = arrival_s.tolist()
    adp = adapter.astype(np.int64).tolist()
    plen = prompt_len.astype(np.int64).tolist()
    olen = output_len.astype(np.int64).tolist()
    n = len(arr)

    state = bytearray(n)
    gen = [0] * n  # generated tokens (decoders: at decode entry)
    ncomp = [0] * n  # computed tokens (prefill phase)
    held = [0] * n  # KV blocks (decoders: at decode entry)
    dc_in = [0] * n  # decode clock at decode entry
    trig0 = [0] * n  # first decode clock at which a decoder needs a block
    pos = [0] * n  # running-order stamp
    epoch = [0] * n
    is_dec = bytearray(n)
    first_t = [math.nan] * n
    fin_t = [math.nan] * n
    npre = [0] * n
    resume_t = [math.nan] * n  # time of the last token before a preemption
    preempt_gaps: list[float] = []

    for i in range(n):
        if plen[i] + olen[i] > max_len:
            state[i] = _REJECTED

    # running set in running order; prefill-phase subset; decoder aggregates
    run: dict[int, None] = {}
    pf: list[int] = []
    ndec = 0
    s_nb = 0  # sum over decoders of (computed tokens - decode clock)
    bmem: list[set[int]] = [set() for _ in range(period)]
    fin_at: dict[int, list[tuple[int, int]]] = {}  # decode clock -> [(rid, epoch)] finishing
    dc = 0
    free = total_blocks
    pos_ctr = 0

    # Waiting queue, never materialised per arrival. FCFS order = preempted requests (newest
    # preemption first, negative keys) then every fresh request in arrival order (key rid + 1,
    # requests are arrival-sorted). Per adapter, the same order is its preempted deque followed
    # by its fresh requests from a pointer on. A request that has not arrived yet is simply
    # not eligible; whether a head has arrived is one comparison with the clock.
    wkey = [i + 1 for i in range(n)]
    front: deque[tuple[int, int]] = deque()  # (key, rid) preempted, global order
    afront: dict[int, deque[int]] = {}  # adapter -> preempted rids, queue order
    adapter_np = np.asarray(adapter, dtype=np.int64)
    ok_idx = np.flatnonzero(np.frombuffer(bytes(state), dtype=np.uint8) != _REJECTED)
    by_adapter = ok_idx[np.argsort(adapter_np[ok_idx], kind="stable")]
    keys, starts = np.unique(adapter_np[by_adapter], return_index=True)
    # (np.split of an empty array still gives one chunk: no requests, no adapters)
    aidx: dict[int, list[int]] = {
        int(k): chunk.tolist()
        for k, chunk in zip(keys, np.split(by_adapter, starts[1:]) if len(keys) else [],
                            strict=True)
    }
    aptr: dict[int, int] = {a: 0 for a in aidx}
    gptr = 0  # global pointer over fresh requests
    rejected_before = np.concatenate(
        [[0], np.cumsum(np.frombuffer(bytes(state), dtype=np.uint8) == _REJECTED)]
    ).tolist()
    n_fresh_admitted = 0
    n_pre_waiting = 0
    n_dropped = 0
    client_cap = client_max_inflight
    sheap: list[tuple[int, int]] = []  # (key, rid): head of each in-set adapter, maybe unarrived
    front_key = 0

    def adapter_head(a: int) -> int:
        f = afront.get(a)
        if f:
            return f[0]
        lst = aidx.get(a)
        if lst is None:
            return -1
        p = aptr[a]
        while p < len(lst) and state[lst[p]] == _DROPPED:
            p += 1
        aptr[a] = p
        return lst[p] if p < len(lst) else -1

    def push_head(a: int) -> None:
        h = adapter_head(a)
        if h >= 0:
            heapq.heappush(sheap, (wkey[h], h))

    push_head(-1)  # base-model requests are never subject to the adapter limit

    # adapters: running counts (the step's adapter set) and vLLM's CPU/GPU caches
    acnt: dict[int, int] = {}
    nact = 0
    active: set[int] = set()
    joined: list[int] = []  # adapters that entered the set this step
    caches = AdapterCaches(
        gpu_slots, cpu_slots, gpu_ms, disk_ms,
        preloaded=range(min(cpu_slots, len(ranks))) if preload_cpu else (),
    )

    itl_gap: list[float] = []
    itl_w: list[int] = []
    ts_t: list[float] = []
    ts_run: list[int] = []
    ts_wait: list[int] = []
    ts_kv: list[float] = []
    ts_pre: list[int] = []
    n_preempt = 0
    n_fin_total = 0
    next_ts = 0.0
    trace = StepTrace() if record_trace else None

    def dec_held(rid: int, clock: int) -> int:
        t0 = trig0[rid]
        if clock <= t0:
            return held[rid]
        return held[rid] + grab * ((clock - t0 - 1) // period + 1)

    def leave_adapter(a: int) -> None:
        nonlocal nact
        if a < 0:
            return
        c = acnt[a] - 1
        acnt[a] = c
        if c == 0:
            nact -= 1
            active.discard(a)
            caches.left_batch(a, steps - 1)

    def remove_decoder(rid: int) -> int:
        """Detach a decoder from the aggregates; returns its KV blocks."""
        nonlocal ndec, s_nb
        is_dec[rid] = 0
        ndec -= 1
        s_nb -= plen[rid] + gen[rid] - 1 - dc_in[rid]
        bmem[trig0[rid] % period].discard(rid)
        gen[rid] += dc - dc_in[rid]
        return dec_held(rid, dc)

    def add_decoder(rid: int, h: int) -> None:
        """Register a request that will decode from clock ``dc`` on, holding ``h`` blocks."""
        nonlocal ndec, s_nb
        is_dec[rid] = 1
        ndec += 1
        nc = plen[rid] + gen[rid] - 1
        s_nb += nc - dc
        dc_in[rid] = dc
        held[rid] = h
        t0 = dc + h * bs - nc
        trig0[rid] = t0
        bmem[t0 % period].add(rid)
        key = dc + olen[rid] - gen[rid]
        lst = fin_at.get(key)
        if lst is None:
            fin_at[key] = [(rid, epoch[rid])]
        else:
            lst.append((rid, epoch[rid]))

    def preempt_tail(now: float) -> int:
        """Preempt the newest running request (vLLM FCFS policy); returns its rid."""
        nonlocal free, front_key, n_preempt, n_pre_waiting
        rid, _ = run.popitem()
        if is_dec[rid]:
            free += remove_decoder(rid)
        else:
            free += held[rid]
            pf.remove(rid)
        held[rid] = 0
        ncomp[rid] = 0
        epoch[rid] += 1
        npre[rid] += 1
        n_preempt += 1
        if gen[rid] > 0:
            resume_t[rid] = now
        state[rid] = _WAITING
        n_pre_waiting += 1
        a = adp[rid]
        leave_adapter(a)
        front_key -= 1
        wkey[rid] = front_key
        q = afront.get(a)
        if q is None:
            q = afront[a] = deque()
        q.appendleft(rid)
        front.appendleft((front_key, rid))
        if a < 0 or acnt.get(a, 0) > 0:
            heapq.heappush(sheap, (front_key, rid))
        return rid

    def queue_position(rid: int, nwait0: int, npre0: int, n_admitted: int, ai: int) -> int:
        """Approximate queue position of ``rid`` among the step's ``nwait0`` waiting requests.

        Preempted requests sit at the head. Fresh ones follow in arrival order; waiting ones are
        taken as spread evenly over the ids from the oldest pending to the newest arrived, which
        keeps this O(1) (an exact count would cost a tree update per admission).
        """
        nonlocal gptr
        if rid < 0:
            return n_admitted
        if wkey[rid] < 0:
            return min(nwait0, n_admitted + 1)
        while gptr < n and state[gptr] != _PENDING:
            gptr += 1
        span = ai - gptr
        est = npre0 + ((nwait0 - npre0) * (rid - gptr + 1) // span if span > 0 else 0)
        return max(n_admitted + (state[rid] != _RUNNING), min(nwait0, est))

    def activate(a: int) -> None:
        """Adapter ``a`` joins the step's adapter set (loads are settled after scheduling)."""
        nonlocal nact
        acnt[a] = 1
        nact += 1
        active.add(a)
        joined.append(a)
        push_head(a)

    t = 0.0
    ai = 0
    steps = 0
    while True:
        # requests that have arrived by now (no per-request work: see the waiting queue above)
        new_ai = bisect_right(arr, t, ai)
        if client_cap is not None and new_ai > ai:
            # the load generator holds at most client_cap requests in flight; the rest fail
            room = client_cap - (len(run) + ai - rejected_before[ai] - n_dropped
                                 - n_fresh_admitted + n_pre_waiting)
            for i in range(ai, new_ai):
                if state[i] == _PENDING:
                    if room > 0:
                        room -= 1
                    else:
                        state[i] = _DROPPED
                        n_dropped += 1
        ai = new_ai
        nwait = ai - rejected_before[ai] - n_dropped - n_fresh_admitted + n_pre_waiting
        if not run and nwait == 0:
            while ai < n and state[ai] == _REJECTED:  # (dropped ones have arrived already)
                ai += 1
            if ai >= n or arr[ai] >= duration_s:
                break
            t = arr[ai]
            continue
        if t >= duration_s:
            break
        if t >= next_ts:
            ts_t.append(t)
            ts_run.append(len(run))
            ts_wait.append(nwait)
            ts_kv.append(1.0 - free / total_blocks)
            ts_pre.append(n_preempt)
            next_ts += timeseries_interval_s

        # ---------------- schedule: running requests ----------------
        fin_before = n_fin_total
        n_admitted = 0
        preempted = False
        load_ms = 0.0
        loads_here = 0
        slot = dc % period
        ntr = len(bmem[slot])
        if ntr and free < ntr * grab and grab == 1:
            # out of blocks, one block each: vLLM walks running in order and preempts from the
            # tail whenever it runs dry; the victims are the shortest tail that frees enough
            # blocks for the members that remain, so take them from the tail directly
            members = bmem[slot]
            need = ntr
            while free < need:
                victim = next(reversed(run))
                if victim in members:
                    need -= 1
                preempt_tail(t)
                preempted = True
            free -= need
        elif ntr and free < ntr * grab:
            # with preallocation a member may get fewer blocks than it asks: walk in order
            for rid in sorted(bmem[slot], key=pos.__getitem__):
                if state[rid] != _RUNNING or not is_dec[rid]:
                    continue
                while free < 1 and state[rid] == _RUNNING:
                    preempt_tail(t)
                    preempted = True
                if state[rid] != _RUNNING:
                    break
                got = min(grab, free, max_blocks_req - dec_held(rid, dc))
                free -= got
                if got < grab:
                    # re-register with the blocks it really holds (clock arithmetic changes)
                    blocks = remove_decoder(rid) + got
                    epoch[rid] += 1
                    add_decoder(rid, blocks)
                    # add_decoder put it at the same clock: it already holds this step's block
        elif ntr:
            free -= ntr * grab
        budget = budget_max - ndec
        sched: list[tuple[int, int]] = []  # (rid, chunk) prefill work this step
        if pf and budget > 0:
            for rid in list(pf):
                if budget <= 0 or state[rid] != _RUNNING:
                    break
                need_total = plen[rid] + gen[rid]
                chunk = min(need_total - ncomp[rid], budget)
                need = -(-(ncomp[rid] + chunk) // bs) - held[rid]
                while need > 0 and free < need and state[rid] == _RUNNING:
                    preempt_tail(t)
                    preempted = True
                if state[rid] != _RUNNING:
                    break
                if need > 0:
                    got = min(need + pre, free, max_blocks_req - held[rid])
                    held[rid] += got
                    free -= got
                sched.append((rid, chunk))
                budget -= chunk

        # ---------------- schedule: waiting requests ----------------
        # ``scanned``: how many waiting requests vLLM's loop examines. It walks the queue in
        # order, skipping other adapters' requests while the set is full, until the budget or
        # max_num_seqs runs out (examined: up to the last admitted request), an allocation fails
        # (up to that request) or the queue ends (all of it).
        scanned = 0
        stop_rid = -1
        nwait0 = nwait
        npre0 = n_pre_waiting
        if not preempted and budget > 0 and len(run) < max_seqs:
            scanned = nwait0
            while True:
                if budget <= 0 or len(run) >= max_seqs:
                    scanned = -1  # stopped after the last admitted request
                    break
                if not nwait:
                    break
                rid = -1
                if lora_on and nact >= max_loras:
                    # adapter set full: earliest waiting request of an in-set adapter
                    while sheap:
                        k, r = sheap[0]
                        a = adp[r]
                        if (
                            wkey[r] == k
                            and (state[r] == _WAITING or state[r] == _PENDING)
                            and (a < 0 or acnt.get(a, 0) > 0)
                            and adapter_head(a) == r
                        ):
                            rid = r
                            break
                        heapq.heappop(sheap)
                        if state[r] == _DROPPED and (a < 0 or acnt.get(a, 0) > 0):
                            push_head(a)  # it was this adapter's (not yet arrived) head
                else:
                    while front:
                        k, r = front[0]
                        if state[r] == _WAITING and wkey[r] == k:
                            rid = r
                            break
                        front.popleft()
                    if rid < 0:
                        while gptr < n and state[gptr] != _PENDING:
                            gptr += 1
                        if gptr < n:
                            rid = gptr
                if rid < 0 or arr[rid] > t:
                    break
                need_total = plen[rid] + gen[rid]
                chunk = min(need_total, budget)
                need = -(-chunk // bs)
                if free < (-(-need_total // bs) if full_prompt_check else need):
                    stop_rid = rid
                    scanned = -1
                    break
                got = min(need + pre, free, max_blocks_req)
                free -= got
                held[rid] = got
                ncomp[rid] = 0
                a = adp[rid]
                if state[rid] == _PENDING:
                    adapter_head(a)  # moves the pointer past requests dropped at the client
                    aptr[a] += 1
                    n_fresh_admitted += 1
                else:
                    afront[a].popleft()
                    n_pre_waiting -= 1
                nwait -= 1
                state[rid] = _RUNNING
                if a >= 0 and acnt.get(a, 0) == 0:
                    activate(a)  # pushes the adapter's new head
                else:
                    if a >= 0:
                        acnt[a] += 1
                    push_head(a)
                pos_ctr += 1
                pos[rid] = pos_ctr
                run[rid] = None
                pf.append(rid)
                sched.append((rid, chunk))
                budget -= chunk
                n_admitted += 1
                stop_rid = rid
            if scanned < 0:
                scanned = queue_position(stop_rid, nwait0, npre0, n_admitted, ai)

        if joined:
            if any(caches.missing(a) for a in joined):
                load_ms, loads_here = caches.apply(active, joined, steps)
            joined.clear()

        # ---------------- execute: predicted step time ----------------
        p_tok = 0
        k_ctx = s_nb + ndec * (dc + 1)
        for rid, chunk in sched:
            p_tok += chunk
            k_ctx += ncomp[rid] + chunk
        if p_tok == 0 and ndec == 0:
            if run:
                raise RuntimeError("engine scheduled nothing while requests were running")
            if ai >= n:
                break
            t = max(t, arr[ai])
            continue
        dt_ms = step_ms(p_tok, ndec, k_ctx, nact, load_ms, scanned - n_admitted)
        if trace is not None:
            trace.prefill_tokens.append(p_tok)
            trace.decode_seqs.append(ndec)
            trace.ctx_tokens.append(k_ctx)
            trace.lora_adapters.append(nact)
            trace.loads.append(loads_here)
            trace.admitted.append(n_admitted)
            trace.scanned.append(scanned)
            trace.step_ms.append(dt_ms)
            trace.start_s.append(t)
        t += dt_ms / 1e3
        steps += 1
        if ndec:
            itl_gap.append(dt_ms)
            itl_w.append(ndec)
        dc += 1

        # ---------------- update: prefill progress, finishes ----------------
        for rid, chunk in sched:
            nc = ncomp[rid] + chunk
            ncomp[rid] = nc
            if nc < plen[rid] + gen[rid]:
                continue
            pf.remove(rid)
            g = gen[rid] + 1
            gen[rid] = g
            if first_t[rid] != first_t[rid]:  # nan: first token of this request
                first_t[rid] = t
            elif resume_t[rid] == resume_t[rid]:
                preempt_gaps.append((t - resume_t[rid]) * 1e3)
                resume_t[rid] = math.nan
            if g >= olen[rid]:
                n_fin_total += 1
                state[rid] = _DONE
                fin_t[rid] = t
                del run[rid]
                free += held[rid]
                leave_adapter(adp[rid])
            else:
                add_decoder(rid, held[rid])
        for rid, ep in fin_at.pop(dc, ()):
            if ep != epoch[rid] or state[rid] != _RUNNING or not is_dec[rid]:
                continue
            free += remove_decoder(rid)
            n_fin_total += 1
            state[rid] = _DONE
            fin_t[rid] = t
            del run[rid]
            leave_adapter(adp[rid])
        if trace is not None:
            trace.finished.append(n_fin_total - fin_before)

    # requests still decoding at the end: report the tokens they produced so far
    for rid in run:
        if is_dec[rid]:
            gen[rid] += dc - dc_in[rid]
    return EngineResult(
        first_token_s=np.asarray(first_t, dtype=float),
        finish_s=np.asarray(fin_t, dtype=float),
        generated=np.asarray(gen, dtype=np.int64),
        preemptions=np.asarray(npre, dtype=np.int64),
        rejected=np.frombuffer(bytes(state), dtype=np.uint8) == _REJECTED,
        dropped=np.frombuffer(bytes(state), dtype=np.uint8) == _DROPPED,
        itl_gap_ms=np.asarray(itl_gap, dtype=float),
        itl_weight=np.asarray(itl_w, dtype=np.int64),
        preempt_gap_ms=np.asarray(preempt_gaps, dtype=float),
        engine_steps=steps,
        simulated_s=min(t, duration_s),
        wall_s=time.perf_counter() - wall0,
        kv_blocks_total=total_blocks,
        gpu_loads=caches.gpu_loads,
        disk_loads=caches.disk_loads,
        timeseries={
            "t_s": np.asarray(ts_t),
            "running": np.asarray(ts_run),
            "waiting": np.asarray(ts_wait),
            "kv_usage": np.asarray(ts_kv),
            "preemptions": np.asarray(ts_pre),
        },
        trace=trace,
    )
