"""Checks a node runs before it starts Flower, each failing with a message that says what to do.

Flower's own messages for these cases are generic ("Failed to initialize the
connection", or retrying forever), so the deploy tool checks first:

- the address parses as ``HOST:PORT``;
- the SuperLink answers a TCP connect within a short timeout (unreachable);
- it answers TLS (a SuperLink started with ``--insecure`` does not), or, for a
  node started with ``--insecure``, it does not;
- the certificate it serves is signed by the CA this node trusts and names the
  host this node connects to in its subjectAltName;
- a full verified handshake succeeds (expiry and the rest of the chain);
- the node's key and its own data (``data-path``) are readable and well formed.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from deploy.certs import (
    CertificateError,
    certificate_names,
    load_certificate,
    parse_host,
    validate_certificate_covers,
    validate_key_matches,
    validate_signed_by,
)

DEFAULT_CONNECT_TIMEOUT_S = 5.0


class DeployError(RuntimeError):
    """A deployment problem a user can fix; the message says how."""


class SuperLinkUnreachableError(DeployError):
    """No TCP connection to the SuperLink within the timeout."""


class TlsMismatchError(DeployError):
    """One side speaks TLS and the other does not."""


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` address; IPv6 hosts are written ``[::1]:8000``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(address: str) -> Address:
    """Split ``HOST:PORT``; a clear error for anything else."""
    host, sep, port_text = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeployError(
            f"SuperLink address {address!r} is not HOST:PORT (e.g. 10.0.0.5:8000, "
            "superlink.example.org:8000, [2001:db8::5]:8000)"
        )
    return Address(host, int(port_text))


def _connect(address: Address, timeout_s: float) -> socket.socket:
    try:
        return socket.create_connection((address.host, address.port), timeout=timeout_s)
    except TimeoutError as error:
        raise SuperLinkUnreachableError(
            f"cannot reach the SuperLink at {address}: no answer within {timeout_s:g}s. "
            "Is the address right, the SuperLink running with --host 0.0.0.0 (or this "
            "address), and the port open in the firewall between the machines?"
        ) from error
    except OSError as error:
        reason = error.strerror or str(error)
        raise SuperLinkUnreachableError(
            f"cannot reach the SuperLink at {address}: {reason}. Is it running, listening "
            "on that address (--host 0.0.0.0 listens on all), and is the port open?"
        ) from error


def fetch_served_certificate(address: Address, timeout_s: float) -> x509.Certificate:
    """The certificate the SuperLink presents, fetched without verifying it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = _connect(address, timeout_s)
    try:
        server_name = None if parse_host(address.host) else address.host
        with context.wrap_socket(sock, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionError, TimeoutError) as error:
        raise TlsMismatchError(
            f"the SuperLink at {address} does not answer TLS ({error}). Was it started "
            "with --insecure? Nodes with a CA certificate need a SuperLink started with "
            "its TLS certificate (python -m deploy superlink --certs DIR)."
        ) from error
    finally:
        sock.close()
    if not der:
        raise TlsMismatchError(f"the SuperLink at {address} presented no certificate")
    return x509.load_der_x509_certificate(der)


def verify_handshake(address: Address, ca_cert: Path, timeout_s: float) -> None:
    """A fully verified TLS handshake, as Flower's client will do it."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    sock = _connect(address, timeout_s)
    try:
        with context.wrap_socket(sock, server_hostname=address.host):
            return
    except ssl.SSLCertVerificationError as error:
        raise CertificateError(
            f"TLS verification of the SuperLink at {address} with CA {ca_cert} failed: "
            f"{error.verify_message}"
        ) from error
    except (ssl.SSLError, OSError) as error:
        raise DeployError(
            f"TLS handshake with the SuperLink at {address} failed: {error}"
        ) from error
    finally:
        sock.close()


def check_superlink_tls(
    address: str, ca_cert: Path, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> list[str]:
    """Check that the SuperLink is reachable and its certificate fits; return its names.

    Raises
    ------
    SuperLinkUnreachableError, TlsMismatchError, CertificateError, DeployError
        With a message naming the address, the certificate's names and the fix.
    """
    parsed = parse_address(address)
    ca = load_certificate(ca_cert)
    served = fetch_served_certificate(parsed, timeout_s)
    source = f"served by {parsed}"
    validate_signed_by(served, ca, source)
    validate_certificate_covers(served, parsed.host, source)
    verify_handshake(parsed, ca_cert, timeout_s)
    return certificate_names(served)


def check_superlink_insecure(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """For a node started without TLS: the SuperLink must be reachable and not use TLS."""
    parsed = parse_address(address)
    try:
        fetch_served_certificate(parsed, timeout_s)
    except TlsMismatchError:
        return
    raise TlsMismatchError(
        f"the SuperLink at {parsed} uses TLS but this node was started with --insecure; "
        "give it the CA certificate instead (--ca ca.crt) so it can connect securely"
    )


def check_local_certificates(
    ca_cert: Path, server_cert: Path, server_key: Path, hosts: list[str]
) -> list[str]:
    """On the SuperLink machine: the pair belongs together, is CA-signed, and names ``hosts``."""
    ca = load_certificate(ca_cert)
    certificate = load_certificate(server_cert)
    validate_signed_by(certificate, ca, str(server_cert))
    validate_key_matches(certificate, server_key)
    for host in hosts:
        validate_certificate_covers(certificate, host, str(server_cert))
    return certificate_names(certificate)
