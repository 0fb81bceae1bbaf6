# The iSCSI target of the gateway, held to real initiators (libiscsi's tools, qemu's iscsi:// driver, a file
# system through qemu-nbd), on a 3-rack cluster as `cluster up` starts it.
#
# Enforces (issue 19): discovery lists the volumes; INQUIRY / READ CAPACITY(16) as the host sees them; a
# pattern written over iSCSI reads back over NBD and the reverse (one volume, two protocols, same bytes);
# ext4 through `qemu-nbd iscsi://` + nbdfuse is fsck clean and every file verifies; CHAP (and mutual CHAP)
# from the metadata group: a wrong or missing secret is refused at login; malformed PDUs and broken
# sequences close only that connection, other sessions go on and nothing stored changes; a kill -9 of the
# volume's group leader during a fio crc32c verify job over iSCSI: no I/O error, the data verifies.
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import _skip_or_fail, require_tools, run
from .test_cluster import Cluster, _cleanup, _wait
from .test_ext4_nbdfuse import _make_tree, _phase, _read_sums
from .test_qemu_clients import MODEL_BYTES, QEMU_WRITES, _apply, _qemu_io, _runs

IQN = "iqn.2026-12.org.raftblock"
MiB = 1 << 20


class IscsiCluster(Cluster):
    def portal(self) -> str:
        g = self.status()["gateway"]
        assert g["iscsi"], f"the gateway announced no iSCSI portal: {g}"
        return str(g["iscsi"]).removeprefix("iscsi://")

    def target(self, volume: str, creds: str = "") -> str:
        return f"iscsi://{creds}{self.portal()}/{IQN}:{volume}/0"


@pytest.fixture
def icluster(tmp_path: Path) -> Iterator[IscsiCluster]:
    require_tools("iscsi-inq", "iscsi-ls", "iscsi-readcapacity16", "qemu-io", "qemu-img")
    c = IscsiCluster(tmp_path / "cluster")
    yield c
    _cleanup(c)


@pytest.fixture
def separate_icluster(tmp_path: Path) -> Iterator[IscsiCluster]:
    require_tools("iscsi-inq", "qemu-nbd", "fio")
    c = IscsiCluster(tmp_path / "cluster", gateway="separate")
    yield c
    _cleanup(c)


def _lba_bytes(uri: str) -> tuple[int, int]:
    out = run(["iscsi-readcapacity16", uri], timeout_s=30).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["LOGICAL BLOCK LENGTH IN BYTES"]), int(fields["Total size"])


