"""Keys and certificates of a federation, made with ``cryptography``.

``create_keys(out_dir, nodes, server_hosts)`` writes::

    out_dir/
      ca.pem            CA certificate: give to every node (trust root of the server's TLS certificate)
      ca.key            CA private key: keep offline; needed only to issue a new server certificate
      server.pem        server TLS certificate, SANs = server_hosts + localhost, 127.0.0.1
      server.key        server TLS private key (server only)
      allowlist.txt     one line per node: "<name> ed25519:<base64 raw public key> [observer] [revoked]"
                        (server only); "observer" marks the operator's key of `fedtune status`, which may
                        list every node but never register as a training node; append " revoked" to a
                        line to refuse that node from its next call on
      nodes/<name>.key  Ed25519 private key of the node, PKCS#8 PEM (give to that node only)
      nodes/<name>.pub  its public key, "ed25519:<base64>"
      sites/<name>/     what to give that site: ca.pem and nodes/<name>.key (its client.keys_dir)
      peers/<name>.pem  with ``peers``: the gossip peer's TLS certificate (signed by the CA, named <name>, valid
      peers/<name>.key  for the server hosts too) and its key; copied with allowlist.txt into sites/<name>/,
                        which is then also that peer's gossip.keys_dir

Private keys are written with mode 0600.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.names import check_name, name_problem

VALID_DAYS = 3650
PUB_PREFIX = "ed25519:"


@dataclass(frozen=True)
class AllowEntry:
    node: str
    public_key: bytes
    revoked: bool = False
    observer: bool = False
    """The operator's key (``fedtune status``): may list every node, may not train."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca(common_name: str = "fedtune federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (ECDSA P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def create_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], *, peer: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate signed by the CA, valid for ``hosts`` (DNS names or IP addresses). With
    ``peer``, a gossip peer's certificate: named ``peer`` (subject and first name), for servers and clients
    (mutual TLS).

    Raises:
        ValueError: empty ``hosts``.
    """
    if not hosts:
        raise ValueError("server_hosts must name at least one hostname or IP address")
    sans: list[x509.GeneralName] = []
    hosts = [peer, *hosts] if peer is not None else hosts
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH] + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if peer is not None else [])), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def public_key_line(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUB_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text: str) -> bytes:
    """Raw 32-byte key from ``ed25519:<base64>``. Raises: ValueError."""
    if not text.startswith(PUB_PREFIX):
        raise ValueError(f"public key must start with {PUB_PREFIX!r}")
    raw = base64.b64decode(text[len(PUB_PREFIX):], validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return raw


def create_node_key(out_dir: str | Path, node: str) -> Ed25519PrivateKey:
    """Write ``nodes/<node>.key`` and ``nodes/<node>.pub``. Raises: ValueError for a bad node name
    (``fedtune.names``)."""
    check_name(node)
    key = Ed25519PrivateKey.generate()
    nodes = Path(out_dir) / "nodes"
    _write(nodes / f"{node}.key", _pem_key(key), private=True)
    _write(nodes / f"{node}.pub", (public_key_line(key) + "\n").encode())
    return key


def load_node_key(path: str | Path) -> Ed25519PrivateKey:
    """Raises: TypeError when the file does not hold an Ed25519 private key."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} does not hold an Ed25519 private key")
    return key


def read_allowlist(path: str | Path) -> dict[str, AllowEntry]:
    """Parse ``allowlist.txt`` (``#`` comments allowed). Raises: ValueError naming the bad line."""
    out: dict[str, AllowEntry] = {}
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        flags = parts[2:]
        if len(parts) < 2 or len(set(flags)) != len(flags) or not set(flags) <= {"observer", "revoked"}:
            raise ValueError(f"{path}:{i}: expected '<node> ed25519:<base64> [observer] [revoked]'")
        try:
            out[check_name(parts[0])] = AllowEntry(parts[0], parse_public_key(parts[1]), "revoked" in flags,
                                                   "observer" in flags)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    return out


def write_allowlist(path: str | Path, entries: list[AllowEntry]) -> None:
    lines = ["# fedtune node allow-list: <node> ed25519:<base64 public key> [observer] [revoked]"]
    for e in entries:
        pub = PUB_PREFIX + base64.b64encode(e.public_key).decode()
        lines.append(f"{e.node} {pub}" + (" observer" if e.observer else "") + (" revoked" if e.revoked else ""))
    _write(Path(path), ("\n".join(lines) + "\n").encode())


def revoke_node(allowlist: str | Path, node: str) -> None:
    """Mark ``node`` revoked in the allow-list. Raises: ValueError for a bad name, KeyError when it is not
    listed."""
    check_name(node)
    entries = read_allowlist(allowlist)
    if node not in entries:
        raise KeyError(f"node {node!r} is not in {allowlist}")
    entries[node] = dataclasses.replace(entries[node], revoked=True)
    write_allowlist(allowlist, list(entries.values()))


