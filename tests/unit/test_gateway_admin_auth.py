"""gateway/admin.py: the TCP admin port reads no request before the peer proved the cluster secret."""

from __future__ import annotations

import asyncio
import json

import pytest

from raftblock.gateway.admin import AdminAuthError, challenge, connect


async def _server(secret: bytes, seen: list[bytes]) -> tuple[asyncio.AbstractServer, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await challenge(reader, writer, secret)
        except AdminAuthError:
            writer.write(b'{"ok": false, "error": "authentication failed"}\n')
            await writer.drain()
            writer.close()
            return
        line = await reader.readline()
        seen.append(line)
        writer.write(json.dumps({"ok": True, "echo": json.loads(line)}).encode() + b"\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"


def test_the_right_secret_gets_in_and_a_wrong_one_is_refused_before_any_request_is_read() -> None:
    async def go() -> None:
        seen: list[bytes] = []
        srv, addr = await _server(b"s3cret", seen)
        try:
            r, w = await connect(addr, b"s3cret")
            w.write(b'{"op": "status"}\n')
            await w.drain()
            assert json.loads(await r.readline()) == {"ok": True, "echo": {"op": "status"}}
            w.close()
            r, w = await connect(addr, b"wrong")
            w.write(b'{"op": "hold", "volumes": ["v"]}\n')
            await w.drain()
            assert json.loads(await r.readline()) == {"ok": False, "error": "authentication failed"}
            assert await r.read() == b""  # closed
            w.close()
            # a peer that skips the challenge and sends a request at once: that line is its (wrong) answer
            r, w = await asyncio.open_connection(*addr.rsplit(":", 1))
            await r.readline()
            w.write(b'{"op": "reload"}\n')
            await w.drain()
            assert b"authentication failed" in await r.readline()
            w.close()
            # an answer nested deeper than the JSON parser recurses (found by tests/fuzz): refused, not a crash
            r, w = await asyncio.open_connection(*addr.rsplit(":", 1))
            await r.readline()
            w.write(b"[" * 30_000 + b"\n")
            await w.drain()
            assert b"authentication failed" in await r.readline()
            w.close()
            with pytest.raises(AdminAuthError):
                await connect(addr, None)
            assert seen == [b'{"op": "status"}\n']  # only the authenticated request was read
        finally:
            srv.close()
            await srv.wait_closed()

    asyncio.run(go())
