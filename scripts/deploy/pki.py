"""Credentials for a multi-machine federation, made with the ``cryptography`` package (no crypto of our own).

* a CA (``ca.crt``, ``ca.key``): EC P-384, self-signed, the only thing SuperNodes trust;
* the SuperLink's TLS certificate (``server.crt``, ``server.key``), signed by the CA, with a SAN for every
  address or name it is dialled on (an IP SAN for an IP, a DNS SAN for a name) and always 127.0.0.1: the
  SuperLink sits on loopback behind the Fleet front, and Flower's own SuperExec dials it there;
* per-party SuperNode key pairs (``NAME.key``, ``NAME.pub``) in the format Flower 1.42 needs for node
  authentication: EC on a NIST curve (P-384, as Flower's own ``generate_key_pairs``), OpenSSH private key
  (``flower-supernode --auth-supernode-private-key``) and OpenSSH public key
  (``flwr supernode register NAME.pub``). Flower refuses ed25519 and PEM keys
  (``flwr/supernode/cli/flower_supernode.py``, ``flwr/cli/supernode/register.py``).

Private keys are created with ``O_EXCL`` and mode 0600: an existing file is an error, never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlinear.common.errors import FedLinearError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
LOOPBACK = "127.0.0.1"
NIST_CURVES = (ec.SECP192R1, ec.SECP224R1, ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts
PARTY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def split_host(address: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    address = address.strip()
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def san_entries(addresses: Iterable[str]) -> list[x509.GeneralName]:
    """SubjectAlternativeName entries for the given addresses/names (deduplicated, 127.0.0.1 always)."""
    hosts: list[str] = []
    for address in [*addresses, LOOPBACK]:
        host = split_host(address)
        if not host:
            raise FedLinearError(f"--address '{address}': empty host")
        ip = as_ip(host)
        if ip is not None and ip.is_unspecified:
            raise FedLinearError(
                f"--address '{address}' is the wildcard bind address; give the addresses and names the "
                "parties will dial (127.0.0.1 is always included)"
            )
        if ip is None and not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise FedLinearError(f"--address '{address}': not an IP address or a DNS name")
        key = str(ip) if ip is not None else host.lower()
        if key not in hosts:
            hosts.append(key)
    names: list[x509.GeneralName] = []
    for host in hosts:
        ip = as_ip(host)
        names.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(host))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "fedlinear CA", days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    addresses: Iterable[str],
    days: int = 365,
    not_before: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SuperLink TLS certificate signed by the CA, with SANs for ``addresses`` and 127.0.0.1."""
    sans = san_entries(addresses)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (utcnow() - datetime.timedelta(minutes=5))
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedlinear SuperLink {first}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False  # type: ignore[arg-type]
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_node_keys(curve: ec.EllipticCurve | None = None, comment: str = "") -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) for SuperNode authentication."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def write_new(path: str, data: bytes, private: bool) -> None:
    """Create ``path`` (never overwrite): mode 0600 for private keys, 0644 otherwise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise FedLinearError(f"{path} already exists; refusing to overwrite it (move it away or use another --out)") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # whatever the umask


def load_cert(path: str) -> x509.Certificate:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise FedLinearError(f"{path}: cannot read the certificate ({exc.strerror})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FedLinearError(f"{path}: not a PEM X.509 certificate") from None


def load_private_key_pem(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        raise FedLinearError(f"{path}: cannot read the key ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise FedLinearError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedLinearError(f"{path}: not an EC private key")
    return key


def make_credentials(
    out: str, addresses: list[str], parties: list[str], days: int = 365
) -> list[str]:
    """Write the CA (unless ``out`` already holds one), the server certificate (if ``addresses``)
    and a key pair per party. Every target is checked before anything is written; returns the
    paths written, as lines for the user."""
    os.makedirs(out, exist_ok=True)
    ca_crt, ca_key = os.path.join(out, CA_CERT), os.path.join(out, CA_KEY)
    have_crt, have_key = os.path.exists(ca_crt), os.path.exists(ca_key)
    if have_crt != have_key:
        missing = ca_key if have_crt else ca_crt
        raise FedLinearError(f"{missing} is missing but its pair exists; a CA needs both {CA_CERT} and {CA_KEY}")
    reuse_ca = have_crt and have_key
    for name in parties:
        if not PARTY_NAME.match(name) or name in ("ca", "server"):
            raise FedLinearError(f"--party '{name}': use letters, digits, '.', '_' or '-' (and not 'ca' or 'server')")
    if len(set(parties)) != len(parties):
        raise FedLinearError("--party names must be distinct")
    targets = []
    if addresses:
        targets += [os.path.join(out, SERVER_CERT), os.path.join(out, SERVER_KEY)]
        san_entries(addresses)  # validate before writing anything
    for name in parties:
        targets += [os.path.join(out, f"{name}.key"), os.path.join(out, f"{name}.pub")]
    if not addresses and not parties and reuse_ca:
        raise FedLinearError(f"{ca_crt} already exists; refusing to overwrite it (give --address or --party to add to it)")
    for path in targets:
        if os.path.exists(path):
            raise FedLinearError(f"{path} already exists; refusing to overwrite it (move it away or use another --out)")

    written: list[str] = []
    if reuse_ca:
        ca_cert = load_cert(ca_crt)
        ca_private = load_private_key_pem(ca_key)
        written.append(f"using the existing CA {ca_crt}")
    else:
        ca_private, ca_cert = make_ca(days=days)
        write_new(ca_key, _pem_key(ca_private), private=True)
        write_new(ca_crt, _pem_cert(ca_cert), private=False)
        written += [f"{ca_crt}  CA certificate (give it to every party)", f"{ca_key}  CA key (keep it offline; 0600)"]
    if addresses:
        key, cert = make_server_cert(ca_private, ca_cert, addresses, days=days)
        write_new(os.path.join(out, SERVER_KEY), _pem_key(key), private=True)
        write_new(os.path.join(out, SERVER_CERT), _pem_cert(cert), private=False)
        sans = ", ".join(str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        written.append(f"{os.path.join(out, SERVER_CERT)}  SuperLink certificate, SANs: {sans}")
        written.append(f"{os.path.join(out, SERVER_KEY)}  SuperLink key (0600)")
    for name in parties:
        private, public = make_node_keys(comment=f"fedlinear-{name}")
        write_new(os.path.join(out, f"{name}.key"), private, private=True)
        write_new(os.path.join(out, f"{name}.pub"), public, private=False)
        written.append(
            f"{os.path.join(out, name + '.key')}  party '{name}' SuperNode key (EC P-384, OpenSSH; 0600; give it to the party only)"
        )
        written.append(f"{os.path.join(out, name + '.pub')}  its public key (flwr supernode register ...)")
    return written


def cert_sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate's SAN extension."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ext.get_values_for_type(x509.DNSName), [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]


def covers(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's SANs cover ``host`` as a TLS client verifies it (IP SAN for IPs)."""
    dns, ips = cert_sans(cert)
    ip = as_ip(host)
    if ip is not None:
        return str(ip) in ips
    host = host.lower().rstrip(".")
    for name in dns:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


