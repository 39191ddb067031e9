"""Time vLLM 0.8.5's LoRA Triton kernels as a decode/mixed step launches them (issue #18).

The twin cannot tell a LoRA cost per token from one per token and slot (docs/twin.md,
Fidelity); this sweep measures the kernels directly on a GPU that has torch and Triton but no
vLLM. Details, device command line and the output table: docs/gpu_kernel_sweep.md.

    python benchmarks/gpu_lora_kernels.py prepare              # here: kernel files from PyPI
    python benchmarks/gpu_lora_kernels.py plan                 # the default grid + estimate
    python benchmarks/gpu_lora_kernels.py run --device cuda --out $OUT/gpu_lora_kernels
    python benchmarks/gpu_lora_kernels.py run --device cpu --out out/kernels_cpu   # interpreter
    python benchmarks/gpu_lora_kernels.py check --device cpu   # kernels vs torch, grids

``plan`` and ``prepare`` need only the standard library; ``run``/``check`` need torch and
Triton (on CPU: ``PYTHONPATH=.venv/triton-interp``, built by scripts/bootstrap_env.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import plan as P  # noqa: E402
from gpu_kernels.source import (  # noqa: E402
    DEFAULT_ROOT,
    VLLM_VERSION,
    KernelSourceError,
    default_dir,
    prepare,
)

EXIT_KERNELS_BROKEN = 3  # the kernel source does not import / compile / compute right here


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_grid_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("grid (comma-separated; default: the GPU grid, or the tiny CPU "
                              "grid with --device cpu)")
    g.add_argument("--models", type=names)
    g.add_argument("--tokens", type=ints)
    g.add_argument("--adapters", type=ints)
    g.add_argument("--max-loras", type=ints)
    g.add_argument("--ranks", type=ints)
    g.add_argument("--mixed-tokens", type=ints, help="token counts also timed as mixed steps")
    g.add_argument("--ops", type=names, help="e.g. qkv_proj,down_proj,lm_head,metadata")
    g.add_argument("--kernels", type=names, help="e.g. add_lora_linear,shrink,expand")
    g.add_argument("--split-ranks", type=ints, help="ranks at which shrink/expand run alone")
    g.add_argument("--split-ops", type=names, help="ops whose shrink/expand run alone")
    g.add_argument("--max-slot-rank", type=int, help="drop max_loras x rank above this")


def grid_from(args: argparse.Namespace, device: str) -> P.GridSpec:
    spec = P.CPU_GRID if device == "cpu" else P.GridSpec()
    over = {
        "models": args.models, "tokens": args.tokens, "adapters": args.adapters,
        "max_loras": args.max_loras, "ranks": args.ranks, "mixed_tokens": args.mixed_tokens,
        "ops": args.ops, "kernels": args.kernels, "split_ranks": args.split_ranks,
        "split_ops": args.split_ops,
        "max_slot_rank": args.max_slot_rank,
    }
    return spec.with_(**{k: v for k, v in over.items() if v is not None})


class Log:
    """Progress to stdout and to ``sweep.log``, appended line by line: a killed run keeps it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"{time.perf_counter() - self.t0:7.1f}s {msg}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        prepare(args.version, Path(args.root), force=args.force)
    except KernelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cells = P.build_plan(grid_from(args, args.device))
    est = P.estimate_seconds(cells)
    print(json.dumps({"plan": P.summarize(cells),
                      "estimate_s": {k: round(v, 1) for k, v in est.items()}}, indent=1))
    return 0


def load(args: argparse.Namespace, log: Log):  # noqa: ANN201 - torch types load lazily
    """Import torch/Triton and the kernels (TRITON_INTERPRET must be set before Triton)."""
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    from gpu_kernels.source import load_kernels

    src = Path(args.kernels_dir) if args.kernels_dir else default_dir(args.version)
    k = load_kernels(src, dispatch_key="CUDA" if args.device == "cuda" else "CPU")
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        raise KernelSourceError("--device cuda but torch sees no GPU")
    log(f"[load] vLLM {k.source['vllm_version']} kernels from {src} (wheel sha256 "
        f"{k.source['wheel_sha256'][:16]}…), torch {torch.__version__}, Triton "
        f"{triton.__version__}; shims: {', '.join(sorted(k.shims))}")
    return k


