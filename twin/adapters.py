"""The order vLLM's worker walks a step's adapter set in: Python's set iteration (hash) order.

The walk itself (CPU cache, GPU slots, LRU evictions, reload cascades) is
``twin.engine.lora_set``; the naive reference engine (tests/reference_engine.py) walks in the
same order.
"""

from __future__ import annotations


def hash_rank(adapter: int) -> int:
    """A fixed pseudo-random order of adapters, standing in for Python's set iteration order."""
    return ((adapter + 1) * 2654435761) & 0xFFFFFFFF
