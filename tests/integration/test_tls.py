"""NBD over TLS (issue 20): `cluster up --tls` makes a lab CA and certificates; the gateway requires NBD STARTTLS
and a host certificate of that CA; real clients (nbdinfo's nbds://, qemu-io with tls-creds-x509) read and write,
anything else is refused and the gateway keeps serving."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from raftblock import tls
from raftblock.gateway import nbd

from .helpers import require_tools, run
from .test_cluster import Cluster, _cleanup


@pytest.fixture
def tcluster(tmp_path: Path) -> Iterator[Cluster]:
    require_tools("nbdinfo", "qemu-io")
    c = Cluster(tmp_path / "cluster")
    r = c.cli("cluster", "up", "--tls", "--nbd-port", "0", "--iscsi-port", "0")
    c.uri = r.stdout.strip().splitlines()[-1]
    yield c
    _cleanup(c)


def _qemu_io(uri: str, certs: Path, *cmds: str) -> str:
    hostport = uri.removeprefix("nbds://")
    host, port = hostport.rsplit(":", 1)
    argv = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}", "--image-opts",
            f"driver=nbd,host={host},port={port},export=vol,tls-creds=tls0"]
    for c in cmds:
        argv += ["-c", c]
    return run(argv, timeout_s=60).stdout


def test_nbd_needs_tls_and_a_host_certificate(tcluster: Cluster, tmp_path: Path) -> None:
    c = tcluster
    assert c.uri.startswith("nbds://"), c.uri
    c.cli("volume", "create", "vol", "--size", "64M")
    certs = c.root / "tls" / "hosts" / "local"
    # real clients with the host's certificate: write, read back, over TLS
    out = _qemu_io(c.uri, certs, "write -P 0x6b 1M 2M", "read -P 0x6b 1M 2M")
    assert "Pattern verification failed" not in out and "read 2097152/2097152" in out, out
    info = run(["nbdinfo", f"{c.uri}/vol?tls-certificates={certs}"], timeout_s=30).stdout
    assert "with TLS" in info and "export-size: 67108864" in info, info
    # plain NBD: refused (the option answered ERR_TLS_REQD; libnbd reports it as not supported)
    plain = run(["nbdinfo", c.uri.replace("nbds://", "nbd://") + "/vol"], timeout_s=30, check=False)
    assert plain.returncode != 0 and "export-size" not in plain.stdout, plain
    # TLS without a client certificate, and with one of another CA: the handshake fails
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    other = tmp_path / "other-ca"
    tls.init_ca(other)
    foreign = tls.nbd_client_dir(other / "hosts" / "x", other, "x")
    (foreign / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())  # trusts the server, not trusted
    for d in (nocert, foreign):
        r = run(["nbdinfo", f"{c.uri}/vol?tls-certificates={d}"], timeout_s=30, check=False)
        assert r.returncode != 0, (d, r.stdout)
    # a raw client: options before STARTTLS get ERR_TLS_REQD, EXPORT_NAME closes the connection
    host, port = c.uri.removeprefix("nbds://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.recv(18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.Opt.LIST, 0))
        magic, option, rtype, length = struct.unpack(">QIII", s.recv(20))
        assert (option, rtype) == (nbd.Opt.LIST, nbd.REP_ERR_TLS_REQD), rtype
        s.recv(length)
        s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.Opt.EXPORT_NAME, 3) + b"vol")
        assert s.recv(100) == b""  # closed, nothing of the volume given
    # the gateway kept serving, and the data is what was written
    out = _qemu_io(c.uri, certs, "read -P 0x6b 1M 2M", "read -P 0 0 1M")
    assert "Pattern verification failed" not in out, out
    log = (c.root / "logs" / "n1.log").read_text()
    assert '"nbd.tls"' in log and "host-local.raftblock" in log  # the host is known by its certificate


def test_every_internal_link_is_mutual_tls(tcluster: Cluster) -> None:
    """The data port and the metadata admin port serve TLS only, to certificates of the cluster CA; a peer's
    certificate must name the node its HELLO claims to be."""
    import json
    import ssl
    import urllib.request

    from raftblock.wire import raftblock_pb2 as pb
    from raftblock.wire.framing import ROLE_PEER, encode_frame_bytes

    c = tcluster
    st = c.status()  # the CLI itself talks TLS (its certificate is in DIR/cluster.toml's [tls])
    assert {n["state"] for n in st["nodes"]} == {"up"}
    d = c.root / "tls"
    n1 = next(n for n in st["nodes"] if n["id"] == 1)
    host, port = n1["address"].rsplit(":", 1)
    admin_port = int(next(iter(json.loads((c.root / "cluster.json").read_text())["meta_admin"].values()))
                     .rsplit(":", 1)[1])

    def refused_identity() -> float:
        text = urllib.request.urlopen(n1["metrics_url"], timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("raftblock_node_auth_refused_total") and 'reason="bad_identity"' in line)

    for p in (int(port), admin_port):
        # plain TCP: no TLS handshake, nothing answered
        with socket.create_connection((host, p), timeout=10) as s:
            s.sendall(b'{"auth": "x"}\n' + encode_frame_bytes(1, 0, b""))
            s.settimeout(10)
            try:
                got = s.recv(4096)
            except (ConnectionResetError, TimeoutError):
                got = b""
            assert not got.startswith(b'{"hello"') and b"RB" not in got[:2], got[:40]
        # TLS without a client certificate: refused by the server
        ctx = ssl.create_default_context(cafile=str(d / "ca-cert.pem"))
        ctx.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection((host, p), timeout=10) as s, ctx.wrap_socket(s) as t:
                t.sendall(b"x")
                assert t.recv(1) == b""
                raise ConnectionError("closed")
    # a valid certificate (the CLI's) that claims to be node 3 in its HELLO: refused, counted
    before = refused_identity()
    ctx = ssl.create_default_context(cafile=str(d / "ca-cert.pem"))
    ctx.load_cert_chain(d / "admin-cert.pem", d / "admin-key.pem")
    with socket.create_connection((host, int(port)), timeout=10) as s, \
            ctx.wrap_socket(s, server_hostname=tls.node_name(1)) as t:
        t.sendall(encode_frame_bytes(1, 0, pb.Hello(node_id=3, role=ROLE_PEER, version=1, nonce=b"n" * 16,
                                                    auth=1).SerializeToString()))
        t.settimeout(10)
        try:
            while t.recv(4096):
                pass
        except (ssl.SSLError, ConnectionResetError):
            pass
    assert refused_identity() == before + 1
    assert {n["state"] for n in c.status()["nodes"]} == {"up"}
