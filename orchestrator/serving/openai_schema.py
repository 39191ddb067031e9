"""OpenAI-compatible request bodies (pydantic: they are the ingress's OpenAPI schema) and the
response/chunk shapes the official ``openai`` client parses.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields a server may not
use). What lorafleet cannot honour is refused with a 400 rather than silently ignored: ``n`` > 1,
several prompts in one request, ``logprobs``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.serving.backend import BadRequest, GenerateRequest

# Ray's gRPC messages are capped at 4 MiB (a request handed to a replica is one); a body over
# that failed on the replica and was retried as a replica failure. 2 MiB holds a 100k-token
# prompt as a JSON list of ids.
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024 - 64 * 1024

DEFAULT_MAX_TOKENS = 16
Text = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(description="an adapter id, or the base model's name")
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate exactly max_tokens")

    def _checked_common(self) -> tuple[int, tuple[str, ...]]:
        if self.n != 1:
            raise BadRequest("n > 1 is not supported; send separate requests", param="n")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return self.max_tokens or DEFAULT_MAX_TOKENS, stop


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: Text | Annotated[list[TokenId], Field(min_length=1)] | Annotated[
        list[Text], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    def to_generate(self, request_id: str, adapter: str | None) -> GenerateRequest:
        max_tokens, stop = self._checked_common()
        if self.logprobs is not None or self.echo:
            raise BadRequest("logprobs and echo are not supported", param="logprobs")
        prompt, ids = None, None
        if isinstance(self.prompt, str):
            prompt = self.prompt
        elif all(isinstance(p, str) for p in self.prompt):
            prompt = str(self.prompt[0])
        else:
            ids = tuple(int(p) for p in self.prompt)
        return GenerateRequest(request_id, adapter, max_tokens, prompt=prompt,
                               prompt_token_ids=ids, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed, stop=stop,
                               ignore_eos=self.ignore_eos)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    logprobs: bool = False

    def to_generate(self, request_id: str, adapter: str | None) -> GenerateRequest:
        max_tokens, stop = self._checked_common()
        if self.max_completion_tokens is not None:
            max_tokens = self.max_completion_tokens
        if self.logprobs:
            raise BadRequest("logprobs are not supported", param="logprobs")
        msgs = tuple((m.role, m.text()) for m in self.messages)
        return GenerateRequest(request_id, adapter, max_tokens, messages=msgs,
                               temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                               stop=stop, ignore_eos=self.ignore_eos)


# ----------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, result: dict[str, Any], chat: bool) -> dict[str, Any]:
    created = int(time.time())
    u = usage(result.get("prompt_tokens", 0), result.get("completion_tokens", 0))
    if chat:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": result["text"]},
                             "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": u}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                         "finish_reason": result["finish_reason"]}],
            "usage": u}


def chunk_body(rid: str, model: str, created: int, chat: bool, text: str | None,
               finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                                  "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def error_body(status: int, type_: str, message: str, param: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
