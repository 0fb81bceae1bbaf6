"""The gateway's admin connection (JSON lines: reload, status, hold; node/gateway.py `Gateway.admin`) over a
unix socket on its own machine, or over TCP (`admin_listen = "HOST:PORT"`) for the commands of a deployed
cluster run elsewhere: `snapshot create` raises a remote gateway's barrier through it.

Rules:
1. On TCP nothing is read as a request before the peer proved it holds the cluster secret: the gateway sends
   `{"challenge": HEX}` (32 random bytes), the peer answers `{"auth": HMAC-SHA256(secret, challenge)}`, compared
   in constant time. A wrong or missing answer gets `{"ok": false, "error": "authentication failed"}` and the
   close; the unix socket (mode 0600, same machine) needs no challenge.
2. A line is at most LINE_BYTES_MAX; the answer to the challenge must come within AUTH_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from pathlib import Path

LINE_BYTES_MAX = 64 << 10
AUTH_TIMEOUT_S = 10.0


class AdminAuthError(Exception):
    pass


def _mac(secret: bytes, challenge: str) -> str:
    return hmac.new(secret, bytes.fromhex(challenge), hashlib.sha256).hexdigest()


async def challenge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes) -> None:
    """Rule 1, the gateway's side: returns once the peer proved the secret, else raises AdminAuthError."""
    nonce = secrets.token_hex(32)
    writer.write(json.dumps({"challenge": nonce}).encode() + b"\n")
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), AUTH_TIMEOUT_S)
        got = json.loads(line[:LINE_BYTES_MAX]).get("auth", "") if line else ""
    except (TimeoutError, ValueError, AttributeError, RecursionError):  # deeply nested JSON too
        got = ""
    if not isinstance(got, str) or not hmac.compare_digest(got, _mac(secret, nonce)):
        raise AdminAuthError("authentication failed")


async def connect(address: str | Path, secret: bytes | None,
                  timeout_s: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The peer's side: a unix socket path, or "HOST:PORT" answered with the challenge (rule 1)."""
    if isinstance(address, Path) or address.startswith("/"):
        return await asyncio.wait_for(asyncio.open_unix_connection(str(address), limit=LINE_BYTES_MAX), timeout_s)
    host, _, port = address.rpartition(":")
    from raftblock import tls

    ctx = tls.client_ctx(check_name=False)  # with the process's [tls]: the gateway's admin port is TLS only
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port), ssl=ctx,
                                                                    limit=LINE_BYTES_MAX), timeout_s)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        nonce = json.loads(line)["challenge"]
        if secret is None:
            raise AdminAuthError(f"gateway admin {address} asks for the cluster secret")
        writer.write(json.dumps({"auth": _mac(secret, str(nonce))}).encode() + b"\n")
        await writer.drain()
    except (ValueError, KeyError, TypeError) as e:
        writer.close()
        raise AdminAuthError(f"gateway admin {address}: no challenge ({e})") from None
    except BaseException:
        writer.close()
        raise
    return reader, writer
