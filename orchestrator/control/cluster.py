"""A private local Ray head and the connection to a cluster (what ``deploy`` starts or joins).

``LocalHead.start``: ``ray start --head --block`` as a child process on free ports, with
``RAY_AUTH_MODE=disabled``, its own temp dir and session; ``stop`` ends exactly that process tree
(SIGTERM to its PID, wait, SIGKILL any recorded descendant still alive) - never other Ray
clusters on the machine (no ``ray stop``, no names). ``LocalWorker.start`` joins another node
to such a head on the same machine (``ray start --address``, its own ports, declared CPUs, GPUs
and custom resources: Ray accepts ``--num-gpus`` on any machine, which is how the multi-node
tests place GPU replicas without GPUs); ``stop(kill=True)`` is a node dying. ``connect`` joins
a cluster by address.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HEAD_START_TIMEOUT_S = 90.0


class ClusterError(RuntimeError):
    """A Ray head that would not start; the message points at its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


NICENESS_ENV = "RAY_worker_niceness"  # the raylet's setting for its workers (Ray's default: 15)
SERVING_NICENESS = "0"


def ray_env() -> dict[str, str]:
    """The environment of a head this process starts (and so of every worker it spawns).

    ``RAY_worker_niceness``: Ray starts its workers at nice 15, as if they were background
    jobs; here they are the product (ingress, engines, controller). At nice 15 any busy process
    at the default priority - the load generator, a build - takes ~28x their CPU share: on a
    2-core host the ingress then stopped taking requests for 10 s at a time while the client
    sent 14 req/s (benchmarks/controller_shift.py). The caller's environment wins if it sets it.
    """
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault(NICENESS_ENV, SERVING_NICENESS)
    return env


