"""The requests one twin run serves: arrival-sorted arrays, what the engine consumes.

Its own module because both the workload generator (twin/workload.py) and the Azure trace
loader (twin/azure_trace.py) produce it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twin.lengths import WorkloadError


@dataclass(frozen=True, eq=False)
class RequestBatch:
    """Arrival-sorted requests; the twin engine consumes this."""

    arrival_s: np.ndarray  # float64, non-decreasing
    adapter: np.ndarray  # int32 index into workload.adapters, -1 = base model
    prompt_len: np.ndarray  # int32 >= 1
    output_len: np.ndarray  # int32 >= 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "arrival_s", np.asarray(self.arrival_s, dtype=np.float64))
        for name in ("adapter", "prompt_len", "output_len"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int32))
        n = self.arrival_s.shape[0]
        for name in ("adapter", "prompt_len", "output_len"):
            if getattr(self, name).shape != (n,):
                raise WorkloadError(
                    f"{name}: shape {getattr(self, name).shape} does not match arrival_s ({n},)"
                )

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])
