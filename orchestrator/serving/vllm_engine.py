"""The ``vllm`` engine backend: one vLLM ``AsyncLLM`` with LoRA, serving one replica group.

Same interface as the sim (orchestrator/serving/backend.py). The engine is configured from the
group's plan entry (max_loras, max_cpu_loras, max_lora_rank, max_num_seqs,
max_num_batched_tokens, block_size, max_model_len) and every adapter of the group is registered
at start with ``add_lora`` from the adapter registry's path or URI, as ``vllm serve
--lora-modules`` does; a request names its adapter, never a path.

CPU specifics (DESIGN §6; the same code serves GPUs): ``VLLM_CPU_KVCACHE_SPACE`` bounds the KV
cache, ``OMP_NUM_THREADS`` the torch threads of the replica, the block size is rounded up to a
multiple of 32, the executor runs in-process (``uni``). These environment variables must be set
before vLLM is imported: the Serve deployment passes them in its runtime_env too.

Prompts are tokenized here (the engine's own tokenizer; chat through the model's chat template)
so the context-length check can answer 400 with the limit before the engine sees the request.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from orchestrator.serving.adapter_fetch import CACHE_ENV, is_remote, local_source
from orchestrator.serving.backend import (
    BackendInfo,
    BadRequest,
    Delta,
    EngineUnavailable,
    GenerateRequest,
    UnknownModel,
    context_limit_error,
)
from orchestrator.serving.spec import ReplicaSpec

CPU_BLOCK_MULTIPLE = 32


def engine_env(spec: ReplicaSpec) -> dict[str, str]:
    """Environment a vLLM replica process needs before importing vLLM: the CPU build's
    settings (KV-cache space, one OMP thread, the engine core in process) only for a replica
    without GPUs; a GPU replica runs vLLM's defaults (Ray sets CUDA_VISIBLE_DEVICES)."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if os.environ.get(CACHE_ENV):  # where remote adapters are fetched: the deployer's choice
        env[CACHE_ENV] = os.environ[CACHE_ENV]
    if spec.gpus <= 0:
        env.update({
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(spec.kv_cache_gib))),
            "OMP_NUM_THREADS": str(spec.omp_threads),
        })
    return env