def test_real_initiators_see_the_volume_and_share_its_bytes_with_nbd(icluster: IscsiCluster, tmp_path: Path) -> None:
    """SendTargets (RFC 7143 Appendix C), SPC-4 INQUIRY / SBC-3 READ CAPACITY(16) through libiscsi; then the
    qemu-io patterns of the NBD tests (aligned, 512-byte, straddling 4 KiB) over iSCSI, read back over NBD,
    and the reverse: the same volume, two protocols, the same bytes."""
    icluster.up()
    icluster.cli("volume", "create", "v", "--size", "64M")
    icluster.cli("volume", "create", "w", "--size", "32M")
    ls = run(["iscsi-ls", "-s", f"iscsi://{icluster.portal()}"], timeout_s=30).stdout
    assert f"Target:{IQN}:v " in ls and f"Target:{IQN}:w " in ls, ls
    assert "67108864" in ls or "64 MiB" in ls or "Size" in ls, ls  # iscsi-ls -s shows each LUN's size
    inq = run(["iscsi-inq", icluster.target("v")], timeout_s=30).stdout
    assert "Peripheral Device Type:DIRECT_ACCESS" in inq and "Vendor:RAFTBLCK" in inq, inq
    vpd83 = run(["iscsi-inq", "-e", "1", "-c", "131", icluster.target("v")], timeout_s=30).stdout
    assert "NAA" in vpd83 or "naa" in vpd83.lower(), vpd83
    lba, size = _lba_bytes(icluster.target("v"))
    assert (lba, size) == (512, 64 * MiB)
    # RFC 7143 11.1: a CRC32C header digest, as qemu's iscsi driver asks for it (libiscsi's tools cannot; data
    # digests are checked by tests/unit/test_iscsi_codec.py)
    host, _, port = icluster.portal().rpartition(":")
    opts = f"driver=iscsi,transport=tcp,portal={host}:{port},target={IQN}:v,lun=0,header-digest=crc32c"
    out = run(["qemu-io", "--image-opts", opts, "-c", "write -P 0x3d 8M 1M", "-c", "read -P 0x3d 8M 1M"],
              timeout_s=60).stdout
    assert "verification failed" not in out and "read 1048576/1048576" in out, out
    logged = [json.loads(line) for line in (icluster.root / "logs" / "n1.log").read_text().splitlines()
              if '"iscsi.attached"' in line]
    assert any(e.get("header_digest") for e in logged), "no session negotiated a header digest"

    nbd = f"{icluster.uri}/v"
    model = bytearray(MODEL_BYTES)
    for pattern, offset, length in QEMU_WRITES:
        _apply(model, offset, bytes([pattern]) * length)
    _qemu_io(icluster.target("v"), [f"write -P 0x{p:02x} {o} {n}" for p, o, n in QEMU_WRITES])
    _qemu_io(nbd, [f"read -P 0x{p:02x} {o} {n}" for p, o, n in _runs(bytes(model))])
    # the reverse, further on: NBD writes, iSCSI reads
    _qemu_io(nbd, ["write -P 0x5a 4194304 65536", "write -P 0x6b 6291456 4096", "write -P 0x7c 6296064 100"])
    _qemu_io(icluster.target("v"), ["read -P 0x5a 4194304 65536", "read -P 0x6b 6291456 4096",
                                    "read -P 0x7c 6296064 100", "read -P 0x00 6300000 4096"])
    # a whole image through qemu-img convert, compared over the other protocol
    img = tmp_path / "img.raw"
    img.write_bytes(os.urandom(8 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), icluster.target("w")], timeout_s=120)
    small = tmp_path / "w.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"{icluster.uri}/w", str(small)], timeout_s=120)
    assert hashlib.sha256(small.read_bytes()[: 8 * MiB]).digest() == hashlib.sha256(img.read_bytes()).digest()
    assert small.read_bytes()[8 * MiB:] == bytes(24 * MiB)


def test_chap_from_the_metadata_group(icluster: IscsiCluster, tmp_path: Path) -> None:
    """RFC 7143 12.1.3: a volume with CHAP refuses a login without it or with a wrong secret (libiscsi exits
    non-zero, the target logs the refusal); the right one logs in; mutual CHAP proves the target too; the
    credentials hold across a gateway restart (they live in the metadata group)."""
    icluster.up()
    icluster.cli("volume", "create", "s", "--size", "16M")
    (tmp_path / "secret").write_text("initiator-secret-1\n")
    (tmp_path / "tsecret").write_text("the-target-secret-2\n")
    icluster.cli("volume", "set-chap", "s", "--user", "host1", "--secret-file", str(tmp_path / "secret"))
    ok = icluster.target("s", "host1%initiator-secret-1@")

    def inq(uri: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["iscsi-inq", uri], capture_output=True, text=True, timeout=30)

    _wait(lambda: inq(icluster.target("s")).returncode != 0, 15, "the gateway to require CHAP")
    for bad in (icluster.target("s"), icluster.target("s", "host1%wrong-secret-123@"),
                icluster.target("s", "host2%initiator-secret-1@")):
        r = inq(bad)
        assert r.returncode != 0 and "Vendor:" not in r.stdout, (bad, r.stdout, r.stderr)
    assert "Vendor:RAFTBLCK" in inq(ok).stdout
    metrics_url = icluster.status()["gateways"][0]["metrics_url"]
    scrape = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    refused = [float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
               if line.startswith("raftblock_gateway_iscsi_logins_total{") and 'result="refused"' in line]
    assert refused and refused[0] >= 3, "the refused logins are not counted in /metrics"
    # mutual: the initiator checks the target's answer (libiscsi: target_user / target_password)
    icluster.cli("volume", "set-chap", "s", "--user", "host1", "--secret-file", str(tmp_path / "secret"),
                 "--target-user", "tgt", "--target-secret-file", str(tmp_path / "tsecret"))
    mutual = ok + "?target_user=tgt&target_password=the-target-secret-2"
    _wait(lambda: inq(ok).returncode != 0, 15, "the gateway to require mutual CHAP")
    assert "Vendor:RAFTBLCK" in inq(mutual).stdout
    wrong = ok + "?target_user=tgt&target_password=not-the-target-secret"
    assert inq(wrong).returncode != 0  # the initiator refuses a target that cannot prove itself
    # the same secret twice is refused by the metadata group
    r = icluster.cli("volume", "set-chap", "s", "--user", "host1", "--secret-file", str(tmp_path / "secret"),
                     "--target-user", "tgt", "--target-secret-file", str(tmp_path / "secret"), check=False)
    assert r.returncode == 1 and "differ" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    icluster.cli("cluster", "down")
    icluster.up()
    assert "Vendor:RAFTBLCK" in inq(mutual).stdout
    assert inq(ok).returncode != 0
    icluster.cli("volume", "set-chap", "s", "--clear")
    _wait(lambda: inq(icluster.target("s")).returncode == 0, 15, "CHAP to be removed")


