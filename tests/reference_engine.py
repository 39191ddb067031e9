"""A deliberately naive emulator of the same vLLM V1 rules, O(batch) per step.

It walks the running and waiting lists exactly as vLLM's ``Scheduler.schedule()`` does, with no
aggregate bookkeeping, so it is easy to check against the vLLM source by eye. The fast engine
(twin/engine/) must produce identical per-request timings and load counts on any input where
no request comes within ``kv_preallocate_blocks`` blocks of max_model_len (the fast engine does
not cap preallocation there). The worker's adapter caches are OrderedDicts touched in hash order
every step, as vLLM's ``LRUCacheWorkerLoRAManager`` does.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from twin.adapters import hash_rank
from twin.config import EngineConfig
from twin.profile import Profile


def naive_run(
    arrival_s: np.ndarray,
    adapter: np.ndarray,
    prompt_len: np.ndarray,
    output_len: np.ndarray,
    config: EngineConfig,
    profile: Profile,
    duration_s: float,
    adapter_ranks: list[int] | None = None,
) -> dict[str, np.ndarray]:
    bs = config.block_size
    pre = profile.scheduler.kv_preallocate_blocks
    max_len = profile.effective_max_model_len(config)
    total_blocks = profile.kv_tokens(config) // bs - 1  # the null block
    full_check = profile.scheduler.admit_only_if_prompt_fits
    cap = -(-max_len // bs)
    lora = config.enable_lora

    n = len(arrival_s)
    gen = [0] * n
    ncomp = [0] * n
    held = [0] * n
    first = [math.nan] * n
    fin = [math.nan] * n
    npre = [0] * n
    decoding = [False] * n
    # worker caches: OrderedDicts touched every step exactly like LRUCacheWorkerLoRAManager
    n_adapters = (
        len(adapter_ranks) if adapter_ranks is not None else int(max(adapter, default=-1)) + 1
    )
    ranks = adapter_ranks or [8] * n_adapters
    loads = profile.adapter_loads
    cpu: OrderedDict[int, None] = OrderedDict(
        (a, None) for a in sorted(range(min(config.cpu_slots, n_adapters)), key=hash_rank)
    )
    gpu: OrderedDict[int, None] = OrderedDict()
    gpu_loads = disk_loads = 0
    waiting: list[int] = []
    running: list[int] = []
    free = total_blocks
    t = 0.0
    ai = 0
    steps = 0
    while True:
        while ai < n and arrival_s[ai] <= t:
            if prompt_len[ai] + output_len[ai] <= max_len:
                waiting.append(ai)
            ai += 1
        if not running and not waiting:
            if ai >= n or arrival_s[ai] >= duration_s:
                break
            t = float(arrival_s[ai])
            continue
        if t >= duration_s:
            break
        budget = config.max_num_batched_tokens
        scheduled: list[tuple[int, int]] = []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            num_new = min(prompt_len[r] + gen[r] - ncomp[r], budget)
            need = -(-(ncomp[r] + num_new) // bs) - held[r]
            self_preempted = False
            while need > 0 and free < need:
                victim = running.pop()
                free += held[victim]
                held[victim] = 0
                ncomp[victim] = 0
                decoding[victim] = False
                npre[victim] += 1
                waiting.insert(0, victim)
                preempted = True
                if victim == r:
                    self_preempted = True
                    break
            if self_preempted:
                break
            if need > 0:
                got = min(need + pre, free, cap - held[r])
                held[r] += got
                free -= got
            scheduled.append((r, num_new))
            budget -= num_new
            i += 1
        if not preempted:
            loras = {int(adapter[r]) for r, _ in scheduled if adapter[r] >= 0}
            idx = 0
            while idx < len(waiting) and budget > 0:
                if len(running) >= config.max_num_seqs:
                    break
                r = waiting[idx]
                a = int(adapter[r])
                if lora and a >= 0 and len(loras) >= config.max_loras and a not in loras:
                    idx += 1
                    continue
                num_new = min(prompt_len[r] + gen[r], budget)
                need = -(-num_new // bs)
                whole = -(-(prompt_len[r] + gen[r]) // bs)
                if free < (whole if full_check else need):
                    break
                got = min(need + pre, free, cap)
                held[r] = got
                free -= got
                ncomp[r] = 0
                waiting.pop(idx)
                running.append(r)
                scheduled.append((r, num_new))
                budget -= num_new
                if a >= 0:
                    loras.add(a)
        load_ms = 0.0
        if lora:
            for a in sorted({int(adapter[r]) for r in running if adapter[r] >= 0}, key=hash_rank):
                if a in cpu:
                    cpu.move_to_end(a)
                else:
                    if len(cpu) >= config.cpu_slots:
                        victim, _ = cpu.popitem(last=False)
                        gpu.pop(victim, None)
                    cpu[a] = None
                    load_ms += loads.disk_load_ms(ranks[a])
                    disk_loads += 1
                if a in gpu:
                    gpu.move_to_end(a)
                else:
                    if len(gpu) >= config.max_loras:
                        gpu.popitem(last=False)
                    gpu[a] = None
                    load_ms += loads.gpu_load_ms(config.max_lora_rank, ranks[a])
                    gpu_loads += 1
        p_tok = 0
        d = 0
        k_ctx = 0
        for r, num in scheduled:
            k_ctx += ncomp[r] + num
            if decoding[r]:
                d += 1
            else:
                p_tok += num
        n_adapters = len({int(adapter[r]) for r in running if adapter[r] >= 0}) if lora else 0
        dt = load_ms + float(
            profile.step_model.predict_ms(
                prefill_tokens=p_tok, decode_seqs=d, ctx_tokens=k_ctx, lora_adapters=n_adapters,
                lora_enabled=lora, max_lora_rank=config.max_lora_rank,
                max_loras=config.max_loras,
            )[0]
        )
        t += dt / 1e3
        steps += 1
        for r, num in scheduled:
            ncomp[r] += num
            if ncomp[r] < prompt_len[r] + gen[r]:
                continue
            gen[r] += 1
            decoding[r] = True
            if math.isnan(first[r]):
                first[r] = t
            if gen[r] >= output_len[r]:
                fin[r] = t
                running.remove(r)
                free += held[r]
                held[r] = 0
    return {
        "first_token_s": np.asarray(first),
        "finish_s": np.asarray(fin),
        "preemptions": np.asarray(npre),
        "steps": np.asarray(steps),
        "gpu_loads": np.asarray(gpu_loads),
        "disk_loads": np.asarray(disk_loads),
    }
