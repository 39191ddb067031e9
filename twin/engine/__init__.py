"""The twin's engine: one vLLM V1 engine serving LoRA adapters, emulated step by step.

Its pieces follow vLLM's own (see docs/vllm_v1_semantics.md for the source references):

* ``state``: every piece's data as flat arrays (the request table, per-adapter columns, linked
  lists, heaps: ``heaps``), so the hot path runs compiled (numba);
* ``scheduler``: ``Scheduler.schedule()`` — running first within the token budget, then waiting
  FCFS, the ``max_loras`` admission rule, preemption;
* ``kv_blocks``: the paged KV pool (``KVCacheManager``), preallocation included;
* ``waiting`` and ``running``: the two queues, with aggregates so a step costs O(changes);
* ``lora_set``: the step's adapter set and the worker's GPU-slot / CPU-cache LRU walk;
* ``loop``: one step — arrivals, ``schedule()``, the step time, the update — and ``advance``;
* ``step_time``: ``twin.latency.StepCost.ms``'s formula, compiled;
* ``core``: ``EngineCore`` — submit, step, advance, abort, results (Python; the loop is
  compiled);
* ``run``: ``run_engine``, a whole workload in simulated time (the offline twin); the live
  ``sim`` serving backend drives ``EngineCore`` in real time.

Optionally, the load generator's cap on requests in flight (``client_max_inflight``): requests
arriving beyond it fail at the client and never reach the engine.
"""

from twin.engine.core import EngineCore
from twin.engine.result import EngineResult, StepTrace
from twin.engine.run import run_engine

__all__ = ["EngineCore", "EngineResult", "StepTrace", "run_engine"]