class VLLMEngine:
    kind = "vllm"

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.engine: Any = None
        self.loras: dict[str, Any] = {}  # adapters served now
        self._known: dict[str, Any] = {}  # every adapter ever registered, by id
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
        self._running = 0
        self._active: collections.Counter[str] = collections.Counter()  # running, per adapter
        self._params: Any = None

    async def start(self) -> BackendInfo:
        for k, v in engine_env(self.spec).items():
            os.environ.setdefault(k, v)
        clock = time.perf_counter
        t0 = clock()
        import vllm
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self._params = SamplingParams
        facts: dict[str, Any] = {"import_s": clock() - t0, "vllm_version": vllm.__version__}
        e = self.spec.engine
        block = e.block_size
        if current_platform.is_cpu() and block % CPU_BLOCK_MULTIPLE:
            block = -(-block // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
        kwargs: dict[str, Any] = {
            "model": self.spec.model, "enable_lora": True, "max_loras": e.max_loras,
            "max_cpu_loras": e.cpu_slots, "max_lora_rank": e.max_lora_rank,
            "max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
            "block_size": block, "seed": 0, "disable_log_stats": True,
            "enable_prefix_caching": False,
            # one process, or vLLM's own workers over the GPUs Ray gave this replica
            "tensor_parallel_size": self.spec.tensor_parallel_size,
            "distributed_executor_backend": "uni" if self.spec.tensor_parallel_size == 1
            else "mp",
        }
        if self.spec.max_model_len:
            kwargs["max_model_len"] = self.spec.max_model_len
        t1 = clock()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        facts["engine_start_s"] = clock() - t1
        vc = self.engine.vllm_config
        self.max_model_len = int(vc.model_config.max_model_len)
        self.vocab_size = int(vc.model_config.get_vocab_size())
        facts["kv_cache_tokens"] = int((vc.cache_config.num_gpu_blocks or 0) * block)
        facts["block_size"] = block
        facts["max_loras"] = e.max_loras
        self.tokenizer = self.engine.get_tokenizer()
        t1 = clock()
        await self.set_adapters(self.spec.adapters)
        facts["adapter_register_s"] = clock() - t1
        return BackendInfo("vllm", self.spec.model, self.max_model_len, tuple(self.loras), facts)

    def loaded_adapters(self) -> Sequence[str]:
        return tuple(self.loras)

    def residency(self) -> Mapping[str, Sequence[str]]:
        """gpu: the adapters of requests running now (each holds a GPU slot; vLLM does not
        expose the idle slots' contents, so this is a lower bound); cpu: the adapters
        registered with the engine (its CPU cache keeps up to ``max_cpu_loras`` of them)."""
        return {"gpu": sorted(a for a, n in self._active.items() if n > 0),
                "cpu": sorted(self.loras)}

    async def set_adapters(self, adapters: Sequence[Any]) -> None:
        """Register new adapters with the engine (an adapter seen before keeps its LoRA int id,
        so vLLM's caches stay valid); dropped ones are only refused from now on - a running
        request keeps its LoRARequest, and vLLM's LRU evicts the weights when slots are needed."""
        from vllm.lora.request import LoRARequest

        too_big = [a.id for a in adapters if a.rank > self.spec.engine.max_lora_rank]
        if too_big:
            raise ValueError(f"adapters {too_big[:5]} exceed max_lora_rank "
                             f"{self.spec.engine.max_lora_rank}")
        loras: dict[str, Any] = {}
        for a in adapters:
            lora = self._known.get(a.id)
            if lora is None:
                # a remote source is fetched into the node's cache first (vLLM reads folders)
                path = await asyncio.to_thread(local_source, a) if is_remote(a) else a.source
                lora = LoRARequest(a.id, len(self._known) + 1, path)
                await self.engine.add_lora(lora)
                self._known[a.id] = lora
            loras[a.id] = lora
        self.loras = loras

    def queue_depth(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        return self._running, 0

    async def check_health(self) -> None:
        if self.engine is None:
            raise EngineUnavailable("the vLLM engine is not running")
        await self.engine.check_health()

    async def stop(self) -> None:
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()
            del engine
            gc.collect()

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        tok = self.tokenizer
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            bad = [i for i in ids if i >= self.vocab_size]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary (size "
                                 f"{self.vocab_size})", param="prompt")
            return ids
        if req.prompt is not None:
            return list(tok.encode(req.prompt))
        msgs = [{"role": r, "content": c} for r, c in req.messages or ()]
        try:
            out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects the roles/order given
            raise BadRequest(f"chat template rejected the messages: {exc}",
                             param="messages") from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self.engine is None:
            raise EngineUnavailable("the vLLM engine is not running")
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        lora = None
        if request.adapter is not None:
            lora = self.loras.get(request.adapter)
            if lora is None:
                raise UnknownModel(f"adapter {request.adapter!r} is not held by this replica",
                                   param="model")
        ids = self._prompt_ids(request)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        if len(ids) + request.max_tokens > self.max_model_len:
            raise context_limit_error(len(ids), request.max_tokens, self.max_model_len)
        params = self._params(
            max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=list(request.stop) or None, ignore_eos=request.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        yield Delta(prompt_tokens=len(ids))
        finished = False
        self._running += 1
        self._active[request.adapter or ""] += 1
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                  request.request_id, lora_request=lora):
                o = out.outputs[0] if out.outputs else None
                n = len(o.token_ids) if o else 0
                reason = (o.finish_reason or "stop") if (out.finished and o) else (
                    "stop" if out.finished else None)
                if n or reason:
                    yield Delta(text=o.text if o else "", n_tokens=n, finish_reason=reason)
                if out.finished:
                    finished = True
                    return
        except ValueError as exc:  # vLLM's input validation
            raise BadRequest(str(exc)) from None
        finally:
            self._running -= 1
            self._active[request.adapter or ""] -= 1
            if not finished and self.engine is not None:
                await asyncio.shield(self.engine.abort(request.request_id))