def _login_raw(host: str, port: int, target: str, isid: int = 1) -> socket.socket:
    """A minimal initiator: one login PDU (operational stage straight to full feature), no digests. Each
    session needs its own ISID: a login with the ISID of a live session reinstates (closes) it."""
    s = socket.create_connection((host, port), timeout=10)
    keys = (f"InitiatorName=iqn.2026-12.org.example:raw\0SessionType=Normal\0TargetName={target}\0"
            "ImmediateData=No\0InitialR2T=Yes\0MaxRecvDataSegmentLength=8192\0").encode()
    s.sendall(_pdu(0x43, 0x87, 1, keys, {8: bytes.fromhex("4000000000") + bytes([isid]), 24: struct.pack(">I", 1)}))
    rsp = _recv_pdu(s)
    assert rsp[0][0] == 0x23 and rsp[0][36:38] == b"\0\0", rsp[0][36:38]
    return s


def _pdu(op: int, flags: int, itt: int, data: bytes = b"", fields: dict[int, bytes] | None = None) -> bytes:
    b = bytearray(48)
    b[0], b[1] = op, flags
    b[5:8] = len(data).to_bytes(3, "big")
    struct.pack_into(">I", b, 16, itt)
    for off, v in (fields or {}).items():
        b[off : off + len(v)] = v
    return bytes(b) + data + bytes(-len(data) % 4)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _recv_pdu(s: socket.socket) -> tuple[bytes, bytes]:
    bhs = _recv_exact(s, 48)
    dsl = int.from_bytes(bhs[5:8], "big")
    data = _recv_exact(s, dsl + (-dsl % 4))[:dsl]
    return bhs, data


def _closed_after_reject(s: socket.socket) -> bool:
    """The target answers with a Reject (or a login reject) and closes: read until EOF (bounded)."""
    s.settimeout(10)
    seen = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
            seen += chunk
    except TimeoutError:
        return False


