"""The step time, compiled: ``twin.latency.StepCost.ms`` over ``StepCost.coefficients()``.

The compiled twin of the one formula in ``twin/latency.py`` (its own module so that importing
``twin.latency`` — every profile does — loads no compiler: vLLM 0.32's CPU kernel-override scan
breaks in a process that has imported numba). ``tests/test_latency.py`` checks both give the same
time on random batches of every regime.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def step_ms(coef: np.ndarray, pad: np.ndarray, prefill_tokens: int, decode_seqs: int,
            ctx_tokens: int, lora_adapters: int, load_ms: float, scanned_left: int) -> float:
    """One step's duration in ms (``StepCost.ms``; coefficients in ``coefficients()`` order)."""
    total = prefill_tokens + decode_seqs
    ms = (coef[0] + coef[1] * prefill_tokens + coef[2] * ctx_tokens
          + coef[3] * lora_adapters + coef[4] * total + load_ms + coef[9] * scanned_left)
    if total <= coef[10]:
        rows = pad[total]
        ms += coef[5] * (rows - prefill_tokens)
    else:
        rows = total
        ms += coef[6] * decode_seqs + coef[7]
    if coef[8]:
        ms += coef[8] * (64 if rows < 128 else 8) * ((rows + 31) // 32)
    return ms
