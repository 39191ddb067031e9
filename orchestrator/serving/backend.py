"""What every engine backend of a serving replica offers, and the errors the API maps to HTTP.

Two backends sit behind one interface (``EngineBackend``): ``vllm`` (a real vLLM ``AsyncLLM``,
serving/vllm_engine.py) and ``sim`` (the twin's step-time model run in real time,
serving/sim_engine.py). The replica wrapper (serving/replica.py), the ingress and the tests only
talk to this interface, so the control plane is exercised the same way with either.

Requests and results are small frozen dataclasses: they cross Ray process boundaries by pickle,
and a malformed one fails here, at the boundary, not deep inside an engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

ENGINE_KINDS = ("vllm", "sim")


class ServingError(Exception):
    """An error with an HTTP status and an OpenAI-style ``type``; the message says what to do."""

    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "type": self.type, "message": self.message,
                "param": self.param}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> ServingError:
        cls = _BY_STATUS.get(int(d.get("status", 500)), ServingError)
        err = cls(str(d.get("message", "error")), param=d.get("param"))
        err.status = int(d.get("status", 500))
        err.type = str(d.get("type", err.type))
        return err


class BadRequest(ServingError):
    status, type = 400, "invalid_request_error"


class PromptTooLong(BadRequest):
    """Prompt (+ requested completion) exceeds the replica's context length."""


class Unauthorized(ServingError):
    status, type = 401, "authentication_error"


class Forbidden(ServingError):
    status, type = 403, "permission_error"


class UnknownModel(ServingError):
    status, type = 404, "not_found_error"


class EngineUnavailable(ServingError):
    """The replica died, timed out or is shutting down: fail explicitly, never hang."""

    status, type = 503, "engine_unavailable"


_BY_STATUS: dict[int, type[ServingError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: UnknownModel, 503: EngineUnavailable,
}


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request as the ingress hands it to a replica.

    Exactly one of ``prompt`` (text), ``prompt_token_ids`` or ``messages`` (chat) is set.
    ``adapter=None`` means the base model. ``ignore_eos`` (a vLLM extension) makes the engine
    produce exactly ``max_tokens`` tokens, as load generators need.
    """

    request_id: str
    adapter: str | None
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.prompt_token_ids, self.messages))
        if given != 1:
            raise BadRequest("exactly one of prompt, prompt token ids or messages is required")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                             param="max_tokens")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed completion: new text and how many tokens it holds.

    The first delta of a stream has ``n_tokens == 0`` and carries ``prompt_tokens`` (the request
    was accepted); the last carries ``finish_reason`` (``length``, ``stop`` or ``abort``).
    """

    text: str = ""
    n_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True)
class BackendInfo:
    """What a started backend reports: kind, limits, adapters held, start-up facts."""

    kind: str
    model: str
    max_model_len: int
    adapters: tuple[str, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)


class EngineBackend(Protocol):
    """One engine serving one replica group's adapters (module docstring)."""

    kind: str

    async def start(self) -> BackendInfo:
        """Start the engine and register the group's adapters; returns what it holds."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Stream the completion; raises ServingError subclasses for requests it refuses."""
        ...

    def queue_depth(self) -> tuple[int, int]:
        """(running, waiting) requests right now."""
        ...

    def loaded_adapters(self) -> Sequence[str]:
        """Adapters registered with the engine (held on this replica)."""
        ...

    def residency(self) -> Mapping[str, Sequence[str]]:
        """Which adapters sit where now: ``{"gpu": [...], "cpu": [...]}`` (the metric
        ``lorafleet_adapter_resident``)."""
        ...

    async def set_adapters(self, adapters: Sequence[Any]) -> None:
        """Serve exactly these adapters (``AdapterEntry``s) from now on: new requests for others
        are refused, requests already running finish. The controller re-targets a replica this
        way instead of restarting it when a re-plan moves adapters."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is dead (Serve restarts the replica)."""
        ...

    async def stop(self) -> None:
        """Shut the engine down (idempotent)."""
        ...


def context_limit_error(prompt_tokens: int, max_tokens: int, max_model_len: int) -> PromptTooLong:
    """The 400 vLLM's OpenAI server gives, with the limit and both token counts."""
    return PromptTooLong(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the "
        f"completion). Shorten the prompt or lower max_tokens (limit: {max_model_len} tokens).",
        param="max_tokens" if prompt_tokens < max_model_len else "prompt",
    )
