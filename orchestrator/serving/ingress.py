"""The OpenAI-compatible HTTP API: routes each request by its ``model`` field to a replica.

``IngressCore`` holds the routing table (orchestrator/serving/routing.py), one ``ReplicaClient`` per
replica (a Ray Serve handle in production, a local ``ReplicaCore`` in unit tests), the API keys,
its in-flight counts (the load least-loaded routing reads) and Prometheus metrics.
``build_api(core)`` returns the FastAPI app; the Serve ingress deployment
(orchestrator/serving/app.py) builds it per replica, so the app holds no module-level state.

Every response carries ``x-lorafleet-replica`` (``group/copy`` that served it, ``none`` when no
replica was involved) and ``x-lorafleet-engine`` (``vllm`` or ``sim``). Errors use OpenAI's
``{"error": {message, type, param, code}}`` body: 400 malformed or too long for the model, 413
a body over ``max_body_bytes`` (naming the limit), 401/403 keys, 404 unknown model (naming it),
503 replica dead or timed out (the request is retried once on another copy of the group if it
failed before producing output), never a hang. A client that goes away, streamed or not, aborts
its engine request at once (recorded as status 499). Every answer, those the ingress gives
itself included, is counted in ``lorafleet_requests_total`` (model ``unknown`` when the body
names no model this deployment serves: client input never becomes a label).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from orchestrator.serving.api_keys import ApiKeys, Tenant
from orchestrator.serving.backend import (
    EngineUnavailable,
    GenerateRequest,
    ServingError,
)
from orchestrator.serving.openai_schema import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_BYTES,
    ChatCompletionRequest,
    CompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    usage,
)
from orchestrator.serving.routing import ReplicaId, RoutingTable
from orchestrator.serving.telemetry import RequestRecord, Telemetry

REPLICA_HEADER = "x-lorafleet-replica"
ENGINE_HEADER = "x-lorafleet-engine"
# a streamed request carrying this header gets a last event (before [DONE], no choices) with the
# wall-clock stamps of its way through the serving path: {"lorafleet_timing": {"ingress_arrival",
# "engine_arrival", "engine_first", "ingress_first"}} (seconds); what `lorafleet profile
# --serving-path` fits the twin's serving-path term from
TIMING_HEADER = "x-lorafleet-timing"
DEFAULT_TIMEOUT_S = 300.0  # a whole non-streamed request / the gap between streamed tokens
CLIENT_GONE = 499  # nginx's "client closed request": the metrics' status for an aborted one
UNKNOWN_MODEL_LABEL = "unknown"


ACCEPT_TIMEOUT_S = 30.0  # a replica that has not accepted a request by then is failed for it
SUSPECT_S = 60.0  # ... and routed around (while another copy serves) this long after


class ReplicaClient(Protocol):
    """How the ingress talks to one replica (a Serve handle or an in-process ReplicaCore).

    ``stream`` yields the replica's acceptance first (``{"replica", "engine",
    "prompt_tokens"}``, or a refusal ``{"error"}``), then the output: token pieces, or with
    ``whole`` one dict holding the whole completion (a non-streamed request: two messages, not
    one per token, and still an acceptance the ingress can time)."""

    def stream(self, request: GenerateRequest, whole: bool = False
               ) -> AsyncIterator[dict[str, Any]]: ...

    def report(self) -> Awaitable[dict[str, Any]]: ...


class IngressCore:
    """Routing + dispatch + accounting, independent of HTTP and of Ray."""

    def __init__(
        self, table: RoutingTable, clients: Mapping[Hashable, ReplicaClient], *,
        engine: str, api_keys: ApiKeys | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] = time.perf_counter,
        endpoints: Mapping[ReplicaId, Hashable] | None = None, version: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, accept_timeout_s: float = ACCEPT_TIMEOUT_S,
    ) -> None:
        if not 0 < max_body_bytes <= MAX_BODY_BYTES:
            raise ValueError(f"max_body_bytes: must be in (0, {MAX_BODY_BYTES}] (Ray's 4-MiB "
                             f"message limit), got {max_body_bytes}")
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.accept_timeout_s = accept_timeout_s
        # replicas that failed or did not accept a request lately, until when: routed around
        # while another copy serves (a replica on a lost node, before Ray declares it dead, or
        # one Serve cannot restart for lack of GPUs, would hold every request it gets)
        self.suspect: dict[Hashable, float] = {}
        self.keys = api_keys or ApiKeys({})
        self.timeout_s = timeout_s
        self.clock = clock
        self.clients: dict[Hashable, ReplicaClient] = {}
        self.in_flight: dict[Hashable, int] = {}
        self.by_version: dict[int, int] = {}  # requests in flight per routing version picked
        self.retried = 0  # requests re-sent to another copy after their replica failed
        # the offered load, counted where each client request arrives exactly once (retries
        # and re-routes never count again): what the controller's workload estimate reads
        self.offered = Telemetry()
        reg = self.registry = CollectorRegistry()
        self.m_requests = Counter("lorafleet_requests", "requests by model, replica and status",
                                  ["model", "replica", "status"], registry=reg)
        self.m_tokens = Counter("lorafleet_tokens", "tokens by model and kind",
                                ["model", "kind"], registry=reg)
        self.m_latency = Histogram("lorafleet_request_latency_seconds",
                                   "ingress-observed request latency", ["replica"], registry=reg)
        self.m_ttft = Histogram("lorafleet_ttft_seconds", "time to first streamed token",
                                ["replica"], registry=reg)
        self.m_in_flight = Gauge("lorafleet_in_flight", "requests in flight", ["replica"],
                                 registry=reg)
        self.m_resident = Gauge("lorafleet_adapter_resident",
                                "1 for each adapter a replica holds, by tier (gpu: in a GPU "
                                "slot; cpu: loaded in the engine's CPU cache)",
                                ["replica", "adapter", "tier"], registry=reg)
        self.swap(table, clients, endpoints, version)

    def swap(self, table: RoutingTable, clients: Mapping[Hashable, ReplicaClient],
             endpoints: Mapping[ReplicaId, Hashable] | None = None, version: int = 0) -> None:
        """Install a new routing table atomically (no await inside: a request sees the old
        table or the new one, never a mix). ``endpoints`` maps each replica of the table to its
        client key (default: the ReplicaId itself). Clients no longer routed to stay until their
        in-flight requests end."""
        ends = dict(endpoints) if endpoints is not None else {r: r for r in table.replicas}
        missing = [str(r) for r in table.replicas if ends.get(r) not in clients]
        if missing:
            raise ValueError(f"no client for replica(s) {missing}")
        self.table, self.endpoints, self.version = table, ends, version
        self.clients.update(clients)
        for key in clients:
            self.in_flight.setdefault(key, 0)
        self._forget_idle()

    def _forget_idle(self) -> None:
        live = set(self.endpoints.values())
        for key in [k for k, n in self.in_flight.items() if n == 0 and k not in live]:
            del self.in_flight[key], self.clients[key]

    def drain_state(self) -> dict[str, Any]:
        """What the controller waits on before it shrinks or stops replicas: the version this
        ingress routes by, and its requests still in flight under an older one."""
        return {"version": self.version,
                "old_in_flight": sum(n for v, n in self.by_version.items() if v < self.version),
                "in_flight": {str(k): n for k, n in self.in_flight.items()},
                "retried": self.retried}

    # -- routing --------------------------------------------------------------------------
    def authorize(self, authorization: str | None, model: str) -> Tenant | None:
        tenant = self.keys.tenant(authorization)
        if not self.table.knows(model):
            self.table.groups_of(model)  # raises the 404 naming the model
        self.keys.check(tenant, model, is_base=model == self.table.base_model)
        return tenant

    def _pick(self, model: str, exclude: set[ReplicaId]) -> _Target | None:
        """The routing table's choice (first or retry), as a target to dispatch to; suspect
        replicas only when no other copy is left."""
        ends = self.endpoints
        now = self.clock()
        avoid = {r for r, k in ends.items() if self.suspect.get(k, -math.inf) > now}
        load = lambda r: self.in_flight[ends[r]]  # noqa: E731
        rid = self.table.route(model, load, exclude=exclude | avoid) if avoid else None
        if rid is None:
            rid = self.table.route(model, load, exclude=exclude)
        return None if rid is None else _Target(rid, ends[rid], self.version)

    def _fail(self, t: _Target) -> None:
        self.suspect[t.key] = self.clock() + SUSPECT_S

    def _acquire(self, t: _Target) -> None:
        self.in_flight[t.key] += 1
        self.by_version[t.version] = self.by_version.get(t.version, 0) + 1
        self.m_in_flight.labels(str(t.rid)).set(self.in_flight[t.key])

    def _release(self, t: _Target) -> None:
        self.in_flight[t.key] -= 1
        left = self.by_version[t.version] - 1
        if left:
            self.by_version[t.version] = left
        else:
            del self.by_version[t.version]
        self.m_in_flight.labels(str(t.rid)).set(self.in_flight[t.key])
        if self.in_flight[t.key] == 0 and t.key not in self.endpoints.values():
            self._forget_idle()

    def adapter_of(self, model: str) -> str | None:
        return None if model == self.table.base_model else model

    # -- the offered load ------------------------------------------------------------------
    def arrived(self, model: str) -> float:
        """Count one client request of ``model`` (once, at arrival); returns its arrival."""
        return self.offered.arrived(self.adapter_of(model) or "")

    def settled(self, model: str, arrival: float, *, ok: bool, first: float = math.nan,
                prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """The end of a request counted by ``arrived`` (its tokens when it succeeded)."""
        now = self.offered.clock()
        self.offered.finished(RequestRecord(self.adapter_of(model) or "", arrival, first,
                                            now if ok else math.nan, int(prompt_tokens),
                                            int(output_tokens), ok))

    def take_offered(self, source: str) -> dict[str, Any]:
        """The arrivals (and completions) since the last call, as a telemetry batch of
        ``source`` (``workload_window.TelemetryBatch``): what the ingress pushes."""
        return {"replica": source, **self.offered.take_batch(),
                "running": sum(self.in_flight.values()), "waiting": 0, "adapters_held": []}

    # -- dispatch -------------------------------------------------------------------------
    async def complete(self, model: str, req: GenerateRequest) -> tuple[ReplicaId, dict]:
        """Non-streamed: returns (replica, result); raises ServingError. A replica that fails
        before the result is known is retried like one that fails before accepting: the
        client has seen nothing yet."""
        tried: set[ReplicaId] = set()
        t0 = self.clock()
        while True:
            opened = await self._open(model, req, tried, whole=True)
            t, rid = opened.target, opened.rid
            try:
                result = await asyncio.wait_for(opened.rest.__anext__(), self.timeout_s)
            except TimeoutError:
                self._count(model, rid, 503)
                raise EngineUnavailable(
                    f"replica {rid} did not answer within {self.timeout_s:g} s") from None
            except Exception as exc:  # replica died (StopAsyncIteration: ended without one)
                self._count(model, rid, 503)
                self._fail(t)
                if not self.table.may_retry(len(tried)):
                    raise EngineUnavailable(f"replica {rid} failed: {type(exc).__name__}: "
                                            f"{str(exc)[:300]}") from None
                self.retried += 1
                continue
            finally:
                self._release(t)
                await _close(opened.rest)
            if "error" in result:
                err = self._refusal(model, rid, result["error"], len(tried))
                if err is None:
                    continue
                raise err
            self.m_latency.labels(str(rid)).observe(self.clock() - t0)
            self._count(model, rid, 200)
            self.m_tokens.labels(model, "prompt").inc(result.get("prompt_tokens", 0))
            self.m_tokens.labels(model, "completion").inc(result.get("completion_tokens", 0))
            return rid, {**opened.first, **result}

    async def open_stream(self, model: str, req: GenerateRequest) -> OpenStream:
        """Start a stream and wait for the replica to accept it (its first item), so that
        refusals become proper HTTP statuses; the caller must ``close`` the returned stream."""
        return await self._open(model, req, set())

    async def _open(self, model: str, req: GenerateRequest, tried: set[ReplicaId], *,
                    whole: bool = False) -> OpenStream:
        """Dispatch to a replica and wait up to ``accept_timeout_s`` for its acceptance; a
        replica that fails or does not accept is marked suspect and, once per request, another
        copy is tried; refusals (a 4xx) are the request's answer."""
        why: list[str] = []
        while True:
            t = self._pick(model, tried)
            if t is None:
                raise EngineUnavailable(f"every replica serving {model!r} failed: "
                                        f"{'; '.join(why) or sorted(map(str, tried))}")
            rid = t.rid
            tried.add(rid)
            self._acquire(t)
            it: Any = None
            try:
                it = self.clients[t.key].stream(req, whole).__aiter__()
                first = await asyncio.wait_for(it.__anext__(), self.accept_timeout_s)
            except Exception as exc:  # TimeoutError, StopAsyncIteration, a dead replica
                self._release(t)
                await _close(it)
                self._count(model, rid, 503)
                self._fail(t)
                why.append(f"replica {rid} " + (
                    f"did not accept the request within {self.accept_timeout_s:g} s"
                    if isinstance(exc, TimeoutError) else "ended the stream at once"
                    if isinstance(exc, StopAsyncIteration)
                    else f"failed: {type(exc).__name__}: {str(exc)[:300]}"))
                if not self.table.may_retry(len(tried)):
                    raise EngineUnavailable(why[-1]) from None
                self.retried += 1
                continue
            if "error" in first:
                self._release(t)
                await _close(it)
                err = self._refusal(model, rid, first["error"], len(tried))
                if err is None:
                    continue
                raise err
            self.suspect.pop(t.key, None)  # it accepts again
            return OpenStream(t, first, it)

    def _refusal(self, model: str, rid: ReplicaId, error: Mapping[str, Any], tries: int
                 ) -> ServingError | None:
        """A replica's refusal as the error to answer with, or None to try another copy. A
        replica that lacks an adapter the table routes to it is being re-targeted or was just
        replaced by Serve: that is our inconsistency, not the client's, so it is retried once
        and otherwise a 503 - never a 404 for an adapter this deployment serves."""
        err = ServingError.from_dict(error)
        self._count(model, rid, err.status)
        if err.status == 404 and self.table.knows(model):
            if self.table.may_retry(tries):
                self.retried += 1
                return None
            err = EngineUnavailable(f"replica {rid} does not hold {model!r} yet (it is being "
                                    f"re-targeted or was just restarted); retry shortly")
        err.replica = rid  # type: ignore[attr-defined]
        return err

    def _count(self, model: str, rid: ReplicaId | None, status: int) -> None:
        self.m_requests.labels(model, str(rid) if rid else "none", str(status)).inc()

    def count_rejected(self, model: Any, status: int) -> None:
        """An answer the ingress gave itself (validation, keys, unknown model, body limit)."""
        label = model if isinstance(model, str) and self.table.knows(model) \
            else UNKNOWN_MODEL_LABEL
        self._count(label, None, status)

    async def refresh_residency(self, timeout_s: float = 5.0) -> None:
        """Set ``lorafleet_adapter_resident`` from every replica's report (on each scrape:
        routers and dashboards need to see which adapters sit where, not only the plan)."""
        try:
            reports = await asyncio.wait_for(self.reports(), timeout_s)
        except TimeoutError:
            return
        self.m_resident.clear()
        for name, rep in reports.items():
            for tier, ids in (rep.get("residency") or {}).items():
                for a in ids:
                    self.m_resident.labels(name, a, tier).set(1)

    async def reports(self) -> dict[str, Any]:
        """Every replica's telemetry report (errors reported, not raised)."""
        async def one(rid: ReplicaId) -> tuple[str, Any]:
            try:
                client = self.clients[self.endpoints[rid]]
                return str(rid), await asyncio.wait_for(client.report(), 30)
            except Exception as exc:
                return str(rid), {"error": f"{type(exc).__name__}: {exc}"}

        return dict(await asyncio.gather(*(one(r) for r in self.table.replicas)))


