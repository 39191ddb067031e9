"""`lorafleet whatif | register`: ask the running controller (docs/controller.md).

``whatif`` answers from the controller's live workload estimate: the plan it would make if the
rates were scaled, adapters added or removed, and that plan's twin-verified figures; nothing is
applied. ``register`` adds adapters to the registry; the next check sees them as "new adapters
registered" and re-plans to place them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from orchestrator.cli import output


def add_parser(subparsers: Any) -> None:
    w = subparsers.add_parser(
        "whatif", help="the plan the controller would make for a changed live workload",
        description="From the controller's live workload estimate: scale every rate, add or "
        "remove adapters, plan and verify with the twin; print the plan, apply nothing.")
    w.add_argument("--rate-scale", type=float, default=1.0, help="multiply every adapter's rate")
    w.add_argument("--add-adapters", default=None, metavar="FILE",
                   help="YAML `adapters: [{id, rank, rate_rps}]` to add")
    w.add_argument("--remove", nargs="+", default=(), metavar="ID", help="adapter ids to drop")
    w.add_argument("--out", default=None, help="write the plan YAML here")
    w.add_argument("--state-dir", default=None)
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_whatif)

    r = subparsers.add_parser(
        "register", help="register new adapters; the controller re-plans to place them",
        description="FILE is an adapter registry YAML (`adapters: [{id, rank, path | uri}]`, "
        "paths relative to the file).")
    r.add_argument("file")
    r.add_argument("--state-dir", default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_register)


def read_added(path: str | Path) -> list[Any]:
    """The ``--add-adapters`` file; errors name the entry and field."""
    from twin.workload import AdapterSpec

    doc = yaml.safe_load(Path(path).read_text()) or {}
    items = doc.get("adapters") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a mapping with a non-empty `adapters` list")
    return [AdapterSpec.from_dict(d, f"{path}: adapters[{i}]") for i, d in enumerate(items)]


def _controller(state_dir: str | None) -> Any:
    from orchestrator.control.deploy import DeployError, DeployState, live_controller, state_path

    state = DeployState.read(state_path(state_dir))
    if not state.controller:
        raise DeployError("this deployment has no controller (deployed by an older lorafleet)")
    return live_controller(state)


def _ask(call: Any, timeout_s: float) -> Any:
    """``ray.get`` with the controller's refusals as plain CLI errors."""
    import ray

    from orchestrator.control.controller import ControllerError

    try:
        return ray.get(call, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError | RuntimeError):
            raise ControllerError(str(exc.cause)) from None
        raise


def cmd_whatif(args: argparse.Namespace) -> int:
    added = read_added(args.add_adapters) if args.add_adapters else []
    actor = _controller(args.state_dir)
    out = _ask(actor.whatif.remote(rate_scale=args.rate_scale, add=added,
                                   remove=list(args.remove)), 600)
    if args.out and out["plan"]:
        Path(args.out).write_text(yaml.safe_dump(out["plan"], sort_keys=False))
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "plan" or args.out is None},
                         default=str))
        return 0
    console = output.console
    w = out["workload"]
    console.print(f"what if: {w['adapters']} adapters at {w['total_rate_rps']:.2f} req/s -> "
                  f"{out['replicas']} replica(s) (now {out['current_replicas']}); "
                  f"{out['reason']}")
    plan = out["plan"] or {}
    t = Table(title="the plan's replica groups, twin-verified (per replica)", header_style="bold")
    for c in ("group", "copies", "adapters", "max_loras", "req/s", "tok/s", "TTFT p99 ms",
              "starved"):
        t.add_column(c, justify="left" if c == "group" else "right")
    for g in plan.get("groups", []):
        m = g.get("verified") or g.get("predicted") or {}
        rate = sum(a["rate_rps"] for a in g["adapters"])
        t.add_row(g["name"], str(g["copies"]), str(len(g["adapters"])),
                  str(g["engine"]["max_loras"]), f"{rate:.2f}",
                  _f(m.get("total_throughput_tps")), _f(m.get("ttft_p99_ms")),
                  str(m.get("starved", "-")))
    console.print(t)
    return 0


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:,.1f}"


def cmd_register(args: argparse.Namespace) -> int:
    from orchestrator.serving.registry import AdapterRegistry

    entries = list(AdapterRegistry.from_yaml(args.file).entries.values())
    actor = _controller(args.state_dir)
    pending = _ask(actor.register.remote(entries), 60)
    if args.json:
        print(json.dumps({"registered": [e.id for e in entries], "pending": pending}))
    else:
        output.console.print(f"registered {len(entries)} adapter(s); the controller places them at "
                        f"its next check ({len(pending)} registered since deploy)")
    return 0
