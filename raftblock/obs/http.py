"""The small HTTP server of every raftblock process (`http = "HOST:PORT"` in its config): /metrics
(Prometheus), /healthz, and on metadata nodes the status page (/ and /status.json, control/statuspage.py).

Rules:
1. Read-only, GET and HEAD only; one request per connection (`Connection: close`); a request head larger
   than HEAD_BYTES_MAX or slower than HEAD_TIMEOUT_S gets 400/408 and the close. Nothing a client sends
   can change the process or take more than HEAD_BYTES_MAX of its memory.
2. Handlers run on the process's event loop (a scrape is one consistent instant, obs/metrics.py rule 3); a
   handler that raises gives 500 with one line, logged once per path per minute; the process goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger(__name__)

HEAD_BYTES_MAX = 8192
HEAD_TIMEOUT_S = 10.0
REASONS = {200: "OK", 307: "Temporary Redirect", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


Handler = Callable[[Request], Response | Awaitable[Response]]


def text(status: int, msg: str) -> Response:
    return Response(status, (msg + "\n").encode())


class HttpServer:
    def __init__(self, listen: str, routes: dict[str, Handler], name: str = "") -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.routes = routes
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._logged: dict[str, float] = {}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=HEAD_BYTES_MAX)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("http.listening", url=self.url, process=self.name)
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
            except TimeoutError:
                await self._reply(writer, text(408, "request head not received in time"), head_only=False)
                return
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
                await self._reply(writer, text(400, f"bad request head (at most {HEAD_BYTES_MAX} bytes)"), False)
                return
            resp, head_only = await self._handle(head)
            await self._reply(writer, resp, head_only)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, head: bytes) -> tuple[Response, bool]:
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
        except ValueError:
            return text(400, "malformed request line or header"), False
        if method not in ("GET", "HEAD"):
            return text(405, "read-only: GET or HEAD"), False
        url = urlsplit(target)
        handler = self.routes.get(url.path)
        if handler is None:
            return text(404, f"no page {url.path}; try {', '.join(sorted(self.routes))}"), method == "HEAD"
        try:
            res = handler(Request(url.path, parse_qs(url.query), headers))
            if inspect.isawaitable(res):
                res = await res
        except Exception as e:  # noqa: BLE001 — rule 2: the process goes on
            now = time.monotonic()
            if now - self._logged.get(url.path, -1e9) > 60:
                self._logged[url.path] = now
                log.exception("http.handler_failed", path=url.path)
            return text(500, f"{type(e).__name__}: {e}"), method == "HEAD"
        assert isinstance(res, Response)
        return res, method == "HEAD"

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, resp: Response, head_only: bool) -> None:
        hdrs = {"Content-Type": resp.content_type, "Content-Length": str(len(resp.body)), "Connection": "close",
                "Cache-Control": "no-store", **resp.headers}
        out = f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}\r\n" + \
            "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        writer.write(out.encode("latin-1") + (b"" if head_only else resp.body))
        await writer.drain()