@dataclass(frozen=True)
class _Target:
    """One dispatch: the replica routed to, its client key, the routing version it used."""

    rid: ReplicaId
    key: Hashable
    version: int


@dataclass(frozen=True)
class OpenStream:
    """An accepted stream: where it runs, the replica's first item and the rest."""

    target: _Target
    first: dict
    rest: AsyncIterator[dict]

    @property
    def rid(self) -> ReplicaId:
        return self.target.rid


async def _close(it: Any) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


# ----------------------------------------------------------------------------- HTTP
class _DefaultHeaders:
    """ASGI middleware: add the lorafleet headers to responses that lack them (errors before
    routing, /health, ...). Pure ASGI, so streaming responses pass through untouched."""

    def __init__(self, app: Any, engine: str) -> None:
        self.app = app
        self.defaults = [(REPLICA_HEADER.encode(), b"none"), (ENGINE_HEADER.encode(),
                                                             engine.encode())]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.defaults if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _headers(rid: ReplicaId | None, engine: str) -> dict[str, str]:
    return {REPLICA_HEADER: str(rid) if rid else "none", ENGINE_HEADER: engine}


def _error_response(err: ServingError, engine: str) -> JSONResponse:
    rid = getattr(err, "replica", None)
    return JSONResponse(error_body(err.status, err.type, err.message, err.param),
                        status_code=err.status, headers=_headers(rid, engine))


