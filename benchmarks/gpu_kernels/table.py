"""The sweep's output table: columns (documented, units in suffixes) and a checker.

One row per (model, layer, kernel, mix, tokens, adapters, max_loras, max_lora_rank): the table
style of ``data/reference/vllm-0.8.5-h100`` (tidy CSV, ``_us`` microseconds, ``_mib`` MiB,
empty = not applicable) so it can sit next to the reference data and feed the calibration.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from gpu_kernels.plan import KERNEL_TIERS, MODELS, capture_sizes

COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "model whose shapes were used (`llama-3.1-8b-instruct`, `qwen-2.5-7b-instruct`, "
              "`tiny` = the CPU check's toy shapes)"),
    ("layer", "LoRA-wrapped module: `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj` (each "
              "decoder layer), `embed_tokens`, `lm_head` (Llama only), `metadata` (per step)"),
    ("kernel", "what was timed: `add_lora_linear` (fp32 zeros + shrink + expand, as "
               "PunicaWrapperGPU runs each linear), `shrink`, `expand` (one Triton kernel "
               "alone), `add_lora_embedding` (expand), `add_lora_logits` (shrink + expand on "
               "the sampled rows), `extra_vocab` (the logits processor's extra-vocabulary "
               "matmul/index_select), `update_metadata` (host: convert_mapping + two "
               "LoRAKernelMeta.prepare_tensors, with the sync it implies)"),
    ("mix", "`decode` (one token per request, adapters round-robin) or `mixed` (half the "
            "tokens one prefill chunk of the first adapter, the rest decodes)"),
    ("tokens", "tokens scheduled in the step"),
    ("rows", "M the kernels were launched with: `tokens` padded to the next CUDA-graph "
             "capture size when `cuda_graph` = 1, the requests for `lm_head`"),
    ("requests", "requests in the step (decodes + 1 for a mixed step's chunk)"),
    ("adapters", "distinct adapters in the step"),
    ("max_loras", "GPU adapter slots: the metadata and the grid's third axis (max_loras + 1)"),
    ("max_lora_rank", "slot rank the weights are stacked at (0 for `metadata`)"),
    ("cuda_graph", "1 = launched inside a CUDA graph and timed by replaying it (V1 captures "
                   "steps of <= 512 tokens; `lm_head` and `metadata` run outside it), 0 = eager"),
    ("calls_per_step", "times this unit runs in one engine step (the decoder layers for "
                       "per-layer modules, else 1)"),
    ("timing", "`graph_replay` (CUDA events around graph replays), `eager` (CUDA events around "
               "back-to-back launches, host launch gaps included), `host` (wall clock with a "
               "sync, host-side work), `cpu_interpreter` (wall clock under TRITON_INTERPRET=1: "
               "checks the harness, not a timing)"),
    ("calls_per_repeat", "calls per timed repeat, each on its own copy of the weights (so "
                         "weights come from HBM, not L2, like distinct layers do)"),
    ("repeats", "timed repeats; the statistics below are per call (repeat time / calls)"),
    ("median_us", "median time of one call (us)"),
    ("p10_us", "10th percentile over repeats (us)"),
    ("p90_us", "90th percentile over repeats (us)"),
    ("min_us", "fastest repeat (us)"),
    ("host_issue_us", "eager only: host time to issue one call (us). Close to `median_us` = "
                      "launch-bound: the GPU waited for Python"),
    ("launches", "Triton launches per call"),
    ("grid_blocks", "thread blocks launched per call (all launches), from vLLM's grid formula"),
    ("active_blocks", "thread blocks that do work (the rest exit at once: slots without "
                      "tokens, row blocks past a slot's tokens, columns past a slice)"),
    ("weight_mib", "LoRA weights one call reads (MiB): active adapters' A and/or B at the slot "
                   "rank; all slots' extra-vocabulary embeddings for `extra_vocab`"),
    ("dtype", "activation/weight dtype (`bfloat16` on GPU as served; `float16` on CPU)"),
    ("status", "`ok`, or `error: ...` (the row's timings are then empty)"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c for c, _ in COLUMNS)
KEY_COLUMNS = ("model", "layer", "kernel", "mix", "tokens", "adapters", "max_loras",
               "max_lora_rank")
INT_COLUMNS = ("tokens", "rows", "requests", "adapters", "max_loras", "max_lora_rank",
               "cuda_graph", "calls_per_step", "calls_per_repeat", "repeats", "launches",
               "grid_blocks", "active_blocks")
FLOAT_COLUMNS = ("median_us", "p10_us", "p90_us", "min_us", "host_issue_us", "weight_mib")
KERNELS = (*KERNEL_TIERS, "shrink", "expand")
TIMINGS = ("graph_replay", "eager", "host", "cpu_interpreter")


def validate_rows(rows: Sequence[dict[str, str]]) -> list[str]:
    """Problems with a table's rows (empty list = well formed); each names the row."""
    problems: list[str] = []
    seen: set[tuple[str, ...]] = set()
    graph_sizes = set(capture_sizes())
    for i, row in enumerate(rows, start=2):  # line numbers as in the file (header = 1)
        where = f"line {i}"
        if tuple(row) != COLUMN_NAMES:
            problems.append(f"{where}: columns {list(row)} != {list(COLUMN_NAMES)}")
            continue
        key = tuple(row[k] for k in KEY_COLUMNS)
        if key in seen:
            problems.append(f"{where}: duplicate key {dict(zip(KEY_COLUMNS, key, strict=True))}")
        seen.add(key)
        if row["model"] not in MODELS:
            problems.append(f"{where}: unknown model {row['model']!r}")
        if row["kernel"] not in KERNELS:
            problems.append(f"{where}: unknown kernel {row['kernel']!r}")
        if row["timing"] not in TIMINGS:
            problems.append(f"{where}: unknown timing {row['timing']!r}")
        try:
            ints = {c: int(row[c]) for c in INT_COLUMNS}
        except ValueError as e:
            problems.append(f"{where}: integer column: {e}")
            continue
        if ints["cuda_graph"] not in (0, 1):
            problems.append(f"{where}: cuda_graph must be 0/1")
        if ints["cuda_graph"] and row["model"] != "tiny" and ints["rows"] not in graph_sizes:
            problems.append(f"{where}: graph rows {ints['rows']} is not a capture size")
        if ints["cuda_graph"] and ints["rows"] < ints["tokens"]:
            problems.append(f"{where}: rows {ints['rows']} < tokens {ints['tokens']}")
        if ints["adapters"] > ints["max_loras"] or ints["adapters"] < 1:
            problems.append(f"{where}: adapters {ints['adapters']} not in 1..max_loras")
        if ints["active_blocks"] > ints["grid_blocks"]:
            problems.append(f"{where}: active_blocks > grid_blocks")
        status = row["status"]
        if status != "ok":
            if not status.startswith("error: "):
                problems.append(f"{where}: status {status!r} is neither ok nor error: ...")
            continue
        try:
            f = {c: float(row[c]) for c in FLOAT_COLUMNS if row[c] != ""}
        except ValueError as e:
            problems.append(f"{where}: number column: {e}")
            continue
        missing = [c for c in ("median_us", "p10_us", "p90_us", "min_us") if c not in f]
        if missing:
            problems.append(f"{where}: ok row without {missing}")
            continue
        if not 0 < f["min_us"] <= f["p10_us"] <= f["median_us"] <= f["p90_us"]:
            problems.append(f"{where}: need 0 < min <= p10 <= median <= p90, got "
                            f"{f['min_us']}, {f['p10_us']}, {f['median_us']}, {f['p90_us']}")
        if ints["repeats"] < 1 or ints["calls_per_repeat"] < 1:
            problems.append(f"{where}: repeats and calls_per_repeat must be >= 1")
        if (row["timing"] == "eager") != ("host_issue_us" in f):
            problems.append(f"{where}: host_issue_us is for eager rows only")
    return problems


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def validate_file(path: Path) -> list[str]:
    """``validate_rows`` on a CSV file, plus its header."""
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != COLUMN_NAMES:
        return [f"{path}: header {header} != {list(COLUMN_NAMES)}"]
    return validate_rows(read_table(path))


def columns_markdown() -> str:
    """The column reference, for the output folder's README."""
    return "\n".join(f"- `{name}`: {doc}." for name, doc in COLUMNS)
