"""The LoRA-kernel sweep (benchmarks/gpu_lora_kernels.py, docs/gpu_kernel_sweep.md).

Pure parts in-process (launch grids, CUDA-graph padding, token metadata, the plan, the table
checker); the real vLLM 0.8.5 Triton kernels in a subprocess under TRITON_INTERPRET=1, with the
Triton of ``.venv/triton-interp`` on PYTHONPATH so this venv's ``import vllm`` never sees it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from twin.latency import padding_table, shrink_blocks

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # for gpu_kernels; appended: shadows nothing

from gpu_kernels import plan as P  # noqa: E402
from gpu_kernels import table as T  # noqa: E402
from gpu_kernels.source import (  # noqa: E402
    PINNED_WHEELS,
    KernelSourceError,
    default_dir,
    verify,
)

TRITON_DIR = ROOT / ".venv" / "triton-interp"
KERNELS_DIR = ROOT / default_dir()
SCRIPT = ROOT / "benchmarks" / "gpu_lora_kernels.py"


# ----------------------------------------------------------------------------- pure parts
def test_capture_sizes_and_padding_match_vllm_v1_and_the_twin():
    sizes = P.capture_sizes()
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 512 and len(sizes) == 3 + 64
    assert [P.padded_tokens(t) for t in (1, 3, 5, 9, 500, 512)] == [1, 4, 8, 16, 504, 512]
    assert P.padded_tokens(513) == 513 and P.padded_tokens(2048) == 2048  # eager: no padding
    assert P.uses_cuda_graph(512) and not P.uses_cuda_graph(513)
    table = padding_table(512)  # the twin's step model pads the same way
    assert all(P.padded_tokens(t) == table[t] for t in range(1, 513))


def test_model_shapes():
    llama, qwen = P.MODELS["llama-3.1-8b-instruct"], P.MODELS["qwen-2.5-7b-instruct"]
    assert llama.op("qkv_proj").out_slices == (4096, 1024, 1024)
    assert llama.op("gate_up_proj").out_slices == (14336, 14336)
    assert llama.op("down_proj").in_features == 14336 and llama.op("o_proj").in_features == 4096
    assert qwen.op("qkv_proj").out_slices == (3584, 512, 512)
    assert qwen.op("down_proj").in_features == 18944 and qwen.op("qkv_proj").calls_per_step == 28
    # Llama's vLLM class lists embed_tokens/lm_head as LoRA modules, Qwen2's does not
    assert {o.name for o in llama.ops()} >= {"embed_tokens", "lm_head"}
    assert not {o.name for o in qwen.ops()} & {"embed_tokens", "lm_head"}
    assert llama.logits_width == 128256 + 256  # vocab + extra vocab, a multiple of 256
    assert not llama.op("lm_head").in_graph and llama.op("embed_tokens").in_graph


def test_token_slots_and_kernel_metadata():
    # decode: round-robin over adapters, adapters spread over the slots
    assert P.token_slots(6, 3, 8) == [0, 2, 5, 0, 2, 5]
    # mixed: 3 decodes, then a 3-token chunk of the first adapter; requests = decodes + 1
    assert P.token_slots(6, 2, 4, "mixed") == [0, 2, 0, 0, 0, 0]
    assert P.request_slots(6, 2, 4, "mixed") == [0, 2, 0, 0]
    with pytest.raises(ValueError):
        P.token_slots(4, 5, 8)  # more adapters than requests
    with pytest.raises(ValueError):
        P.token_slots(8, 9, 8)  # more adapters than slots
    meta = P.kernel_metadata([2, 0, 2, 1, 0], max_loras=3)
    assert meta.token_indices_sorted == [1, 4, 3, 0, 2]  # stable sort by slot
    assert meta.lora_ids == [0, 1, 2, -1]  # max_loras + 1 entries
    assert meta.num_tokens_per_lora == [2, 1, 2, 0]
    assert meta.lora_token_start_loc == [0, 2, 3, 5, 0]  # max_loras + 2 entries
    assert meta.active == [(0, 2), (1, 1), (2, 2)]


def test_launch_grids_follow_vllm_085():
    # shrink: SPLIT_K 64 below 128 rows, 8 from 128; rank tiles of 16; max_loras + 1 slots
    s = P.shrink_launch(100, 16, 3, 8, counts=[50, 50])
    assert s.grid == (64 * 4 * 1, 3, 9) and s.config["BLOCK_K"] == 256
    assert s.active_blocks == (2 + 2) * 64 * 1 * 3
    s = P.shrink_launch(128, 32, 1, 8)
    assert s.grid == (8 * 4 * 2, 1, 9) and s.config["SPLIT_K"] == 8
    # expand: row blocks of 64 x column blocks of 128 of the widest slice; narrower slices'
    # extra column blocks exit early, so they are not active
    e = P.expand_launch(100, 16, (4096, 1024, 1024), 8, counts=[100])
    assert e.grid == (2 * 32, 3, 9)
    assert e.active_blocks == 2 * (32 + 8 + 8)
    # the twin's step model counts the same shrink blocks per slice
    for m, r, g in ((1, 8, 8), (100, 16, 32), (256, 32, 128), (2048, 64, 384)):
        assert P.shrink_launch(m, r, 1, g).blocks == shrink_blocks(m, r, g)


def test_cell_rows_graph_and_logits():
    llama = "llama-3.1-8b-instruct"
    c = P.Cell(llama, "qkv_proj", "add_lora_linear", "decode", 500, 8, 32, 16)
    assert c.cuda_graph and c.rows == 504
    c = P.Cell(llama, "qkv_proj", "add_lora_linear", "decode", 600, 8, 32, 16)
    assert not c.cuda_graph and c.rows == 600
    c = P.Cell(llama, "lm_head", "add_lora_logits", "mixed", 1024, 8, 32, 16)
    assert not c.cuda_graph and c.rows == 513  # 512 decodes + the chunk's request
    c = P.Cell(llama, "lm_head", "add_lora_logits", "decode", 100, 8, 32, 16)
    assert not c.cuda_graph and c.rows == 100  # logits run outside the graph: no padding
    c = P.Cell(llama, "embed_tokens", "add_lora_embedding", "decode", 100, 8, 32, 16)
    assert c.cuda_graph and c.rows == 104


def test_default_plan_covers_the_question_and_fits_the_device_budget():
    cells = P.build_plan(P.GridSpec())
    keys = {(c.model, c.op, c.kernel, c.mix, c.tokens, c.adapters, c.max_loras, c.rank)
            for c in cells}
    assert len(keys) == len(cells)  # no duplicate rows
    for c in cells:
        assert 1 <= c.adapters <= c.max_loras and c.adapters <= c.tokens
        assert c.rank == 0 or c.max_loras * c.rank <= 6144
    # the issue's sweep: decode batches 256-1,024 at 8, 32 and 128 slots, both models ...
    for model in ("llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"):
        for g in (8, 32, 128):
            for t in (256, 512, 768, 1024):
                for op in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                    assert (model, op, "add_lora_linear", "decode", t, 8, g, 16) in keys
    # ... measured first (a budget stop keeps them), and graph / eager both present
    tiers = [c.tier for c in cells]
    assert tiers == sorted(tiers) and tiers[0] == 0
    first = [c for c in cells if c.tier == 0]
    assert all(256 <= c.tokens <= 1024 and c.max_loras <= 128 for c in first)
    assert any(c.cuda_graph for c in first) and any(not c.cuda_graph for c in first)
    assert {c.rank for c in cells} == {0, 8, 16, 32, 64}
    assert {c.max_loras for c in cells} == {8, 32, 128, 384}
    assert {c.tokens for c in cells} >= {1, 256, 512, 768, 1024, 2048}
    # its own estimate fits the 8-minute device run with margin; the budget guard backs it up
    assert P.estimate_seconds(cells)["total_s"] < 0.75 * 480


def test_budget_guard():
    b = P.Budget(limit_s=10.0, started_s=100.0)
    assert b.allows(105.0, 4.9) and not b.allows(105.0, 5.1)


def _row(**over: object) -> dict[str, str]:
    row = {
        "model": "llama-3.1-8b-instruct", "layer": "qkv_proj", "kernel": "add_lora_linear",
        "mix": "decode", "tokens": "500", "rows": "504", "requests": "500", "adapters": "8",
        "max_loras": "32", "max_lora_rank": "16", "cuda_graph": "1", "calls_per_step": "32",
        "timing": "graph_replay", "calls_per_repeat": "16", "repeats": "10",
        "median_us": "20.5", "p10_us": "20.1", "p90_us": "21.0", "min_us": "19.9",
        "host_issue_us": "", "launches": "2", "grid_blocks": "100", "active_blocks": "50",
        "weight_mib": "1.5", "dtype": "bfloat16", "status": "ok",
    }
    row.update({k: str(v) for k, v in over.items()})
    return {c: row[c] for c in T.COLUMN_NAMES}


def test_table_checker_accepts_good_rows_and_names_bad_ones():
    good = [_row(), _row(tokens=600, rows=600, cuda_graph=0, timing="eager", host_issue_us=9)]
    assert T.validate_rows(good) == []
    bad = {
        "p10": _row(p10_us=25),  # p10 above the median
        "graph": _row(rows=500),  # 500 is not a capture size
        "host": _row(host_issue_us=3),  # host issue time on a graph row
        "slots": _row(adapters=64),  # more adapters than slots
        "kernel": _row(kernel="bgmv"),
        "status": _row(status="broken"),
        "blocks": _row(active_blocks=101),
    }
    for name, row in bad.items():
        problems = T.validate_rows([row])
        assert len(problems) == 1 and problems[0].startswith("line 2"), name
    assert any("duplicate" in p for p in T.validate_rows([_row(), _row()]))
    err = _row(status="error: RuntimeError: x", median_us="", p10_us="", p90_us="", min_us="")
    assert T.validate_rows([err]) == []


def test_kernel_source_is_verified(tmp_path):
    src = _kernels_dir()
    copy = tmp_path / "k"
    shutil.copytree(src, copy)
    info = verify(copy)
    assert (info["wheel"], info["wheel_sha256"]) == PINNED_WHEELS["0.8.5"]
    victim = copy / "vllm/lora/ops/triton_ops/lora_shrink.py"
    victim.write_text(victim.read_text().replace("SPLIT_K = 64", "SPLIT_K = 32"))
    with pytest.raises(KernelSourceError, match="modified"):
        verify(copy)


# ----------------------------------------------------------------------------- real kernels
def _kernels_dir() -> Path:
    """The extracted kernel files; fetched once with the documented `prepare` if missing."""
    if not (KERNELS_DIR / "SOURCE.json").exists():
        proc = subprocess.run([sys.executable, str(SCRIPT), "prepare"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            "vLLM 0.8.5's kernel files are missing and `python benchmarks/gpu_lora_kernels.py "
            f"prepare` (PyPI) failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return KERNELS_DIR


def _interp_env() -> dict[str, str]:
    if not (TRITON_DIR / "triton" / "__init__.py").exists():
        pytest.fail(
            f"{TRITON_DIR} is missing: the Triton used to run vLLM's kernels under the CPU "
            "interpreter. Build it with `bash scripts/bootstrap_env.sh` (or `make env`)."
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TRITON_DIR), str(ROOT / "benchmarks")])
    env["TRITON_INTERPRET"] = "1"
    return env


def _run(args: list[str], timeout: float = 300,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    _kernels_dir()
    return subprocess.run([sys.executable, *args], cwd=ROOT,
                          env={**_interp_env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


INDEPENDENT_CHECK = r"""
import json, os, torch
from gpu_kernels.source import load_kernels
k = load_kernels(os.environ["KDIR"], dispatch_key="CPU")
torch.manual_seed(0)
M, H, R, G = 130, 64, 16, 4                       # 130 rows: the SPLIT_K 8 configuration
slots = [[0, 2, 3][i % 3] for i in range(M)]      # three adapters in slots 0, 2, 3
outs = (48, 16)                                   # two slices of different widths
x = torch.randn(M, H).half()
A = [torch.randn(G, 1, R, H).mul(0.3).half() for _ in outs]
B = [torch.randn(G, 1, n, R).mul(0.3).half() for n in outs]
y0 = torch.randn(M, sum(outs)).half()
meta = k.meta_cls.make(G, 256, device="cpu")
meta.prepare_tensors(torch.tensor(slots, dtype=torch.long))
y = y0.clone()
buf = torch.zeros(len(outs), M, R, dtype=torch.float32)
k.shrink(x, tuple(A), buf, *meta.meta_args(M), 0.5)
k.expand(buf, tuple(B), y, *meta.meta_args(M), offset_start=0, add_inputs=True)
s = torch.tensor(slots)
ref = torch.cat([torch.einsum("mr,mnr->mn",
                              0.5 * torch.einsum("mh,mrh->mr", x.float(), a.float()[s, 0]),
                              b.float()[s, 0]) for a, b in zip(A, B)], dim=1) + y0.float()
