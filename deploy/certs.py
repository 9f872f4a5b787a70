"""A private CA, the SuperLink's TLS certificate and SuperNode key pairs.

Everything is made with the ``cryptography`` package (a Flower dependency), so
no ``openssl`` binary is needed. The SuperLink certificate names every address
nodes and the ``flwr`` CLI use to reach it in its subjectAltName, plus the
loopback names: Flower's own SuperExec connects to the SuperLink's Runtime API
through 127.0.0.1 when the SuperLink listens on 0.0.0.0.

SuperNode keys are EC P-384 key pairs in OpenSSH format, the format that
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
read.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CertificateError(ValueError):
    """A certificate or key is missing, malformed, or does not fit its use."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where ``create_certificates`` wrote the CA and the SuperLink certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """One SuperNode's key pair."""

    private_key: Path
    public_key: Path


def parse_host(host: str) -> IpAddress | None:
    """Return ``host`` as an IP address, or None when it is a DNS name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """The subjectAltName entries for ``hosts`` plus the loopback names, without duplicates."""
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in [*hosts, *LOOPBACK_NAMES]:
        name = host.strip().strip("[]").lower()
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        address = parse_host(name)
        entries.append(x509.IPAddress(address) if address else x509.DNSName(name))
    return entries


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcoord"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("fedcoord CA")
    certificate = (
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
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return certificate, key


def create_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for the SuperLink, valid for ``hosts`` and loopback."""
    if not hosts:
        raise CertificateError("give at least one --host: the address nodes use for the SuperLink")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0].strip("[]")))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return certificate, key


def create_certificates(out_dir: Path, hosts: list[str], force: bool = False) -> CertificatePaths:
    """Write a CA (reused if present) and a SuperLink certificate for ``hosts``.

    An existing CA in ``out_dir`` is kept, so adding an address to the SuperLink
    certificate does not invalidate the CA the nodes already trust; ``force``
    makes a new CA as well.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertificatePaths(
        out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY
    )
    if force or not (paths.ca_cert.is_file() and paths.ca_key.is_file()):
        ca_cert, ca_key = create_ca()
        _write_private(paths.ca_key, _pem_private(ca_key))
        paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_cert = load_certificate(paths.ca_cert)
        loaded = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{paths.ca_key} is not an EC private key")
        ca_key = loaded
    server_cert, server_key = create_server_certificate(ca_cert, ca_key, hosts)
    _write_private(paths.server_key, _pem_private(server_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def create_node_keys(out_dir: Path, name: str, force: bool = False) -> NodeKeyPaths:
    """Write ``out_dir/name`` (private, OpenSSH) and ``out_dir/name.pub`` (public)."""
    paths = NodeKeyPaths(out_dir / name, out_dir / f"{name}.pub")
    if paths.private_key.exists() and not force:
        raise CertificateError(
            f"{paths.private_key} exists; a node keeps its key (its identity on the "
            "SuperLink). Use --force to replace it, then register the new public key."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(paths.private_key, private)
    paths.public_key.write_bytes(public + f" fedcoord-{name}\n".encode())
    return paths


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate; a clear error if it is missing or not a certificate."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read certificate {path}: {error.strerror}") from error
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise CertificateError(f"{path} is not a PEM certificate: {error}") from error


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a SuperNode's private key as Flower does (OpenSSH EC); clear errors otherwise."""
    try:
        data = path.expanduser().read_bytes()
    except OSError as error:
        raise CertificateError(f"cannot read node key {path}: {error.strerror}") from error
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError) as error:
        raise CertificateError(
            f"{path} is not an unencrypted OpenSSH private key ({error}); "
            "make one with `python -m deploy keys NAME`"
        ) from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an EC key; Flower's node authentication needs EC")
    return key


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [str(name) for name in extension.value.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress)]
    return names


def certificate_covers(certificate: x509.Certificate, host: str) -> bool:
    """Whether ``host`` (an IP address or DNS name) is in the subjectAltName."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return False
    address = parse_host(host)
    if address is not None:
        return address in extension.value.get_values_for_type(x509.IPAddress)
    wanted = host.lower().rstrip(".")
    for name in extension.value.get_values_for_type(x509.DNSName):
        pattern = name.lower().rstrip(".")
        if pattern == wanted:
            return True
        wildcard = pattern.startswith("*.") and wanted.count(".") == pattern.count(".")
        if wildcard and wanted.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def validate_certificate_covers(certificate: x509.Certificate, host: str, source: str) -> None:
    """Raise ``CertificateError`` naming the certificate's names when ``host`` is not one."""
    if certificate_covers(certificate, host):
        return
    names = ", ".join(certificate_names(certificate)) or "none"
    raise CertificateError(
        f"the SuperLink certificate ({source}) does not match the address {host!r}: it is "
        f"valid for {names}. Connect through one of those names, or make a new certificate "
        f"that includes it on the SuperLink machine (python -m deploy certs --host {host} ...) "
        "and restart the SuperLink."
    )


def validate_signed_by(certificate: x509.Certificate, ca: x509.Certificate, source: str) -> None:
    """Raise ``CertificateError`` unless ``certificate`` was issued by ``ca``."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise CertificateError(
            f"the SuperLink certificate ({source}) is not signed by this CA "
            f"({type(error).__name__}: {error}). Copy the ca.crt made together with the "
            "SuperLink's certificate."
        ) from error


def validate_key_matches(certificate: x509.Certificate, key_path: Path) -> None:
    """Raise ``CertificateError`` unless the PEM key at ``key_path`` belongs to ``certificate``."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as error:
        raise CertificateError(f"cannot read the TLS key {key_path}: {error}") from error
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expected = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != expected:
        raise CertificateError(f"the TLS key {key_path} does not belong to its certificate")