LOOPBACK_HOSTS = ["localhost", "127.0.0.1"]


def certificate_hosts(cert_file: str | Path) -> list[str]:
    """The names and addresses a server certificate is valid for (its subject alternative names)."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
        str(v) for v in sans.get_values_for_type(x509.IPAddress)]


def create_keys(out_dir: str | Path, nodes: list[str], server_hosts: list[str] | None = None,
                loopback: bool = True, observers: list[str] | None = None, peers: bool = False) -> Path:
    """Create a CA, a server certificate and one Ed25519 key per node under ``out_dir`` (layout above),
    and for each node the folder to give that site, ``sites/<node>/`` (``ca.pem``, ``nodes/<node>.key``).
    ``observers``: keys made (or already listed) for ``fedtune status`` only, marked ``observer``.

    The server certificate is valid for ``server_hosts`` plus, with ``loopback``, localhost and 127.0.0.1
    (a one-machine trial keeps working). Calling it again on the same folder adds nodes (existing keys are
    kept) and, when ``server_hosts`` asks for other names than the certificate has, issues a new server
    certificate from the same CA (nodes keep their ``ca.pem``).

    Raises:
        ValueError: a bad node name, no host at all, or a new certificate needed without ``ca.key``.
    """
    observers = observers or []
    bad = [p for p in map(name_problem, [*nodes, *observers]) if p is not None]
    if bad:  # before anything is written: a bad name never reaches allowlist.txt
        raise ValueError("; ".join(bad))
    out = Path(out_dir)
    hosts = list(dict.fromkeys([*(server_hosts or []), *(LOOPBACK_HOSTS if loopback or not server_hosts else [])]))
    if not (out / "ca.pem").exists():
        ca_key, ca_cert = create_ca()
        _write(out / "ca.key", _pem_key(ca_key), private=True)
        _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    reissue = not (out / "server.pem").exists() or (
        server_hosts is not None and set(certificate_hosts(out / "server.pem")) != set(hosts))
    if reissue:
        signer = _ca_signer(out, f"a server certificate for {', '.join(hosts)}")
        srv_key, srv_cert = create_server_cert(signer, x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()),
                                               hosts)
        _write(out / "server.key", _pem_key(srv_key), private=True)
        _write(out / "server.pem", srv_cert.public_bytes(serialization.Encoding.PEM))
    allow = out / "allowlist.txt"
    entries = read_allowlist(allow) if allow.exists() else {}
    for node in [*nodes, *observers]:
        if node not in entries:
            key = create_node_key(out, node)
            entries[node] = AllowEntry(node, parse_public_key(public_key_line(key)))
        if node in observers:
            entries[node] = dataclasses.replace(entries[node], observer=True)
    write_allowlist(allow, list(entries.values()))
    if peers:
        _peer_certs(out, [n for n in nodes if n not in observers], hosts)
    for node in entries:
        if (out / "nodes" / f"{node}.key").is_file():
            site = out / "sites" / node
            _write(site / "ca.pem", (out / "ca.pem").read_bytes())
            _write(site / "nodes" / f"{node}.key", (out / "nodes" / f"{node}.key").read_bytes(), private=True)
            if (out / "peers" / f"{node}.pem").is_file():
                for suffix, private in ((".pem", False), (".key", True)):
                    name = f"{node}{suffix}"
                    _write(site / "peers" / name, (out / "peers" / name).read_bytes(), private=private)
                _write(site / "allowlist.txt", allow.read_bytes())
    return out


def _ca_signer(out: Path, what: str) -> ec.EllipticCurvePrivateKey:
    """The CA's private key, to issue ``what``. Raises: ValueError when it is missing or not the CA's."""
    if not (out / "ca.key").exists():
        raise ValueError(f"{out}/ca.key is missing (kept offline?): put it back to issue {what}")
    signer = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out}/ca.key is not the CA key `fedtune keys` writes")  # noqa: TRY004 (bad input)
    return signer


def _peer_certs(out: Path, nodes: list[str], hosts: list[str]) -> None:
    """``peers/<node>.pem`` and ``.key`` for each of ``nodes`` (gossip peers' mutual TLS), issued by the CA."""
    signer = _ca_signer(out, "the peers' certificates")
    ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for node in nodes:
        key, cert = create_server_cert(signer, ca_cert, hosts, peer=node)
        _write(out / "peers" / f"{node}.key", _pem_key(key), private=True)
        _write(out / "peers" / f"{node}.pem", cert.public_bytes(serialization.Encoding.PEM))
