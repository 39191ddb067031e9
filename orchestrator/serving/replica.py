"""One serving replica: an engine backend + telemetry + the wire format the ingress reads.

``ReplicaSpec`` is everything a replica needs (its group and copy, engine kind and config,
adapters with their sources, model path, profile); it is validated when built, in the deploying
process, so a bad plan fails before any Ray actor starts. ``ReplicaCore`` is plain asyncio: the
Ray Serve deployment (orchestrator/serving/app.py) only forwards to it, and unit tests drive it
directly. Results cross the process boundary as small dicts: ``{"error": {...}}`` for a refused
request (status, type, message), so an error never depends on exception pickling across Ray.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from orchestrator.serving.backend import (
    EngineBackend,
    EngineUnavailable,
    GenerateRequest,
    ServingError,
)
from orchestrator.serving.registry import AdapterEntry
from orchestrator.serving.spec import ReplicaSpec
from orchestrator.serving.telemetry import RequestRecord, Telemetry
from twin.profile import load_profile


def make_backend(spec: ReplicaSpec) -> EngineBackend:
    """The backend the spec asks for. Each backend's module is imported only for its kind: a
    vLLM replica's process never loads the compiled twin (numba breaks vLLM 0.32's CPU
    kernel-override scan), and vLLM itself is imported only when a vllm engine starts."""
    if spec.engine_kind == "sim":
        from orchestrator.serving.sim_engine import SimEngine

        return SimEngine(spec.engine, load_profile(spec.profile),
                         {a.id: a.rank for a in spec.adapters},
                         max_model_len=spec.max_model_len or 0, time_scale=spec.sim_time_scale)
    from orchestrator.serving.vllm_engine import VLLMEngine

    return VLLMEngine(spec)


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServingError):
        return {"error": exc.to_dict()}
    return {"error": {"status": 500, "type": "server_error", "param": None,
                      "message": f"engine error: {type(exc).__name__}: {exc}"}}


class ReplicaCore:
    """Backend + telemetry; ``stream``/``complete`` never raise for a refused request."""

    def __init__(self, spec: ReplicaSpec, backend: EngineBackend | None = None) -> None:
        self.spec = spec
        self.backend = backend or make_backend(spec)
        self.telemetry = Telemetry()
        self.instance = uuid.uuid4().hex[:12]  # this process: a replaced replica has another
        self.info: dict[str, Any] = {}
        self.name = str(spec.replica_id)

    async def start(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        info = await self.backend.start()
        self.info = {"replica": self.name, "engine": info.kind, "model": info.model,
                     "max_model_len": info.max_model_len, "adapters": list(info.adapters),
                     "ready_s": time.perf_counter() - t0, **dict(info.facts)}
        return self.info

    async def stop(self) -> None:
        await self.backend.stop()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """Dicts: first ``{"replica", "engine", "prompt_tokens", "t_arrival"}``, then ``{"text",
        "n"}`` pieces (the first with a token also ``t_first``), the last with
        ``finish_reason``; or a single ``{"error": ...}``. ``t_*``: wall-clock seconds."""
        adapter = request.adapter or ""
        arrival = self.telemetry.arrived(adapter)
        arrival_wall = time.time()  # wall clock: the serving-path stamps (module ingress)
        first = finish = math.nan
        n_prompt = n_out = 0
        ok = False
        try:
            async for d in self.backend.generate(request):
                if d.n_tokens == 0 and d.finish_reason is None:
                    n_prompt = d.prompt_tokens
                    yield {"replica": self.name, "engine": self.backend.kind,
                           "prompt_tokens": n_prompt, "t_arrival": arrival_wall}
                    continue
                item = {"text": d.text, "n": d.n_tokens, "finish_reason": d.finish_reason}
                if d.n_tokens and math.isnan(first):
                    first = self.telemetry.clock()
                    item["t_first"] = time.time()
                n_out += d.n_tokens
                if d.finish_reason is not None:
                    finish = self.telemetry.clock()
                    ok = d.finish_reason != "abort"
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield _error(exc)
        finally:
            self.telemetry.finished(RequestRecord(adapter, arrival, first, finish, n_prompt,
                                                  n_out, ok))

    async def stream_whole(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """``stream``'s acceptance, then the whole completion as one item (``{"text",
        "completion_tokens", "finish_reason"}``), or an ``{"error"}`` item."""
        out: dict[str, Any] = {"text": "", "completion_tokens": 0, "finish_reason": None}
        parts: list[str] = []
        async for item in self.stream(request):
            if "error" in item or "replica" in item:
                yield item
                if "error" in item:
                    return
                continue
            parts.append(item["text"])
            out["completion_tokens"] += item["n"]
            if item["finish_reason"] is not None:
                out["finish_reason"] = item["finish_reason"]
        out["text"] = "".join(parts)
        if out["finish_reason"] == "abort":
            yield _error(EngineUnavailable("the engine aborted the request (shutting down?)"))
            return
        yield out

    async def complete(self, request: GenerateRequest) -> dict[str, Any]:
        """The whole completion: ``{"replica", "engine", "text", "prompt_tokens",
        "completion_tokens", "finish_reason"}`` or ``{"error": ...}``."""
        out: dict[str, Any] = {}
        async for item in self.stream_whole(request):
            out = item if "error" in item else {**out, **item}
        return out

    async def assign(self, group: str, copy: int, adapters: Sequence[AdapterEntry],
                     predicted: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Re-target this replica (the controller's transitions): serve ``adapters`` as copy
        ``copy`` of ``group`` from now on; running requests finish where they are."""
        spec = replace(self.spec, group=group, copy=copy, adapters=tuple(adapters),
                       predicted=dict(predicted or {}))
        await self.backend.set_adapters(spec.adapters)
        self.spec, self.name = spec, str(spec.replica_id)
        return {"replica": self.name, "adapters": list(self.backend.loaded_adapters())}

    def take_batch(self, endpoint: str) -> dict[str, Any]:
        """The telemetry counts since the last call (``workload_window.TelemetryBatch``)."""
        running, waiting = self.backend.queue_depth()
        return {"replica": endpoint, **self.telemetry.take_batch(), "running": running,
                "waiting": waiting, "adapters_held": list(self.backend.loaded_adapters()),
                "instance": self.instance}

    def report(self, window_s: float | None = None) -> dict[str, Any]:
        """Telemetry snapshot + what the replica holds + its queue + the plan's prediction."""
        running, waiting = self.backend.queue_depth()
        snap = self.telemetry.snapshot(window_s)
        snap["adapters_live"] = snap.pop("adapters")
        return {
            "replica": self.name, "group": self.spec.group, "copy": self.spec.copy,
            "engine": self.backend.kind, "adapters": list(self.backend.loaded_adapters()),
            "residency": {k: list(v) for k, v in self.backend.residency().items()},
            "running": running, "waiting": waiting, "predicted": dict(self.spec.predicted),
            "info": self.info, **snap,
        }


class LocalClient:
    """``ReplicaClient`` over an in-process ReplicaCore (unit tests, the router benchmark)."""

    def __init__(self, core: ReplicaCore) -> None:
        self.core = core

    def stream(self, request: GenerateRequest, whole: bool = False
               ) -> AsyncIterator[dict[str, Any]]:
        return self.core.stream_whole(request) if whole else self.core.stream(request)

    async def report(self) -> dict[str, Any]:
        return self.core.report()
