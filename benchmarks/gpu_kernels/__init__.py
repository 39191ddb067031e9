"""Timing vLLM 0.8.5's LoRA Triton kernels as a decode/mixed step launches them.

The reference step data cannot separate a LoRA cost per token from a cost per token and slot
(docs/twin.md, Fidelity); this package times the kernels themselves, on any GPU that has torch and
Triton, from the pinned vLLM wheel's own kernel source (docs/gpu_kernel_sweep.md).

* ``plan``    pure: model shapes, launch grids, CUDA-graph padding, token->adapter metadata, the
              sweep grid and its time estimate (stdlib only: tested without torch or Triton).
* ``table``   pure: the output table's columns (documented, units in suffixes) and its checker.
* ``source``  fetches the kernel files from the wheel (``prepare``) and imports them behind
              minimal shims for the vLLM internals they import.
* ``harness`` torch/Triton: buffers, the launches as vLLM makes them, torch reference check,
              CUDA-graph / eager timing, the budgeted sweep and its provenance.
"""