def preflight(args: argparse.Namespace, k, log: Log) -> bool:  # noqa: ANN001
    """Kernels vs the torch reference (and vLLM's grids) on tiny shapes; on GPU also real ones."""
    import torch
    from gpu_kernels import harness as H

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16
    results = H.run_checks(k, args.device, dtype, "tiny", graph_max=8, log=log)
    if args.device == "cuda":
        for cell in (
            P.Cell("llama-3.1-8b-instruct", "qkv_proj", "add_lora_linear", "decode", 250, 8, 32,
                   16),
            P.Cell("qwen-2.5-7b-instruct", "down_proj", "add_lora_linear", "mixed", 1024, 8, 8,
                   32),
            P.Cell("llama-3.1-8b-instruct", "lm_head", "add_lora_logits", "decode", 64, 8, 8, 8),
        ):
            gen = torch.Generator().manual_seed(1)
            res = H.check_cell(k, cell, args.device, dtype, gen)
            results.append(res)
            log(f"[check] {H.describe(res)}")
    bad = [r for r in results if not r.ok]
    log(f"[check] {len(results) - len(bad)}/{len(results)} ok")
    return not bad


def cmd_check(args: argparse.Namespace) -> int:
    log = Log(Path(args.out) / "check.log" if args.out else None)
    try:
        k = load(args, log)
        ok = preflight(args, k, log)
    except KernelSourceError as e:
        log(f"error: {e}")
        return EXIT_KERNELS_BROKEN
    return 0 if ok else EXIT_KERNELS_BROKEN


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    log = Log(out / "sweep.log")
    t_process = time.perf_counter()
    spec = grid_from(args, args.device)
    cells = P.build_plan(spec)
    if args.max_cells:
        cells = cells[: args.max_cells]
    try:
        k = load(args, log)
    except KernelSourceError as e:
        log(f"error: {e}")
        _fail_provenance(out, "setup_failed", str(e))
        return EXIT_KERNELS_BROKEN
    import torch
    from gpu_kernels import harness as H

    torch.manual_seed(args.seed)
    cost = H.CPU_COST if args.device == "cpu" else P.CostModel()
    settings = H.Settings(device=args.device, out_dir=out, budget_s=args.budget_s, cost=cost,
                          seed=args.seed)
    checks: list[dict[str, object]] = []
    if not args.no_check:
        try:
            ok = preflight(args, k, log)
        except Exception as e:  # noqa: BLE001 - e.g. a Triton compile error: report, stop
            log(f"[check] the kernels fail with this torch/Triton: {type(e).__name__}: {e}")
            _fail_provenance(out, "kernels_broken", f"{type(e).__name__}: {e}", k)
            return EXIT_KERNELS_BROKEN
        checks.append({"preflight_ok": ok})
        if not ok:
            log("[check] vLLM's kernels give wrong results here: not timing them")
            _fail_provenance(out, "preflight_failed", "kernel output != torch reference", k)
            return EXIT_KERNELS_BROKEN
    sweep = H.Sweep(k, settings, log)
    sweep.t_start = t_process  # the budget counts imports and the preflight too
    status = sweep.run(cells, {"grid": {k_: list(v) if isinstance(v, tuple) else v
                                        for k_, v in vars(spec).items()},
                               "checks": checks, "argv": sys.argv[1:]})
    return 0 if status in ("complete", "budget_reached") else 1  # stopped/aborted: 1


def _fail_provenance(out: Path, status: str, detail: str, k: object = None) -> None:
    """A provenance.json that says why nothing was timed (the device run still returns it)."""
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, object] = {"status": status, "detail": detail, "argv": sys.argv[1:]}
    try:
        import torch
        import triton

        info.update(torch=torch.__version__, triton=triton.__version__,
                    cuda_runtime=torch.version.cuda)
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001 - best effort, the status above is what matters
        info["versions_error"] = repr(e)
    if k is not None:
        info["vllm_kernels"] = getattr(k, "source", None)
        info["shims"] = getattr(k, "shims", None)
    (out / "provenance.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fetch vLLM's LoRA kernel files from PyPI (here)")
    p.add_argument("--version", default=VLLM_VERSION)
    p.add_argument("--root", default=str(DEFAULT_ROOT))
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_prepare)
    for name, func, helptext in (
        ("plan", cmd_plan, "print the grid and its estimated GPU time"),
        ("run", cmd_run, "preflight check, then the timed sweep"),
        ("check", cmd_check, "kernels vs torch reference and vLLM's launch grids"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--version", default=VLLM_VERSION)
        p.add_argument("--kernels-dir", help="default: .vllm_kernels/vllm-VERSION")
        p.add_argument("--out", default="" if name != "run" else "out/gpu_lora_kernels")
        p.add_argument("--budget-s", type=float, default=400.0,
                       help="start no measurement that would end later (counts from launch)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-check", action="store_true", help="skip the preflight check")
        p.add_argument("--max-cells", type=int, default=0, help="only the first N cells")
        add_grid_args(p)
        p.set_defaults(func=func)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
