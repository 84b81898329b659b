"""Checks that turn what stock Flower 1.42 makes into hangs or obscure errors into one line each.

Every check returns a list of problems, each one line that names the file (and the connection or the
address) at fault and says what to do. Nothing here changes a file. What is checked:

* a certificate that is unreadable, expired or not yet valid, or not signed by the given CA
  (a SuperNode trusting another CA retries its TLS handshake; ``flwr run`` fails obscurely);
* a SuperLink certificate whose SANs do not cover the address it is dialled on (an IP needs an IP SAN;
  without 127.0.0.1 Flower's own SuperExec cannot connect and runs stay ``pending`` forever);
* a SuperNode key in the wrong format (ed25519, RSA, PEM/PKCS#8, a public key, a passphrase), or readable
  by other users;
* a Flower connection file (``$FLWR_HOME/config.toml``) with a relative or missing ``root-certificates``
  path (Flower rejects the whole file for a relative one);
* optionally, a live TLS handshake with the server: not TLS at all, another CA, a name not in the
  certificate, nothing listening.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import tomllib

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedlinear.common.errors import FedLinearError
from fedlinear.scripts.deploy import pki

KEY_HINT = "Flower needs an EC key on a NIST curve in OpenSSH format (make one with 'fedlinear certs --party NAME')"


def _read(path: str) -> bytes | str:
    """The file's bytes, or a one-line problem."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return f"{path}: no such file"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror})"


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def check_certificate(
    path: str, ca_path: str | None = None, hosts: list[str] | None = None, what: str = "certificate"
) -> list[str]:
    """Validity period, issuer (when ``ca_path``), SAN coverage of ``hosts``."""
    data = _read(path)
    if isinstance(data, str):
        return [data]
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        return [f"{path}: not a PEM X.509 {what}"]
    problems = []
    now = pki.utcnow()
    if cert.not_valid_after_utc < now:
        problems.append(f"{path}: {what} expired on {_when(cert.not_valid_after_utc)}; make a new one")
    elif cert.not_valid_before_utc > now:
        problems.append(
            f"{path}: {what} is not valid before {_when(cert.not_valid_before_utc)} (check this machine's clock)"
        )
    if ca_path:
        ca_data = _read(ca_path)
        if isinstance(ca_data, str):
            return [*problems, ca_data]
        try:
            ca = x509.load_pem_x509_certificate(ca_data)
        except ValueError:
            return [*problems, f"{ca_path}: not a PEM X.509 CA certificate"]
        if cert.fingerprint(cert.signature_hash_algorithm or _sha256()) != ca.fingerprint(
            ca.signature_hash_algorithm or _sha256()
        ):
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                problems.append(
                    f"{path}: {what} is not signed by the CA in {ca_path} (issuer '{cert.issuer.rfc4514_string()}'); "
                    "SuperNodes trusting that CA will refuse it"
                )
    for host in hosts or []:
        if not pki.covers(cert, host):
            dns, ips = pki.cert_sans(cert)
            have = ", ".join(dns + ips) or "none"
            kind = "an IP SAN" if pki.as_ip(host) else "a DNS SAN"
            problems.append(f"{path}: {what} does not cover '{host}' (needs {kind}; its SANs: {have})")
    return problems


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def check_ca(path: str) -> list[str]:
    problems = check_certificate(path, what="CA certificate")
    if problems:
        return problems
    with open(path, "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return [f"{path}: not a CA certificate (no basicConstraints CA:TRUE); give the CA's certificate (ca.crt)"]
    return []


def check_server_key(cert_path: str, key_path: str) -> list[str]:
    problems = check_permissions(key_path)
    data = _read(key_path)
    if isinstance(data, str):
        return [data]
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return [*problems, f"{key_path}: not an unencrypted PEM private key"]
    cert_data = _read(cert_path)
    if isinstance(cert_data, bytes):
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except ValueError:
            return problems
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            problems.append(f"{key_path}: does not belong to the certificate {cert_path}")
    return problems


def check_permissions(path: str) -> list[str]:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return []
    if mode & 0o077:
        return [f"{path}: private key is accessible to other users (mode {mode:04o}); run 'chmod 600 {path}'"]
    return []


def check_node_key(path: str) -> list[str]:
    """A SuperNode private key as ``flower-supernode --auth-supernode-private-key`` needs it."""
    data = _read(path)
    if isinstance(data, str):
        return [data]
    text = data.lstrip()
    if text.startswith((b"ecdsa-sha2-", b"ssh-")):
        return [f"{path}: is a public key; give the private key (the .key file, not the .pub)"]
    if text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except TypeError:
            return [f"{path}: is passphrase-protected; Flower reads unencrypted keys only"]
        except (ValueError, UnsupportedAlgorithm) as exc:
            return [f"{path}: unreadable OpenSSH private key ({exc}); {KEY_HINT}"]
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return [f"{path}: is an Ed25519 key; Flower refuses it: {KEY_HINT}"]
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return [f"{path}: is a {type(key).__name__.removesuffix('PrivateKey').lstrip('_')} key; {KEY_HINT}"]
        if not isinstance(key.curve, pki.NIST_CURVES):
            return [f"{path}: EC curve {key.curve.name} is not a NIST curve; {KEY_HINT}"]
        return check_permissions(path)
    if text.startswith(b"-----BEGIN"):
        kind = "PEM"
        try:
            key = serialization.load_pem_private_key(data, password=None)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                kind = "PEM Ed25519"
            elif isinstance(key, rsa.RSAPrivateKey):
                kind = "PEM RSA"
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                kind = f"PEM EC ({key.curve.name})"
        except (ValueError, TypeError, UnsupportedAlgorithm):
            pass
        return [
            f"{path}: is a {kind} key, not OpenSSH format; Flower refuses it: {KEY_HINT} "
            f"(or convert an EC key with 'ssh-keygen -p -N \"\" -f {path}')"
        ]
    return [f"{path}: not a private key; {KEY_HINT}"]


def check_public_key(path: str) -> list[str]:
    """A SuperNode public key as ``flwr supernode register`` needs it."""
    data = _read(path)
    if isinstance(data, str):
        return [data]
    if data.lstrip().startswith(b"-----BEGIN"):
        return [f"{path}: is a PEM file, not an OpenSSH public key line; give the .pub written by 'fedlinear certs'"]
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        return [f"{path}: not an OpenSSH public key; {KEY_HINT}"]
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return [f"{path}: is a {type(key).__name__.removesuffix('PublicKey').lstrip('_')} key; {KEY_HINT}"]
    if not isinstance(key.curve, pki.NIST_CURVES):
        return [f"{path}: EC curve {key.curve.name} is not a NIST curve; {KEY_HINT}"]
    return []


def check_flwr_config(path: str, probe: bool = False, timeout: float = 5.0) -> list[str]:
    """A Flower connection file: TOML, absolute and existing ``root-certificates``, optional TLS probe."""
    data = _read(path)
    if isinstance(data, str):
        return [data]
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return [f"{path}: not valid TOML ({exc}); Flower cannot read any connection from it"]
    links = doc.get("superlink", {})
    if not isinstance(links, dict):
        return [f"{path}: [superlink] must be a table"]
    problems = []
    default = links.get("default")
    connections = {k: v for k, v in links.items() if isinstance(v, dict)}
    if default is not None and default not in connections:
        problems.append(f"{path}: default connection '{default}' has no [superlink.{default}] section")
    for name, conn in connections.items():
        where = f"{path}: [superlink.{name}]"
        roots = conn.get("root-certificates")
        insecure = conn.get("insecure", False)
        if roots is None:
            if not insecure and conn.get("address") and probe:
                problems += _probe_problems(where, conn["address"], None, timeout)
            continue
        if not isinstance(roots, str):
            problems.append(f"{where} root-certificates must be a string path")
            continue
        if not os.path.isabs(roots):
            problems.append(
                f"{where} root-certificates = '{roots}' is a relative path; Flower needs an absolute one and "
                f"rejects the whole file otherwise (use '{os.path.abspath(roots)}' if that is the file)"
            )
            continue
        if insecure:
            problems.append(f"{where} sets both insecure = true and root-certificates; Flower refuses that")
            continue
        ca_problems = check_ca(roots)
        problems += [f"{where}: {p}" for p in ca_problems]
        if probe and not ca_problems and conn.get("address"):
            problems += _probe_problems(where, conn["address"], roots, timeout)
    return problems


def _probe_problems(where: str, address: str, ca_path: str | None, timeout: float) -> list[str]:
    try:
        probe_tls(address, ca_path, timeout)
    except FedLinearError as exc:
        return [f"{where}: {exc}"]
    return []


def parse_address(address: str) -> tuple[str, int]:
    host = pki.split_host(address)
    port_text = address.rsplit(":", 1)[1] if (":" in address and not address.endswith("]")) else ""
    if address.count(":") > 1 and not address.startswith("["):
        raise FedLinearError(f"'{address}': write an IPv6 address as [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise FedLinearError(f"'{address}': expected HOST:PORT") from None
    return host, port


def probe_tls(address: str, ca_path: str | None, timeout: float = 5.0) -> None:
    """Handshake with ``address`` as a SuperNode would (chain to ``ca_path`` + hostname); raise one line."""
    host, port = parse_address(address)
    ctx = ssl.create_default_context(cafile=ca_path) if ca_path else ssl.create_default_context()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise FedLinearError(f"{address}: no answer within {timeout:g} s (firewall, wrong address?)") from None
    except ConnectionRefusedError:
        raise FedLinearError(f"{address}: connection refused (nothing listens there; is the SuperLink up?)") from None
    except OSError as exc:
        raise FedLinearError(f"{address}: cannot connect ({exc.strerror or exc})") from None
    with sock:
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            source = ca_path or "the system trust store"
            if exc.verify_code == 62 or "hostname" in (exc.verify_message or "").lower() or "IP address mismatch" in (
                exc.verify_message or ""
            ):
                raise FedLinearError(
                    f"{address}: the server's certificate does not cover '{host}' ({exc.verify_message}); "
                    f"dial an address in its SANs or remake it with 'fedlinear certs --address {host}'"
                ) from None
            if exc.verify_code == 10:
                raise FedLinearError(f"{address}: the server's certificate has expired") from None
            raise FedLinearError(
                f"{address}: the server's certificate is not signed by the CA in {source} ({exc.verify_message}); "
                "this party holds another federation's CA"
            ) from None
        except ssl.SSLError as exc:
            if "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc) or "packet length" in str(exc):
                raise FedLinearError(
                    f"{address}: does not speak TLS (a plaintext SuperLink started with --insecure?); "
                    "fedlinear parties connect with TLS only"
                ) from None
            raise FedLinearError(f"{address}: TLS handshake failed ({exc.reason or exc})") from None
        except (ConnectionResetError, TimeoutError, OSError) as exc:
            raise FedLinearError(f"{address}: TLS handshake failed ({exc})") from None


def raise_if(problems: list[str]) -> None:
    """Raise the problems as one FedLinearError whose lines are the problems."""
    if problems:
        raise FedLinearError("\n".join(problems))