def test_malformed_input_closes_only_that_connection_and_changes_nothing(icluster: IscsiCluster,
                                                                        tmp_path: Path) -> None:
    """Rule 3 of gateway/iscsi.py: garbage before login, an oversized segment: the target answers (login reject)
    and closes that connection; a Data-Out with a wrong DataSN, data beyond what R2T asked: a Reject and the
    command fails without running, the session goes on. A session opened before keeps working throughout,
    and the blocks the broken writes aimed at keep their bytes."""
    icluster.up()
    icluster.cli("volume", "create", "m", "--size", "16M")
    _qemu_io(icluster.target("m"), ["write -P 0x77 0 65536"])
    host, _, port = icluster.portal().rpartition(":")
    target = f"{IQN}:m"
    # a healthy session held open across the abuse: TEST UNIT READY before and after
    good = _login_raw(host, int(port), target)
    tur = _pdu(0x01, 0x80, 100, b"", {20: struct.pack(">II", 0, 1), 32: bytes(16)})
    good.sendall(tur)
    assert _recv_pdu(good)[0][0] == 0x21

    cases = {
        "garbage": lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40),
        "oversized-login": lambda: _pdu(0x43, 0x87, 1)[:5] + (1 << 20).to_bytes(3, "big") + bytes(40),
    }
    for name, make in cases.items():
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(make())
        assert _closed_after_reject(s), f"{name}: the connection stayed open"
        s.close()
    write10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 2, 0])  # WRITE(10) LBA 0, 2 blocks
    for isid, name in ((2, "bad-datasn"), (3, "beyond-r2t")):
        s = _login_raw(host, int(port), target, isid)
        s.sendall(_pdu(0x01, 0xA1, 7, b"", {20: struct.pack(">II", 1024, 1), 32: write10.ljust(16, b"\0")}))
        r2t, _ = _recv_pdu(s)
        assert r2t[0] == 0x31, r2t[0]
        ttt = r2t[20:24]
        if name == "bad-datasn":
            s.sendall(_pdu(0x05, 0x00, 7, b"\xee" * 512, {20: ttt, 36: struct.pack(">II", 0, 0)}))
            s.sendall(_pdu(0x05, 0x80, 7, b"\xee" * 512, {20: ttt, 36: struct.pack(">II", 5, 512)}))
        else:
            s.sendall(_pdu(0x05, 0x80, 7, b"\xee" * 4096, {20: ttt, 36: struct.pack(">II", 0, 0)}))
        # iscsi.py rule 3: a Reject of the PDU, the command ends in CHECK CONDITION (ABORTED COMMAND)
        # without running, and the session goes on
        reject, _ = _recv_pdu(s)
        assert reject[0] == 0x3F, f"{name}: expected a Reject, got opcode {reject[0]:#x}"
        rsp, sense = _recv_pdu(s)
        assert rsp[0] == 0x21 and rsp[3] == 2 and sense[2 + 2] == 0x0B, (name, rsp[:4], sense)
        s.sendall(_pdu(0x01, 0x80, 8, b"", {20: struct.pack(">II", 0, 2), 32: bytes(16)}))
        assert _recv_pdu(s)[0][:4] == bytes([0x21, 0x80, 0, 0]), f"{name}: the session stopped"
        s.close()
    good.sendall(_pdu(0x01, 0x80, 101, b"", {20: struct.pack(">II", 0, 2), 32: bytes(16)}))
    rsp, _ = _recv_pdu(good)
    assert rsp[0] == 0x21 and rsp[3] == 0, "the healthy session stopped working"
    good.close()
    _qemu_io(f"{icluster.uri}/m", ["read -P 0x77 0 65536"])


@pytest.mark.timeout(400)
def test_ext4_through_qemu_nbd_iscsi_bridge(icluster: IscsiCluster, tmp_path: Path) -> None:
    """A real file system over iSCSI: qemu-nbd with qemu's iscsi driver as the initiator, nbdfuse + loop
    mount + ext4 on top (every mount in a private namespace); fsck -fn clean, every file verifies, also
    after remounting through a new iSCSI session."""
    require_tools("qemu-nbd", "nbdfuse", "fusermount3", "mkfs.ext4", "fsck.ext4", "unshare", "mount")
    if os.geteuid() != 0:
        _skip_or_fail("mount -o loop needs root")
    icluster.up()
    icluster.cli("volume", "create", "fs", "--size", "128M")
    src = tmp_path / "src"
    expected = _make_tree(src)
    work = tmp_path / "work"
    work.mkdir()
    for phase in ("write", "verify"):
        with _bridge(icluster.target("fs"), tmp_path) as uri:
            _phase(phase, uri, work, src if phase == "write" else None)
        assert _read_sums(work / f"sums.{phase}") == expected, f"files differ ({phase})"


class _bridge:
    """`qemu-nbd iscsi://...` on a unix socket: the iSCSI initiator is qemu's, NBD clients attach to it."""

    def __init__(self, target: str, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        # a unix socket path holds at most 107 bytes: not under pytest's long tmp_path
        self.dir = Path(tempfile.mkdtemp(prefix="rb-nbd-"))
        self.sock = self.dir / "s"
        self.argv = ["qemu-nbd", "-f", "raw", "--cache=none", "-t", "-e", "4", "-x", "", *extra, "-k", str(self.sock), target]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: self.sock.exists() or self.proc.poll() is not None, 30, "qemu-nbd to listen")
        assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.timeout(400)
