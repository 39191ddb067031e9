"""The engine's state as flat arrays, so that its hot path runs compiled (numba).

Every piece of the engine (``kv_blocks``, ``running``, ``waiting``, ``lora_set``,
``scheduler``, ``core``) is a set of compiled functions over one ``EngineState``: per-request
columns (the request table), per-adapter columns, linked lists threaded through them (the running
order, the prefilling subset, the decoders of each block phase, each adapter's queue), heaps in
growable buffers, and the scalars in one int64 and one float64 array, indexed by the names below.
Requests are appended by ``twin.engine.core.EngineCore`` (in Python, which grows the columns);
nothing else allocates per request.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.experimental import structref
from numba.typed import List

# request states
PENDING, WAITING, RUNNING, DONE, REJECTED, DROPPED, ABORTED = 0, 1, 2, 3, 4, 5, 6

# int64 scalars: I[...]
(N, AI, GPTR, FRONT_KEY, N_FRESH, N_PREW, N_DROP, RUN_HEAD, RUN_TAIL, RUN_LEN, PF_HEAD, PF_TAIL,
 NDEC, S_NB, DC, POS_CTR, FREE, TOTAL, STEPS, FINISHED, PREEMPTED, NACT, NJOINED, GPU_N, CPU_N,
 GPU_LOADS, DISK_LOADS, NA, CLIENT_CAP, BS, PRE, GRAB, PERIOD, MAXBLK, WHOLE, BUDGET_MAX,
 MAX_SEQS, MAX_LORAS, LORA_ON, GPU_SLOTS, CPU_SLOTS, COLLECT, TRACE, HEADS_N, FIN_N, FRONT_N,
 N_INTS) = range(47)
# float64 scalars: F[...]
NOW, LAST_MS, NEXT_TS, TS_INTERVAL, N_FLOATS = range(5)

NONE = -1  # end of a linked list

_I64 = types.int64
_F64 = types.float64


class EngineArrays(NamedTuple):
    """All of one engine's state, as Python holds it (module docstring); compiled code takes
    it packed into an ``EngineState`` (one pointer: a tuple of 57 arrays would be copied and
    reference-counted field by field at every call)."""

    I: np.ndarray  # noqa: E741  int64 scalars
    F: np.ndarray  # float64 scalars
    cost: np.ndarray  # the step-cost coefficients (twin.latency.StepCost.coefficients)
    pad: np.ndarray  # CUDA-graph padded sizes
    # request table
    arr: np.ndarray
    adp: np.ndarray
    plen: np.ndarray
    olen: np.ndarray
    state: np.ndarray
    gen: np.ndarray  # generated tokens (decoders: at decode entry)
    ncomp: np.ndarray  # computed tokens (prefill phase)
    held: np.ndarray  # KV blocks (decoders: at decode entry)
    dc_in: np.ndarray  # decode clock at decode entry
    trig0: np.ndarray  # first decode clock at which a decoder needs a block
    pos: np.ndarray  # running-order stamp
    epoch: np.ndarray  # bumped when a decoder's finish entry becomes stale
    is_dec: np.ndarray
    first_t: np.ndarray
    fin_t: np.ndarray
    npre: np.ndarray
    resume_t: np.ndarray  # time of the last token before a preemption
    wkey: np.ndarray  # FCFS key: rid + 1 when fresh, negative once preempted
    rej_before: np.ndarray  # rejected requests among the first i (length capacity + 1)
    run_prev: np.ndarray  # the running order
    run_next: np.ndarray
    pf_prev: np.ndarray  # the running requests still in prefill, in running order
    pf_next: np.ndarray
    due_prev: np.ndarray  # decoders by block phase
    due_next: np.ndarray
    due_ph: np.ndarray  # a decoder's phase, NONE when not a decoder
    fresh_next: np.ndarray  # next fresh request of the same adapter
    af_prev: np.ndarray  # an adapter's preempted requests, queue order
    af_next: np.ndarray
    # per adapter (queue side: index adapter + 1, the base model at 0)
    fresh_head: np.ndarray
    fresh_tail: np.ndarray
    af_head: np.ndarray
    # per adapter (LoRA side: index adapter)
    count: np.ndarray  # running requests
    active: np.ndarray
    joined: np.ndarray  # adapters that entered the set this step (NJOINED of them)
    gpu_ms: np.ndarray
    disk_ms: np.ndarray
    in_gpu: np.ndarray
    in_cpu: np.ndarray
    last_step: np.ndarray  # last step an adapter was in a batch (LRU position)
    # per block phase
    due_head: np.ndarray
    due_cnt: np.ndarray
    # growable buffers (one array in a list: compiled code may replace it)
    heads: List  # (key, rid) heap: heads of in-set adapters
    fin: List  # (clock, rid, epoch) heap: decoders' finishing clocks
    front: List  # (key, rid) stack: preempted requests, global order
    aborted_ahead: List  # aborted before they arrived
    # outputs
    itl_gap: List
    itl_w: List
    preempt_gaps: List
    ts: List  # t, running, waiting, kv usage, preemptions per sample (5 floats each)
    trace: List  # 10 floats per step when tracing
    last_first: List  # the last step's first tokens and finishes (when collecting)
    last_fin: List


def _ints(n: int, fill: int = 0) -> np.ndarray:
    return np.full(n, fill, dtype=np.int64)


@njit(cache=True)
def _box(rows: int, cols: int) -> List:
    out = List.empty_list(_I64[:, :])
    out.append(np.zeros((rows, cols), dtype=np.int64))
    return out


# The typed lists are made in compiled (cached) code: made from Python, numba compiles the
# list's constructor and methods afresh in every process (2.4 s of a sim engine's 3-s start)
@njit(cache=True)
def _ilist() -> List:
    return List.empty_list(_I64)


@njit(cache=True)
def _flist() -> List:
    return List.empty_list(_F64)


REQUEST_COLS = ("arr", "adp", "plen", "olen", "state", "gen", "ncomp", "held", "dc_in", "trig0",
                "pos", "epoch", "is_dec", "first_t", "fin_t", "npre", "resume_t", "wkey",
                "run_prev", "run_next", "pf_prev", "pf_next", "due_prev", "due_next", "due_ph",
                "fresh_next", "af_prev", "af_next")
_FLOAT_COLS = {"arr", "first_t", "fin_t", "resume_t"}
_NONE_COLS = {"run_prev", "run_next", "pf_prev", "pf_next", "due_prev", "due_next", "due_ph",
              "fresh_next", "af_prev", "af_next"}
ADAPTER_QUEUE_COLS = ("fresh_head", "fresh_tail", "af_head")
ADAPTER_LORA_COLS = ("count", "active", "joined", "gpu_ms", "disk_ms", "in_gpu", "in_cpu",
                     "last_step")


def _request_col(name: str, n: int) -> np.ndarray:
    if name in _FLOAT_COLS:
        return np.full(n, np.nan if name != "arr" else 0.0)
    return _ints(n, NONE if name in _NONE_COLS else 0)


def new_state(ints: np.ndarray, floats: np.ndarray, cost: np.ndarray, pad: np.ndarray,
              period: int, capacity: int, adapters: int) -> EngineArrays:
    """An empty engine with room for ``capacity`` requests and ``adapters`` adapters."""
    ints[[RUN_HEAD, RUN_TAIL, PF_HEAD, PF_TAIL]] = NONE
    cols = {c: _request_col(c, capacity) for c in REQUEST_COLS}
    return EngineArrays(
        I=ints, F=floats, cost=cost, pad=pad, **cols, rej_before=_ints(capacity + 1),
        **{c: _ints(adapters + 1, NONE) for c in ADAPTER_QUEUE_COLS},
        count=_ints(adapters), active=_ints(adapters), joined=_ints(adapters),
        gpu_ms=np.zeros(adapters), disk_ms=np.zeros(adapters), in_gpu=_ints(adapters),
        in_cpu=_ints(adapters), last_step=_ints(adapters, -2),
        due_head=_ints(period, NONE), due_cnt=_ints(period),
        heads=_box(64, 2), fin=_box(64, 3), front=_box(16, 2), aborted_ahead=_ilist(),
        itl_gap=_flist(), itl_w=_ilist(), preempt_gaps=_flist(), ts=_flist(), trace=_flist(),
        last_first=_ilist(), last_fin=_ilist(),
    )


def grow_requests(s: EngineArrays, capacity: int) -> EngineArrays:
    """The same state with room for ``capacity`` requests."""
    new = {}
    for c in REQUEST_COLS:
        old = getattr(s, c)
        col = _request_col(c, capacity)
        col[:len(old)] = old
        new[c] = col
    rb = _ints(capacity + 1)
    rb[:len(s.rej_before)] = s.rej_before
    return s._replace(**new, rej_before=rb)


def grow_adapters(s: EngineArrays, adapters: int) -> EngineArrays:
    """The same state with room for ``adapters`` adapters."""
    new = {}
    for c in ADAPTER_QUEUE_COLS:
        col = _ints(adapters + 1, NONE)
        col[:len(getattr(s, c))] = getattr(s, c)
        new[c] = col
    for c in ADAPTER_LORA_COLS:
        old = getattr(s, c)
        col = np.zeros(adapters) if old.dtype.kind == "f" else _ints(
            adapters, -2 if c == "last_step" else 0)
        col[:len(old)] = old
        new[c] = col
    return s._replace(**new)


_I1 = types.int64[::1]
_F1 = types.float64[::1]
_BOX_T = types.ListType(types.int64[:, :])
_ILIST_T = types.ListType(types.int64)
_FLIST_T = types.ListType(types.float64)
FIELD_TYPES = [
    ("I", _I1),
    ("F", _F1),
    ("cost", _F1),
    ("pad", _I1),
    ("arr", _F1),
    ("adp", _I1),
    ("plen", _I1),
    ("olen", _I1),
    ("state", _I1),
    ("gen", _I1),
    ("ncomp", _I1),
    ("held", _I1),
    ("dc_in", _I1),
    ("trig0", _I1),
    ("pos", _I1),
    ("epoch", _I1),
    ("is_dec", _I1),
    ("first_t", _F1),
    ("fin_t", _F1),
    ("npre", _I1),
    ("resume_t", _F1),
    ("wkey", _I1),
    ("rej_before", _I1),
    ("run_prev", _I1),
    ("run_next", _I1),
    ("pf_prev", _I1),
    ("pf_next", _I1),
    ("due_prev", _I1),
    ("due_next", _I1),
    ("due_ph", _I1),
    ("fresh_next", _I1),
    ("af_prev", _I1),
    ("af_next", _I1),
    ("fresh_head", _I1),
    ("fresh_tail", _I1),
    ("af_head", _I1),
    ("count", _I1),
    ("active", _I1),
    ("joined", _I1),
    ("gpu_ms", _F1),
    ("disk_ms", _F1),
    ("in_gpu", _I1),
    ("in_cpu", _I1),
    ("last_step", _I1),
    ("due_head", _I1),
    ("due_cnt", _I1),
    ("heads", _BOX_T),
    ("fin", _BOX_T),
    ("front", _BOX_T),
    ("aborted_ahead", _ILIST_T),
    ("itl_gap", _FLIST_T),
    ("itl_w", _ILIST_T),
    ("preempt_gaps", _FLIST_T),
    ("ts", _FLIST_T),
    ("trace", _FLIST_T),
    ("last_first", _ILIST_T),
    ("last_fin", _ILIST_T),
]


@structref.register
class EngineStateType(types.StructRef):
    """The numba type of ``EngineState``."""

    def preprocess_fields(self, fields):  # noqa: ANN001, ANN201
        return tuple((name, types.unliteral(typ)) for name, typ in fields)


class EngineState(structref.StructRefProxy):
    """``EngineArrays`` packed for compiled code (a reference: the arrays are shared)."""


structref.define_boxing(EngineStateType, EngineState)
STATE_TYPE = EngineStateType(FIELD_TYPES)


@njit(cache=True)
def _pack(a):  # noqa: ANN001, ANN202
    s = structref.new(STATE_TYPE)
    s.I = a.I
    s.F = a.F
    s.cost = a.cost
    s.pad = a.pad
    s.arr = a.arr
    s.adp = a.adp
    s.plen = a.plen
    s.olen = a.olen
    s.state = a.state
    s.gen = a.gen
    s.ncomp = a.ncomp
    s.held = a.held
    s.dc_in = a.dc_in
    s.trig0 = a.trig0
    s.pos = a.pos
    s.epoch = a.epoch
    s.is_dec = a.is_dec
    s.first_t = a.first_t
    s.fin_t = a.fin_t
    s.npre = a.npre
    s.resume_t = a.resume_t
    s.wkey = a.wkey
    s.rej_before = a.rej_before
    s.run_prev = a.run_prev
    s.run_next = a.run_next
    s.pf_prev = a.pf_prev
    s.pf_next = a.pf_next
    s.due_prev = a.due_prev
    s.due_next = a.due_next
    s.due_ph = a.due_ph
    s.fresh_next = a.fresh_next
    s.af_prev = a.af_prev
    s.af_next = a.af_next
    s.fresh_head = a.fresh_head
    s.fresh_tail = a.fresh_tail
    s.af_head = a.af_head
    s.count = a.count
    s.active = a.active
    s.joined = a.joined
    s.gpu_ms = a.gpu_ms
    s.disk_ms = a.disk_ms
    s.in_gpu = a.in_gpu
    s.in_cpu = a.in_cpu
    s.last_step = a.last_step
    s.due_head = a.due_head
    s.due_cnt = a.due_cnt
    s.heads = a.heads
    s.fin = a.fin
    s.front = a.front
    s.aborted_ahead = a.aborted_ahead
    s.itl_gap = a.itl_gap
    s.itl_w = a.itl_w
    s.preempt_gaps = a.preempt_gaps
    s.ts = a.ts
    s.trace = a.trace
    s.last_first = a.last_first
    s.last_fin = a.last_fin
    return s


def pack(arrays: EngineArrays) -> EngineState:
    """The state compiled code takes (rebuild it after growing the arrays)."""
    return _pack(arrays)