def build_api(core: IngressCore) -> FastAPI:
    """The FastAPI app over ``core`` (module docstring)."""
    app = FastAPI(title="lorafleet", version="1", description=(
        "OpenAI-compatible serving of many LoRA adapters; `model` is the adapter id or the base "
        f"model name ({core.table.base_model!r})."))
    engine = core.engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        core.count_rejected(exc.body.get("model") if isinstance(exc.body, dict) else None, 400)
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())[1:]) if errs else ""
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: "
                        f"{e.get('msg')}" for e in errs[:5])
        return JSONResponse(error_body(400, "invalid_request_error", f"malformed request: {msg}",
                                       where or None), status_code=400)

    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> JSONResponse:
        return _error_response(exc, engine)

    async def run(request: Request, body: CompletionRequest | ChatCompletionRequest,
                  chat: bool) -> Response:
        model = body.model
        arrival_wall = time.time()
        try:
            core.authorize(request.headers.get("authorization"), model)
        except ServingError as exc:
            core.count_rejected(model, exc.status)
            raise
        arrival = core.arrived(model)
        rid_text = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            req = body.to_generate(rid_text, core.adapter_of(model))
        except ServingError as exc:
            core.settled(model, arrival, ok=False)
            core.count_rejected(model, exc.status)
            raise
        t0 = core.clock()
        try:
            if not body.stream:
                done = await _unless_gone(request, core.complete(model, req))
                if done is None:  # the client went away: the engine request was cancelled
                    core.settled(model, arrival, ok=False)
                    core.count_rejected(model, CLIENT_GONE)
                    return Response(status_code=CLIENT_GONE)
                rid, result = done
            else:
                stream = await core.open_stream(model, req)
        except BaseException:
            core.settled(model, arrival, ok=False)
            raise
        if not body.stream:
            core.settled(model, arrival, ok=True,
                         prompt_tokens=result.get("prompt_tokens", 0),
                         output_tokens=result.get("completion_tokens", 0))
            return JSONResponse(completion_body(rid_text, model, result, chat),
                                headers=_headers(rid, result.get("engine", engine)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(core, model, stream, rid_text, chat, include_usage, t0, arrival,
                 arrival_wall if TIMING_HEADER in request.headers else None),
            media_type="text/event-stream",
            headers=_headers(stream.rid, stream.first.get("engine", engine)),
        )

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await run(request, body, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        tenant = core.keys.tenant(request.headers.get("authorization"))
        base = core.table.base_model
        now = int(time.time())
        data = []
        if tenant is None or tenant.base_model:
            data.append({"id": base, "object": "model", "created": now, "owned_by": "lorafleet",
                         "root": base, "parent": None})
        for a in core.keys.visible(tenant, core.table.adapters):
            data.append({"id": a, "object": "model", "created": now, "owned_by": "lorafleet",
                         "root": a, "parent": base,
                         "lorafleet_groups": list(core.table.groups_of(a))})
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "engine": engine,
                             "replicas": [str(r) for r in core.table.replicas],
                             "in_flight": sum(core.in_flight.values()),
                             "retried": core.retried})

    @app.get("/metrics")
    async def metrics() -> Response:
        await core.refresh_residency()
        return Response(generate_latest(core.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_BodyLimit, core=core)
    app.add_middleware(_DefaultHeaders, engine=engine)
    return app


async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any | None:
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first. Once
    the body is read, the next ASGI message is the disconnect; cancelling the handle call
    cancels the replica's coroutine, whose engine request is aborted (vLLM's ``generate``
    aborts on cancellation, the sim's frees its request)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _BodyLimit:
    """ASGI middleware: a request body over ``core.max_body_bytes`` is answered 413 naming the
    limit before anything parses it (declared by Content-Length or counted as it streams)."""

    def __init__(self, app: Any, core: IngressCore) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.core.max_body_bytes
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, int(declared))
            return
        messages, size = [], 0
        while True:  # read the body (bounded by the limit), then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(send, size)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> dict:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send: Any, size: int) -> None:
        self.core.count_rejected(None, 413)
        limit = self.core.max_body_bytes
        body = json.dumps(error_body(
            413, "invalid_request_error",
            f"request body of {size} bytes (or more) exceeds the limit of {limit} bytes "
            f"({limit / 2**20:g} MiB, the deployment's max_body_bytes)", None)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _sse(core: IngressCore, model: str, stream: OpenStream, request_id: str, chat: bool,
               include_usage: bool, t0: float, arrival: float, timed: float | None = None
               ) -> AsyncIterator[str]:
    """OpenAI server-sent events: chunks, optional usage chunk, the serving-path stamps when
    asked for (``timed``: the ingress's wall-clock arrival; ``TIMING_HEADER``), ``[DONE]``."""
    rid, first, it = stream.rid, stream.first, stream.rest
    created = int(time.time())
    stamps = {"ingress_arrival": timed, "engine_arrival": first.get("t_arrival"),
              "engine_first": None, "ingress_first": None}
    n_out, status, got_first = 0, 200, False
    first_at = math.nan
    served = False  # ended normally (not an error, an abort or a client gone mid-stream)
    role_sent = not chat  # the chat role chunk goes out with the first output, as vLLM's
    # server sends it: clients time TTFT from the first chunk
    try:
        while True:
            try:
                item = await asyncio.wait_for(it.__anext__(), core.timeout_s)
            except StopAsyncIteration:
                served = True
                break
            except TimeoutError:
                status = 503
                yield _event(error_body(503, "engine_unavailable",
                                        f"replica {rid} stalled for {core.timeout_s:g} s"))
                break
            except Exception as exc:
                status = 503
                yield _event(error_body(503, "engine_unavailable",
                                        f"replica {rid} failed mid-stream: {exc}"))
                break
            if "error" in item:
                status = int(item["error"].get("status", 500))
                e = item["error"]
                yield _event(error_body(status, e.get("type", ""), e.get("message", "")))
                break
            if not role_sent:
                role_sent = True
                yield _event(chunk_body(request_id, model, created, True, "", None, role=True))
            if item["n"] and not got_first:
                got_first = True
                stamps["engine_first"], stamps["ingress_first"] = item.get("t_first"), time.time()
                first_at = core.offered.clock()
                core.m_ttft.labels(str(rid)).observe(core.clock() - t0)
            n_out += item["n"]
            yield _event(chunk_body(request_id, model, created, chat, item["text"],
                                    item["finish_reason"]))
            if item["finish_reason"] is not None:
                served = item["finish_reason"] != "abort"
                break
        if include_usage:
            body = chunk_body(request_id, model, created, chat, None, None)
            body["choices"] = []
            body["usage"] = usage(int(first.get("prompt_tokens", 0)), n_out)
            yield _event(body)
        if timed is not None:
            body = chunk_body(request_id, model, created, chat, None, None)
            body["choices"] = []
            body["lorafleet_timing"] = stamps
            yield _event(body)
        yield "data: [DONE]\n\n"
    except (GeneratorExit, asyncio.CancelledError):  # the client went away mid-stream
        status = CLIENT_GONE
        raise
    finally:
        core._release(stream.target)
        await _close(it)
        core.settled(model, arrival, ok=status == 200 and served, first=first_at,
                     prompt_tokens=int(first.get("prompt_tokens", 0)), output_tokens=n_out)
        core._count(model, rid, status)
        core.m_latency.labels(str(rid)).observe(core.clock() - t0)
        core.m_tokens.labels(model, "prompt").inc(int(first.get("prompt_tokens", 0)))
        core.m_tokens.labels(model, "completion").inc(n_out)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
