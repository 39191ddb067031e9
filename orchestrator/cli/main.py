"""`lorafleet`: parse the command line and dispatch to the command modules (parse, call the
library, print; no logic here). Errors a user can act on are printed without a traceback and
exit with code 2."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.output import CLIError, err_console
from orchestrator.cli.twin import (
    cmd_calibrate,
    cmd_demo,
    cmd_profiles,
    cmd_simulate,
    cmd_validate,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorafleet",
        description="Plan, simulate and serve many LoRA adapters on vLLM with a Digital Twin.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="run the Digital Twin of one vLLM replica on a workload")
    s.add_argument("workload", help="workload YAML (see docs/workload_format.md)")
    s.add_argument(
        "--profile", required=True, help="profile name (see `lorafleet profiles`) or YAML path"
    )
    s.add_argument("--max-loras", type=int, required=True, help="GPU adapter slots (max_loras)")
    s.add_argument("--max-cpu-loras", type=int, default=None,
                   help="CPU adapter cache size (default: the number of adapters in the workload)")
    s.add_argument("--max-lora-rank", type=int, default=None,
                   help="slot rank (default: smallest valid rank >= the workload's largest)")
    s.add_argument("--max-num-seqs", type=int, default=None,
                   help="max running requests (default: the profile's default_engine value)")
    s.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="chunked-prefill token budget (default: the profile's)")
    s.add_argument(
        "--duration", type=float, default=None, help="simulated seconds (default: the workload's)"
    )
    s.add_argument("--seed", type=int, default=0, help="request-generation seed")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("calibrate", help="fit a profile from per-step measurements")
    c.add_argument("data_dir", help="folder with step_profiles.csv.gz, profile_runs.csv, "
                   "kv_capacity.csv, adapter_loads.csv (reference-data format)")
    c.add_argument("--model", required=True, help="value of the tables' `model` column to fit")
    c.add_argument("-o", "--output", required=True, help="profile YAML to write")
    c.add_argument("--name", default=None, help="profile name (default: the model)")
    c.add_argument("--gpu", default=None, help="GPU label (default: from the data's README)")
    c.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    c.add_argument("--json", action="store_true", help="print the fit report as JSON")
    c.set_defaults(func=cmd_calibrate)

    v = sub.add_parser("validate", help="replay measured runs in the twin and score it")
    v.add_argument("runs", help="runs table (columns of data/reference/.../validation_runs.csv)")
    v.add_argument("--profile", default="auto",
                   help="profile for every row, or `auto`: the profile named like the row's model")
    v.add_argument("--limit", type=int, default=None, help="a seeded random sample of N runs")
    v.add_argument("--seed", type=int, default=0, help="seed of the workloads and the sample")
    v.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    v.add_argument(
        "--client-max-inflight", default="auto",
        help="load-generator cap on requests in flight for rows that do not record one: auto "
        "(the reference harness: one connection per request, 28,232 ephemeral ports), none, or N",
    )
    v.add_argument(
        "--eos-output-scale", default="auto",
        help="output lengths of reference rows (no workload_json) relative to the ShareGPT "
        "reference, for answers that end before max_tokens: auto (the reference runs: 0.965, "
        "their data README's caveat 6) or a number in (0, 1]; 1 = every answer runs to max_tokens",
    )
    v.add_argument("--out", default=None,
                   help="per-run predictions CSV; scatter plots go next to it")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_validate)

    pr = sub.add_parser("profiles", help="list the available profiles")
    pr.set_defaults(func=cmd_profiles)

    from orchestrator.cli.deploy import add_parser as add_deploy_parser
    from orchestrator.cli.plan import add_parser as add_plan_parser
    from orchestrator.cli.surrogate import add_parser as add_surrogate_parser
    from orchestrator.measure.bench import add_parser as add_bench_parser
    from orchestrator.measure.profile import add_parser as add_profile_parser
    from orchestrator.measure.tiny_model import add_parser as add_tiny_model_parser

    add_tiny_model_parser(sub)
    add_profile_parser(sub)
    add_bench_parser(sub)
    add_plan_parser(sub)
    add_surrogate_parser(sub)
    add_deploy_parser(sub)
    from orchestrator.cli.controller import add_parser as add_controller_parser

    add_controller_parser(sub)

    from orchestrator.cli.demo import add_arguments as add_demo_arguments

    d = sub.add_parser("demo", help="the main job: plan, deploy on real vLLM, load it, measured "
                       "vs predicted (--twin-only: a measured H100 hour vs the twin's replay)")
    d.add_argument("--json", action="store_true")
    add_demo_arguments(d, twin_only=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from twin.config import ConfigError
    from twin.profile import InfeasibleConfigError, ProfileError

    args = build_parser().parse_args(argv)
    from twin.calibrate import CalibrationError
    from twin.validate import ValidationError

    user_errors: tuple[type[BaseException], ...] = (
        CLIError, ConfigError, ProfileError, InfeasibleConfigError, FileNotFoundError,
        CalibrationError, ValidationError,
    )
    try:
        from orchestrator.control.controller import ControllerError
        from orchestrator.control.deploy import DeployError
        from orchestrator.serving.registry import RegistryError
        from orchestrator.serving.spec import SpecError
        from placement.errors import PlacementError
        from twin.workload import WorkloadError

        user_errors = (*user_errors, WorkloadError, DeployError, RegistryError, SpecError,
                       PlacementError, ControllerError)
        return int(args.func(args) or 0)
    except user_errors as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
