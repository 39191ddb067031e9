"""The ingress's own HTTP listener: clients reach the routing code in one hop.

Through Ray Serve's HTTP proxy a request crosses two processes before it is routed (client ->
proxy actor -> ingress replica, over a Serve handle); that path measured +9.5-10.6 ms p50 over
a direct handle call on the 2-core machines (docs/serving.md). The ingress replica can instead
serve the same FastAPI app itself on a fixed port: one uvicorn server on the replica's event
loop, bound with ``SO_REUSEPORT`` so every ingress replica on a node shares the port and the
kernel spreads connections over them. Serve still runs, scales and restarts the replicas; its
proxy keeps serving the same API on its own port.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any


class ListenError(ValueError):
    """A listen address that cannot be used; the message names it."""


def parse_listen(value: object) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"PORT"`` or an int port (host 127.0.0.1) -> (host, port)."""
    text = str(value).strip()
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ListenError(f"listen: expected HOST:PORT or PORT with a port in 1-65535, "
                          f"got {value!r}")
    return host, port


def bind(host: str, port: int) -> socket.socket:
    """A listening socket shared by every ingress replica on this node (``SO_REUSEPORT``).
    Raises ListenError naming the address when it is taken by another program."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError(f"listen: cannot bind {host}:{port}: {exc.strerror or exc}; choose "
                          "another port") from None
    sock.setblocking(False)
    return sock


@dataclass
class Listener:
    """A running uvicorn server over a bound socket, on the current event loop."""

    server: Any
    task: asyncio.Task

    @classmethod
    def start(cls, app: Any, host: str, port: int) -> Listener:
        import uvicorn

        sock = bind(host, port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=75)
        server = uvicorn.Server(config)
        task = asyncio.get_event_loop().create_task(server.serve(sockets=[sock]))
        return cls(server, task)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout_s``)."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()