@dataclass
class LocalHead:
    """A Ray head this process started (``ray start --head --block`` child)."""

    pid: int
    address: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    temp_dir: str
    log_path: str
    descendants: list[int] = field(default_factory=list)
    remove_logs: bool = False  # the log folder was ours (no log_dir given): delete it on stop
    dashboard: bool = False  # the Ray dashboard runs (``ray list``, ``serve status``, the UI)

    @property
    def dashboard_url(self) -> str | None:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.dashboard else None

    @classmethod
    def start(cls, *, num_cpus: float | None = None, log_dir: str | Path | None = None,
              progress: Callable[[str], None] = lambda _m: None,
              env: Mapping[str, str] | None = None, dashboard: bool = False,
              dashboard_port: int | None = None) -> LocalHead:
        """``env``: extra environment of the head and so of every worker (Ray/Serve flags).
        ``dashboard``: run Ray's dashboard (on ``dashboard_port``, default a free one): the
        state API behind ``ray list actors`` and ``serve status`` lives in it; tests leave it
        off (two processes and ~250 MB less)."""
        gcs, dash, client, nm, om, agent, agent_grpc, env_agent, metrics = _free_ports(9)
        dash = dashboard_port or dash
        # short temp dir: Ray's unix socket paths must stay under 107 characters
        temp_dir = f"/tmp/lf-ray-{gcs}"
        remove_logs = log_dir is None
        log_dir = Path(log_dir or temp_dir + "-log")
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "ray-head.log"
        cmd = [
            _ray_bin(), "start", "--head", "--block", f"--port={gcs}",
            f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            "--node-ip-address=127.0.0.1", f"--include-dashboard={str(dashboard).lower()}",
            *(["--dashboard-host=127.0.0.1"] if dashboard else []),
            "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus:g}")
        progress(f"starting a private Ray head on 127.0.0.1:{gcs}")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**ray_env(), **dict(env or {})},
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        head = cls(proc.pid, f"127.0.0.1:{gcs}", gcs, dash, client, temp_dir, str(log_path),
                   remove_logs=remove_logs, dashboard=dashboard)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise ClusterError(f"ray start exited with code {proc.returncode}; see {log_path}")
            if _port_open(gcs) and _head_ready(log_path) and (
                    not dashboard or _port_open(dash)):
                head.descendants = descendants(proc.pid)
                return head
            time.sleep(0.5)
        head.stop()
        raise ClusterError(f"the Ray head did not come up in {HEAD_START_TIMEOUT_S:g} s; "
                          f"see {log_path}")

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Stop this head's process tree; returns PIDs that had to be SIGKILLed."""
        killed = end_tree(self.pid, self.descendants, timeout_s=timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.remove_logs and not killed:
            shutil.rmtree(Path(self.log_path).parent, ignore_errors=True)
        return killed


@dataclass
class LocalWorker:
    """A worker node this process joined to a local head (``ray start --address --block``)."""

    pid: int
    log_path: str
    descendants: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, head_address: str, *, log_dir: str | Path, num_cpus: float,
              num_gpus: float = 0.0, resources: Mapping[str, float] | None = None,
              env: Mapping[str, str] | None = None, attempts: int = 3) -> LocalWorker:
        """Ray gives a joining raylet a fixed 30 s to register with the GCS; on a loaded host
        that can pass, and ``ray start`` gives up (its log says "timed out during startup"):
        that start is tried again, up to ``attempts`` times; any other failure is raised."""
        for attempt in range(1, attempts + 1):
            try:
                return cls._start_once(head_address, log_dir=log_dir, num_cpus=num_cpus,
                                       num_gpus=num_gpus, resources=resources, env=env)
            except ClusterError as exc:
                if attempt == attempts or "timed out during startup" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(cls, head_address: str, *, log_dir: str | Path, num_cpus: float,
                    num_gpus: float, resources: Mapping[str, float] | None,
                    env: Mapping[str, str] | None) -> LocalWorker:
        nm, om, agent, agent_grpc, env_agent, metrics = _free_ports(6)
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"ray-worker-{nm}.log"
        cmd = [
            _ray_bin(), "start", f"--address={head_address}", "--block",
            f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
            "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus:g}",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(dict(resources))}")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**ray_env(), **dict(env or {})},
                                    start_new_session=True, stdin=subprocess.DEVNULL)
        worker = cls(proc.pid, str(log_path))
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-300:].strip().splitlines()
                raise ClusterError(f"ray start (worker) exited with code {proc.returncode}: "
                                   f"{tail[-1] if tail else ''}; see {log_path}")
            if _head_ready(log_path):
                worker.descendants = descendants(proc.pid)
                return worker
            time.sleep(0.5)
        worker.stop(kill=True)
        raise ClusterError(f"the Ray worker node did not come up in {HEAD_START_TIMEOUT_S:g} s; "
                           f"see {log_path}")

    def stop(self, *, kill: bool = False, timeout_s: float = 30.0) -> list[int]:
        """End this node's process tree: SIGTERM and wait (a clean leave), or ``kill``: SIGKILL
        at once, raylet and workers together (a node lost). Returns PIDs SIGKILLed."""
        return end_tree(self.pid, self.descendants, timeout_s=0.0 if kill else timeout_s)


def end_tree(pid: int, known: Sequence[int], *, timeout_s: float) -> list[int]:
    """End the process tree of ``pid`` (``known``: descendants recorded earlier, which may have
    left the tree): SIGTERM and wait up to ``timeout_s`` (0: SIGKILL at once), then SIGKILL
    whatever is still alive. Returns the PIDs SIGKILLed."""
    tree = set(known) | set(descendants(pid)) | {pid}
    if timeout_s > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
            tree |= set(descendants(pid))
            time.sleep(0.3)
    killed = []
    for p in sorted(tree):
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
                killed.append(p)
    _reap(pid)
    return killed


def _head_ready(log_path: Path) -> bool:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    return "Ray runtime started" in text


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def connect(address: str) -> None:
    import logging

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # keep the CLI's output readable
    if ray.is_initialized():
        return
    ray.init(address=address, logging_level="ERROR", log_to_driver=False,
             namespace="serve", runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})


def disconnect() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