def test_leader_kill_during_an_iscsi_fio_verify_run(separate_icluster: IscsiCluster, tmp_path: Path) -> None:
    """fio (crc32c verify) through qemu-nbd's iSCSI initiator to a separate gateway; kill -9 of the node
    leading the volume's first group mid-run: fio sees no I/O error (the gateway retries on the new
    leader within its deadline) and every block it wrote verifies."""
    c = separate_icluster
    c.up()
    c.cli("volume", "create", "f", "--size", "64M")
    vol = next(v for v in c.status()["volumes"] if v["name"] == "f")
    group = vol["extent_groups"][0]
    with _bridge(c.target("f"), tmp_path) as uri:
        out = tmp_path / "fio.json"
        fio = subprocess.Popen(
            ["fio", "--name=kill", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=8",
             "--size=48M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--thread=1",
             "--output-format=json", f"--output={out}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait(lambda: fio.poll() is not None or _written(c, group) > 4 * MiB, 60, "fio to write")
            leader = next(g["leader"] for g in c.status()["groups"] if g["group"] == group)
            assert leader, "the volume's group has no leader"
            assert fio.poll() is None, "fio ended before the kill: nothing was tested"
            c.kill(f"n{leader}")
            killed_at = time.monotonic()
            rc = fio.wait(300)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        text = fio.stdout.read() if fio.stdout else ""
    assert rc == 0, f"fio failed after the leader kill: {text[-3000:]}"
    print(f"\nfio ran {time.monotonic() - killed_at:.1f}s after kill -9 of leader n{leader}, without an I/O error")
    res = json.loads(out.read_text()[out.read_text().index("{"):])
    job = res["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 48 * MiB and job["read"]["io_bytes"] >= 48 * MiB


def _written(c: IscsiCluster, group: int) -> int:
    g = next(g for g in c.status()["groups"] if g["group"] == group)
    return int(g.get("allocated_bytes") or 0)


class _Raw:
    """A minimal initiator session over a raw socket (ImmediateData=No, InitialR2T=Yes): SCSI commands with
    their R2T / Data-Out / Data-In handled, for what libiscsi's tools cannot send (PERSISTENT RESERVE)."""

    def __init__(self, portal: str, target: str, initiator: str, isid: int = 1) -> None:
        host, _, port = portal.rpartition(":")
        self.s = socket.create_connection((host, int(port)), timeout=10)
        keys = (f"InitiatorName={initiator}\0SessionType=Normal\0TargetName={target}\0ImmediateData=No\0"
                "InitialR2T=Yes\0MaxRecvDataSegmentLength=65536\0").encode()
        self.s.sendall(_pdu(0x43, 0x87, 1, keys, {8: bytes.fromhex("4000000000") + bytes([isid]),
                                                   24: struct.pack(">I", 1)}))
        rsp, _ = _recv_pdu(self.s)
        assert rsp[0] == 0x23 and rsp[36:38] == b"\0\0", f"login refused: {rsp[36:38].hex()}"
        self.cmdsn = 1
        self.itt = 10

    def scsi(self, cdb: bytes, data_out: bytes = b"", read_bytes: int = 0) -> tuple[int, bytes, bytes]:
        """(status, data-in, sense)."""
        self.itt += 1
        flags = 0x80 | (0x20 if data_out else 0) | (0x40 if read_bytes else 0) | 1
        edtl = len(data_out) or read_bytes
        self.s.sendall(_pdu(0x01, flags, self.itt, b"", {20: struct.pack(">II", edtl, self.cmdsn),
                                                         32: cdb.ljust(16, b"\0")}))
        self.cmdsn += 1
        data_in = b""
        while True:
            bhs, data = _recv_pdu(self.s)
            if bhs[0] == 0x31:  # R2T: send what it asks
                off, n = struct.unpack_from(">II", bhs, 40)
                self.s.sendall(_pdu(0x05, 0x80, self.itt, data_out[off : off + n],
                                    {20: bhs[20:24], 36: struct.pack(">II", 0, off)}))
            elif bhs[0] == 0x25:
                data_in += data
                if bhs[1] & 0x01:
                    return bhs[3], data_in, b""
            elif bhs[0] == 0x21:
                return bhs[3], data_in, data[2:] if data else b""
            else:
                raise AssertionError(f"unexpected opcode {bhs[0]:#x}")

    def close(self) -> None:
        self.s.close()


def _prout(sa: int, key: int, sa_key: int, rtype: int = 0) -> tuple[bytes, bytes]:
    cdb = bytes([0x5F, sa, rtype & 0x0F, 0, 0, 0, 0, 0, 24, 0])
    return cdb, struct.pack(">QQ", key, sa_key) + bytes(8)


PR_REGISTER, PR_RESERVE, PR_RELEASE = 0, 1, 2
WRITE_EXCLUSIVE = 1
RESERVATION_CONFLICT = 0x18
WRITE1 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0])  # WRITE(10) LBA 8, one block
READ1 = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0])