print(json.dumps({"err": float((y.float() - ref).abs().max()),
                  "delta": float((ref - y0.float()).abs().max()),
                  "scale": float(ref.abs().max()), "shims": sorted(k.shims)}))
"""


def test_vllm_kernels_match_an_independent_einsum_reference():
    """Two slices of different widths, three adapters in non-adjacent slots, a scale: the
    shrink/expand pair from the wheel, loaded through the shims, computes the LoRA update."""
    proc = _run(["-c", INDEPENDENT_CHECK], timeout=120, extra_env={"KDIR": str(_kernels_dir())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["delta"] > 1.0  # the LoRA changes the output a lot ...
    assert res["err"] <= 0.01 * res["scale"]  # ... and the kernels get it right (fp16)
    assert "vllm.utils.direct_register_custom_op" in res["shims"]


def test_cpu_sweep_checks_kernels_and_writes_a_well_formed_table(tmp_path):
    out = tmp_path / "sweep"
    proc = _run([str(SCRIPT), "run", "--device", "cpu", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "sweep.log").read_text()

    # preflight: every code path against the torch reference, with vLLM's launch grids
    checks = re.findall(r"\[check\] (ok  |FAIL) .*?max\|err\| (\S+) \(tol (\S+), LoRA adds "
                        r"up to (\S+)\), padded rows (\w+), grids", log)
    assert len(checks) >= 8 and all(c[0] == "ok  " for c in checks), log
    for _, err, tol, delta, padded in checks:
        assert float(err) <= float(tol) < float(delta) / 10 and padded == "untouched"
    assert "padded rows untouched, grids [(64, 3, 4), (1, 3, 4)]" in log  # qkv: 5 -> 8 rows

    # the table: well formed, one row per planned cell, the semantics of its columns
    csv_path = out / "lora_kernel_times.csv"
    assert T.validate_file(csv_path) == []
    rows = T.read_table(csv_path)
    plan = P.build_plan(P.CPU_GRID)
    assert len(rows) == len(plan) and all(r["status"] == "ok" for r in rows)
    units = {(r["layer"], r["kernel"]) for r in rows}
    assert units == {(c.op, c.kernel) for c in plan}
    assert {(o.name, o.kernels[0]) for o in P.MODELS["tiny"].ops()} <= units  # every op
    assert {("o_proj", "shrink"), ("o_proj", "expand"), ("lm_head", "extra_vocab")} <= units
    by = {(r["layer"], r["kernel"], r["mix"], int(r["tokens"])): r for r in rows}
    qkv = by[("qkv_proj", "add_lora_linear", "decode", 121)]
    assert (qkv["cuda_graph"], qkv["rows"], qkv["launches"]) == ("1", "128", "2")
    # vLLM's grids at 128 rows, rank 16, 3 slices, 3 slots (+1): shrink 8 x 4 x 1 blocks per
    # slice and slot, expand 2 row blocks x 1 column block of 128
    assert int(qkv["grid_blocks"]) == 8 * 4 * 1 * 3 * 4 + 2 * 1 * 3 * 4
    eager = by[("qkv_proj", "add_lora_linear", "decode", 160)]
    assert (eager["cuda_graph"], eager["rows"]) == ("0", "160")
    logits = by[("lm_head", "add_lora_logits", "mixed", 160)]
    assert (logits["rows"], logits["requests"], logits["cuda_graph"]) == ("81", "81", "0")
    assert by[("metadata", "update_metadata", "decode", 121)]["timing"] == "host"
    assert all(r["timing"] == "cpu_interpreter" for r in rows if r["layer"] != "metadata")
    assert all(float(r["median_us"]) > 0 for r in rows)

    # provenance: versions, the wheel, what was shimmed; the README documents every column
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "complete" and prov["rows_written"] == len(plan)
    assert prov["triton"] == "3.2.0" and prov["torch"].startswith("2.")
    assert prov["vllm_kernels"]["wheel_sha256"] == PINNED_WHEELS["0.8.5"][1]
    assert "vllm.utils.direct_register_custom_op" in prov["shims"]
    assert "vllm.utils.direct_register_custom_op" in prov["vllm_imports"]
    assert prov["plan"]["cells"] == len(plan)
    readme = (out / "README.md").read_text()
    assert all(f"`{c}`" in readme for c in T.COLUMN_NAMES)


def test_budget_stops_cleanly_with_a_valid_table(tmp_path):
    out = tmp_path / "cut"
    proc = _run([str(SCRIPT), "run", "--device", "cpu", "--no-check", "--budget-s", "0.5",
                 "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "budget_reached" and prov["rows_written"] == 0
    assert T.validate_file(out / "lora_kernel_times.csv") == []  # header only, still valid
    assert "[budget] stopping before cell 1/" in (out / "sweep.log").read_text()
