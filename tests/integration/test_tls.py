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