def public_key_fingerprint(path: str) -> str:
    """OpenSSH ``SHA256:`` fingerprint of ``NAME.pub`` (as ``ssh-keygen -lf`` and the Fleet front print it)."""
    import base64
    import hashlib

    with open(path, "rb") as handle:
        fields = handle.read().split()
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (IndexError, ValueError) as exc:
        raise FedLinearError(f"{path}: not an OpenSSH public key") from exc
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def rotate_party(out: str, name: str) -> list[str]:
    """Replace party ``name``'s key pair: the old ``NAME.key``/``NAME.pub`` are kept (never deleted) as
    ``NAME.revoked-<UTC time>.key/.pub`` (so the Fleet front still names the old key if it shows up
    again), a new pair is written, and the lines say what the operator does next."""
    if not PARTY_NAME.match(name) or name in ("ca", "server"):
        raise FedLinearError(f"--rotate '{name}': not a party name")
    key, pub = os.path.join(out, f"{name}.key"), os.path.join(out, f"{name}.pub")
    if not os.path.exists(pub):
        raise FedLinearError(f"{pub}: no such file; --rotate replaces an existing party's key (use --party for a new one)")
    old = public_key_fingerprint(pub)
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    moved_key, moved_pub = os.path.join(out, f"{name}.revoked-{stamp}.key"), os.path.join(out, f"{name}.revoked-{stamp}.pub")
    for path in (moved_key, moved_pub):
        if os.path.exists(path):
            raise FedLinearError(f"{path} already exists; wait a second and retry")
    private, public = make_node_keys(comment=f"fedlinear-{name}")
    if os.path.exists(key):
        os.rename(key, moved_key)
    os.rename(pub, moved_pub)
    write_new(key, private, private=True)
    write_new(pub, public, private=False)
    return [
        f"{moved_pub}  the old public key of '{name}' ({old}), kept so the Fleet front names it if it comes back",
        f"{key}  party '{name}''s new SuperNode key (0600; give it to the party only, over a channel you trust)",
        f"{pub}  its public key ({public_key_fingerprint(pub)})",
        f"next, on the server: flwr supernode unregister NODE_ID CONNECTION  (NODE_ID: the old key's node, named in the "
        f"Fleet front's log and node-addresses.jsonl as '{old}'), then flwr supernode register {pub} CONNECTION",
    ]
