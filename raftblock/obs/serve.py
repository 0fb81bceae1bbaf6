"""start_metrics: a process's HTTP server (obs/http.py) with /metrics from its collectors (obs/metrics.py)
and /healthz; `extra` routes for the metadata node's status page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raftblock import __version__
from raftblock.obs.http import Handler, HttpServer, Request, Response
from raftblock.obs.metrics import CONTENT_TYPE, Families, exposition, make_registry


async def start_metrics(listen: str, name: str, *fills: Callable[[Families], None],
                        extra: dict[str, Handler] | None = None) -> HttpServer:
    def fill(f: Families) -> None:
        for one in fills:
            one(f)

    reg = make_registry(fill, __version__)

    def metrics(_req: Request) -> Response:
        return Response(200, exposition(reg), CONTENT_TYPE)

    def healthz(_req: Request) -> Response:
        return Response(200, b"ok\n")

    routes: dict[str, Any] = {"/metrics": metrics, "/healthz": healthz, **(extra or {})}
    server = HttpServer(listen, routes, name)
    await server.start()
    return server
