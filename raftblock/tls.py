"""TLS for raftblock's TCP links (the ssl module): a lab CA and certificates (`raftblock cert init`), and the
contexts every process builds from its `[tls]` config table.

Identities: every certificate is signed by the cluster's CA and names its holder in a DNS subjectAltName:
`node-N.raftblock` (storage node N; its embedded gateway uses the same), `meta-N.raftblock` (metadata member
N), `gateway-ID.raftblock` (a separate gateway), `admin.raftblock` (the operators' CLI), `host-NAME.raftblock`
(an NBD host). A server certificate also carries the IP addresses and host names it is reached by, which NBD
clients (qemu, libnbd) check.

Rules:
1. Internal links (the data port, the metadata admin port) are mutual TLS: both sides present a certificate of
   the cluster CA; the dialer checks the name of the node it meant to reach (`node-N.raftblock`), and the
   data port checks that a peer's HELLO names the node its certificate is for (node/transport.py rule 4).
2. NBD (STARTTLS, gateway/nbd.py) requires TLS once a gateway has `[tls]`, and a client certificate of the
   cluster CA (a host is authenticated by its certificate); iSCSI has CHAP.
3. TLS 1.2 at least; the ssl module's default ciphers. Keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAIN = "raftblock"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
VALID_DAYS = 3650


def node_name(node_id: int) -> str:
    return f"node-{node_id}.{DOMAIN}"


def meta_name(meta_id: int) -> str:
    return f"meta-{meta_id}.{DOMAIN}"


def gateway_name(gateway_id: str) -> str:
    return f"gateway-{gateway_id}.{DOMAIN}"


ADMIN_NAME = f"admin.{DOMAIN}"


def host_name(name: str) -> str:
    return f"host-{name}.{DOMAIN}"


@dataclass(frozen=True)
class TlsConfig:
    """A process's `[tls]` table: the cluster CA, and its own certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_table(cls, table: dict[str, Any] | None, base: Path | None = None) -> TlsConfig | None:
        if not table:
            return None
        try:
            paths = [Path(str(table[k])) for k in ("ca", "cert", "key")]
        except KeyError as e:
            raise ValueError(f"[tls] needs ca, cert and key (missing {e.args[0]})") from None
        if base is not None:
            paths = [p if p.is_absolute() else base / p for p in paths]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"[tls]: {p} is not a file")
        return cls(*paths)

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Checks the server's name against the CA (pass server_hostname=node_name(N) and so on) and
        presents this process's certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


# -- the process's identity ----------------------------------------------------------------------------------------
_identity: TlsConfig | None = None
_contexts: dict[str, ssl.SSLContext] = {}


def set_identity(cfg: TlsConfig | None) -> None:
    """This process's `[tls]` (rule 1): once set, its data-port, admin-port and metadata-client links use TLS.
    Set once at start by each process (node, metadata node, gateway, the CLI from the cluster file)."""
    global _identity
    _identity = cfg
    _contexts.clear()


def identity() -> TlsConfig | None:
    return _identity


def server_ctx() -> ssl.SSLContext | None:
    """The process's mutual-TLS server context (None without an identity)."""
    if _identity is None:
        return None
    if "server" not in _contexts:
        _contexts["server"] = _identity.server_context()
    return _contexts["server"]


def client_ctx(check_name: bool = True) -> ssl.SSLContext | None:
    """`check_name` False: any certificate of the cluster CA (a gateway's admin port, whose id the caller may
    not know; the HMAC challenge behind it names no one either)."""
    if _identity is None:
        return None
    key = "client" if check_name else "client-any"
    if key not in _contexts:
        ctx = _identity.client_context()
        ctx.check_hostname = check_name
        _contexts[key] = ctx
    return _contexts[key]


def peer_names(ssl_object: Any) -> set[str]:
    """The DNS names of the certificate the other side presented (verified by the handshake)."""
    if ssl_object is None:
        return set()
    cert = ssl_object.getpeercert()
    if not cert:
        return set()
    return {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}


# -- a lab CA (`raftblock cert init`) -----------------------------------------------------------------------------
def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raftblock"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def init_ca(out: Path, cluster: str = "") -> tuple[Path, Path]:
    """A new CA in `out` (ca-cert.pem, ca-key.pem 0600); an existing one is kept."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(f"raftblock cluster CA {cluster}".strip())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue(out: Path, ca_dir: Path, name: str, dns: list[str], ips: list[str] = ()) -> tuple[Path, Path]:  # type: ignore[assignment]
    """A certificate for `name` (its identity, first DNS name) and the other names and addresses it is reached
    by, signed by the CA in `ca_dir`: out/NAME-cert.pem and out/NAME-key.pem (0600). Usable as a server and as a
    client (mutual TLS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys([name, *dns])]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(ips)]
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    base = name.removesuffix(f".{DOMAIN}")
    cert_path, key_path = out / f"{base}-cert.pem", out / f"{base}-key.pem"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def nbd_client_dir(out: Path, ca_dir: Path, host: str) -> Path:
    """A directory as qemu's `tls-creds-x509` and libnbd's `tls-certificates` read it (ca-cert.pem,
    client-cert.pem, client-key.pem) for NBD host `host`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_dir / CA_CERT, out / CA_CERT)
    cert, key = issue(out, ca_dir, host_name(host), [])
    cert.replace(out / "client-cert.pem")
    key.replace(out / "client-key.pem")
    return out
