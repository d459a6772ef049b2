"""Mutual-TLS connection options and peer identity for the pool's listeners.

Both listeners (peer and client) require a certificate signed by a trusted CA,
and every outgoing connection checks that the server's certificate names the
member it meant to reach. A successful chain check only proves "signed by our
CA"; *which* peer connected is decided after the handshake from the
certificate's DNS SANs (:func:`peer_names`) and its extended key usage
(:func:`peer_is_server`), so a client certificate can never pass for a pool
member on the peer listener.

Everything is handed to Twisted as ``cryptography`` objects: the pyOpenSSL
object paths (``PrivateCertificate.options()`` and friends) are deprecated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from licensing.errors import PKIError
from licensing.pki import load_certificate_and_key, load_certificates

if TYPE_CHECKING:
    # Twisted does not re-export this interface publicly; it is only a type here.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "client_tls_options",
    "load_trust_root",
    "peer_certificate",
    "peer_is_server",
    "peer_names",
    "server_tls_options",
]

_log = Logger()

# Twisted's default floor is already TLS 1.2; saying it here keeps the floor
# ours if that default ever moves.
_MINIMUM_TLS = TLSVersion.TLSv1_2


def load_trust_root(ca_path: Path) -> IOpenSSLTrustRoot:
    """Trust exactly the CA certificates in ``ca_path`` (one or several, PEM).

    Several CAs in one file is how a CA is rotated without downtime: trust
    old and new, re-issue, then drop the old one.
    """
    ca_path = Path(ca_path)
    certs = load_certificates(
        ca_path, hint="`licensectl pki init ...` (or copy your CA certificate there)"
    )
    for cert in certs:
        if not _is_ca(cert):
            raise PKIError(
                f"{ca_path}: certificate {cert.subject.rfc4514_string()} is not a CA certificate"
            )
    return trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in certs])


def server_tls_options(
    ca_path: Path, cert_path: Path, key_path: Path
) -> IOpenSSLServerConnectionCreator:
    """Options for a listener that only admits peers with a certificate from the CA.

    Passing ``trustRoot`` makes Twisted verify the peer and fail the
    handshake when no certificate is offered (verify and requireCertificate).
    """
    trust_root = load_trust_root(ca_path)
    return CertificateOptions(
        **_identity_options(cert_path, key_path), trustRoot=trust_root, raiseMinimumTo=_MINIMUM_TLS
    )


def client_tls_options(
    server_name: str, ca_path: Path, cert_path: Path, key_path: Path
) -> IOpenSSLClientConnectionCreator:
    """Options for dialling ``server_name`` and presenting our own certificate.

    The address dialled is usually 127.0.0.1 or a bare IP, so the check is
    against the *member name* (a DNS SAN of its certificate), via
    service_identity. The certificate goes in through
    ``extraCertificateOptions`` because ``clientCertificate=`` wants a
    pyOpenSSL-backed ``PrivateCertificate``.
    """
    trust_root = load_trust_root(ca_path)
    extra = dict(_identity_options(cert_path, key_path), raiseMinimumTo=_MINIMUM_TLS)
    return optionsForClientTLS(server_name, trustRoot=trust_root, extraCertificateOptions=extra)


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """The peer's leaf certificate on a TLS transport, or None before/without one."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    if isinstance(cert, x509.Certificate):
        return cert
    return cert.to_cryptography()


def peer_names(transport: Any) -> frozenset[str]:
    """The DNS SANs of the peer's certificate, once the handshake is complete.

    The subject CN is deliberately ignored: identities are SANs, as in
    service_identity and every browser.
    """
    cert = peer_certificate(transport)
    if cert is None:
        return frozenset()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(san.get_values_for_type(x509.DNSName))


def peer_is_server(transport: Any) -> bool:
    """True if the peer's certificate may act as a TLS server (a pool member).

    Member certificates carry serverAuth; client certificates only
    clientAuth. A certificate without any EKU extension is unrestricted by
    X.509 rules, but we do not let such a certificate from a site's own CA
    pass as a member by accident: no EKU means not a member.
    """
    cert = peer_certificate(transport)
    if cert is None:
        return False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def _identity_options(cert_path: Path, key_path: Path) -> dict[str, Any]:
    """Our certificate (plus any intermediates after it in the file) and key."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert, key = load_certificate_and_key(cert_path, key_path)
    chain = load_certificates(cert_path)[1:]
    _warn_if_readable(key_path)
    options: dict[str, Any] = {"certificate": cert, "privateKey": key}
    if chain:
        options["extraCertChain"] = chain
    return options


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        # Old self-signed roots may predate basicConstraints; OpenSSL accepts
        # a self-signed v1 certificate as a trust anchor, and so do we.
        return cert.issuer == cert.subject


def _warn_if_readable(key_path: Path) -> None:
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        _log.warn(
            "private key {path} is readable by other users (mode {mode:o}); chmod 600 it",
            path=str(key_path),
            mode=mode & 0o777,
        )