def _session(portal: str, target: str, initiator: str) -> _Raw:
    """A session whose first command runs: the exclusive attach may still be held by the gateway of a
    session just closed (it detaches when its last connection ends), so retry within a deadline."""
    deadline = time.monotonic() + 30
    while True:
        try:
            s = _Raw(portal, target, initiator)
            status, _, sense = s.scsi(bytes(6))  # TEST UNIT READY
            if status == 0 or (status == 2 and sense[2] & 0x0F == 6):  # GOOD, or a unit attention: attached
                return s
            s.close()
        except (ConnectionError, OSError, AssertionError):
            pass
        assert time.monotonic() < deadline, f"no session to {target} through {portal}"
        time.sleep(0.2)


def test_persistent_reservations_hold_across_gateways_and_restarts(icluster: IscsiCluster) -> None:
    """SPC-4 5.7: a WRITE EXCLUSIVE reservation taken through node 1's gateway binds an unregistered initiator
    that comes through node 2's gateway (RESERVATION CONFLICT on WRITE, READ allowed, READ KEYS shows the
    holder's key) and still after the whole cluster restarts: the state lives in the metadata group."""
    icluster.up()
    icluster.cli("volume", "create", "pr", "--size", "16M")
    portals = [g["iscsi"].removeprefix("iscsi://") for g in icluster.status()["gateways"] if g["iscsi"]]
    assert len(portals) == 3, portals
    target = f"{IQN}:pr"
    a = _session(portals[0], target, "iqn.2026-12.org.example:host-a")
    for cdb, param in (_prout(PR_REGISTER, 0, 0xA1), _prout(PR_RESERVE, 0xA1, 0, WRITE_EXCLUSIVE)):
        assert a.scsi(cdb, param)[0] == 0
    assert a.scsi(WRITE1, b"\xaa" * 512)[0] == 0
    a.close()

    def check_b(portal: str) -> None:
        b = _session(portal, target, "iqn.2026-12.org.example:host-b")
        status, data, _ = b.scsi(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_bytes=4096)  # READ KEYS
        assert status == 0 and struct.unpack_from(">I", data, 4)[0] == 8 and data[8:16] == struct.pack(">Q", 0xA1)
        status, data, _ = b.scsi(bytes([0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0]), read_bytes=4096)  # READ RESERVATION
        assert status == 0 and data[8:16] == struct.pack(">Q", 0xA1) and data[21] & 0x0F == WRITE_EXCLUSIVE
        assert b.scsi(WRITE1, b"\xbb" * 512)[0] == RESERVATION_CONFLICT
        status, data, _ = b.scsi(READ1, read_bytes=512)
        assert status == 0 and data == b"\xaa" * 512
        b.close()

    check_b(portals[1])  # another gateway
    icluster.cli("cluster", "down")
    icluster.up()
    check_b(portals[0])  # after every gateway restarted
    a = _session(portals[0], target, "iqn.2026-12.org.example:host-a")
    assert a.scsi(WRITE1, b"\xcc" * 512)[0] == 0  # the holder writes
    for cdb, param in (_prout(PR_RELEASE, 0xA1, 0, WRITE_EXCLUSIVE), _prout(PR_REGISTER, 0xA1, 0)):
        assert a.scsi(cdb, param)[0] == 0
    a.close()
    b = _session(portals[0], target, "iqn.2026-12.org.example:host-b")
    assert b.scsi(WRITE1, b"\xdd" * 512)[0] == 0  # released and unregistered: anyone writes again
    b.close()
