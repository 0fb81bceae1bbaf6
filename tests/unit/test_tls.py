"""raftblock/tls.py: the lab CA and its certificates, and mutual TLS with names checked, on real sockets."""

from __future__ import annotations

import asyncio
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from raftblock import tls


def _sans(path: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def test_a_ca_and_certificates_with_their_names_and_private_keys(tmp_path: Path) -> None:
    ca, ca_key = tls.init_ca(tmp_path, "c1")
    again, _ = tls.init_ca(tmp_path)  # an existing CA is kept
    assert again.read_bytes() == ca.read_bytes()
    cert, key = tls.issue(tmp_path, tmp_path, tls.node_name(2), ["localhost"], ["127.0.0.1"])
    assert _sans(cert) == (["node-2.raftblock", "localhost"], ["127.0.0.1"])
    for k in (ca_key, key):
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    # signed by the CA: the ssl module accepts the pair against it
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    d = tls.nbd_client_dir(tmp_path / "hosts" / "h1", tmp_path, "h1")
    assert sorted(p.name for p in d.iterdir()) == ["ca-cert.pem", "client-cert.pem", "client-key.pem"]
    assert _sans(d / "client-cert.pem")[0] == ["host-h1.raftblock"]
    with pytest.raises(ValueError, match="needs ca, cert and key"):
        tls.TlsConfig.from_table({"ca": str(ca)})
    with pytest.raises(ValueError, match="is not a file"):
        tls.TlsConfig.from_table({"ca": str(ca), "cert": str(tmp_path / "none.pem"), "key": str(key)})


def test_mutual_tls_checks_the_name_and_the_ca(tmp_path: Path) -> None:
    tls.init_ca(tmp_path / "a")
    tls.init_ca(tmp_path / "b")  # another cluster's CA
    tls.issue(tmp_path / "a", tmp_path / "a", tls.node_name(1), [], ["127.0.0.1"])
    tls.issue(tmp_path / "a", tmp_path / "a", tls.node_name(2), [], [])
    tls.issue(tmp_path / "b", tmp_path / "b", tls.node_name(2), [], [])
    a = tmp_path / "a"

    def cfg(d: Path, base: str) -> tls.TlsConfig:
        return tls.TlsConfig(d / "ca-cert.pem", d / f"{base}-cert.pem", d / f"{base}-key.pem")

    async def go() -> None:
        seen: list[set[str]] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(tls.peer_names(w.get_extra_info("ssl_object")))
            w.write(b"ok")
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=cfg(a, "node-1").server_context())
        port = server.sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cfg(a, "node-2").client_context(),
                                                 server_hostname=tls.node_name(1))
            assert await r.read() == b"ok"
            w.close()
            assert seen == [{"node-2.raftblock"}]  # the server knows who connected
            with pytest.raises(ssl.SSLCertVerificationError):  # node 1's certificate is not node 3's
                await asyncio.open_connection("127.0.0.1", port, ssl=cfg(a, "node-2").client_context(),
                                              server_hostname=tls.node_name(3))
            with pytest.raises((ssl.SSLError, ConnectionError)):  # a client of another CA
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cfg(tmp_path / "b", "node-2")
                                                     .client_context(), server_hostname=tls.node_name(1))
                await r.read()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(go())
