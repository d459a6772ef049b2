"""A small private certificate authority for a license pool.

Every pool member and every client authenticates with a certificate from a
CA the operator owns. Running a full PKI for a handful of license servers is
more than most sites want, so this module makes one in a directory:
``ca.pem``/``ca.key`` and one ``NAME.pem``/``NAME.key`` pair per member or
client. Sites that already have a CA skip :func:`init_ca` and
:func:`issue_certificate` and hand their own files to :mod:`licensing.tls`;
the loaders here are what both paths share, so a bad file gets the same clear
:class:`~licensing.errors.PKIError` whichever way it was made.

Keys are ECDSA P-256: small, fast to generate (issuing takes milliseconds)
and accepted by every TLS stack we care about.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from licensing.errors import PKIError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "init_ca",
    "issue_certificate",
    "load_certificate_and_key",
    "load_certificates",
    "load_private_key",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

# Certificates are backdated a little so that a member whose clock runs a few
# minutes behind the issuing machine still accepts a fresh certificate.
_BACKDATE = timedelta(minutes=5)

_SIGNING_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def init_ca(
    directory: Path,
    common_name: str = "licensing pool CA",
    days: int = 3650,
    *,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Create a new pool CA in ``directory`` and return ``(ca.pem, ca.key)``.

    Refuses (:class:`PKIError`) when the directory already holds a CA: a new
    CA key silently replacing the old one would cut every member and client
    off at the next restart, which is exactly the outage an HA pool exists to
    avoid. Rotating a CA is a deliberate, documented procedure instead.

    ``now`` fixes the start of the validity period (tests); by default it is
    the current UTC time.
    """
    directory = Path(directory)
    cert_path = directory / CA_CERT_FILE
    key_path = directory / CA_KEY_FILE
    for existing in (key_path, cert_path):
        if existing.exists():
            raise PKIError(
                f"{existing}: already exists; refusing to replace the pool CA "
                "(move it away first if you really mean to start a new CA)"
            )
    _check_days(days)
    directory.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    start = _start(now)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _BACKDATE + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first, exclusively: if two operators race, one of them fails here
    # before any certificate is written.
    _write_new_private(key_path, _key_pem(key))
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def issue_certificate(
    directory: Path,
    name: str,
    *,
    client: bool = False,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 825,
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """Issue ``NAME.pem``/``NAME.key`` in ``directory``, signed by its CA.

    ``name`` is the identity the pool checks: a member's certificate must
    carry its member name (``ls1``) as a DNS SAN because peers and clients
    verify that name, not the address they dialled. ``hosts`` adds further
    SANs (IP addresses or DNS names) for clients that verify by address.

    A pool member (``client=False``) gets both serverAuth and clientAuth,
    since members dial each other; a client certificate gets clientAuth only,
    which is also how a listener tells a member from a client
    (:func:`licensing.tls.peer_is_server`).

    Re-issuing an existing name replaces its files (rotation).
    """
    directory = Path(directory)
    _check_name(name)
    _check_days(days)
    ca_cert, ca_key = load_certificate_and_key(
        directory / CA_CERT_FILE, directory / CA_KEY_FILE, hint="`licensectl pki init ...`"
    )
    if not isinstance(ca_key, _SIGNING_KEYS):
        raise PKIError(f"{directory / CA_KEY_FILE}: this key type cannot sign certificates")
    # EdDSA signs the whole message itself and takes no separate hash.
    digest = (
        None
        if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
        else hashes.SHA256()
    )

    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    start = _start(now)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _BACKDATE + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(name, hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
        .sign(ca_key, digest)
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    _write_atomically(key_path, _key_pem(key), 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def load_certificates(
    path: Path, *, hint: str = "`licensectl pki issue ...`"
) -> list[x509.Certificate]:
    """Read every PEM certificate in ``path``, in file order.

    A leaf file may carry its intermediates after it, and a trust file may
    hold several CAs (old and new during a CA rotation), hence a list.
    ``hint`` says how to create the file when it is missing.
    """
    data = _read(Path(path), hint)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise PKIError(f"{path}: not a PEM certificate")
    return certs


def load_private_key(path: Path, *, hint: str = "`licensectl pki issue ...`") -> PrivateKeyTypes:
    """Read an unencrypted PEM private key from ``path``.

    Encrypted keys are refused: a server restarted by systemd at 3 a.m. has
    nobody to type a passphrase, so keys are protected by file mode instead.
    """
    data = _read(Path(path), hint)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(
            f"{path}: the private key is encrypted; store it unencrypted, readable only by "
            "the server's user (mode 0600)"
        ) from None
    except ValueError:
        raise PKIError(f"{path}: not a PEM private key") from None
    except UnsupportedAlgorithm as e:
        raise PKIError(f"{path}: unsupported private key type ({e})") from None


def load_certificate_and_key(
    cert_path: Path, key_path: Path, *, hint: str = "`licensectl pki issue ...`"
) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """Load a certificate (first in its file) and the private key that goes with it.

    A certificate paired with the wrong key loads fine and only fails at the
    first handshake, far from the mistake; checking here names both files.
    """
    cert = load_certificates(cert_path, hint=hint)[0]
    key = load_private_key(key_path, hint=hint)
    if not _same_public_key(cert, key):
        raise PKIError(f"{key_path}: key does not match certificate {cert_path}")
    return cert, key


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    except (ValueError, TypeError):
        return False


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file; create it with {hint}") from None
    except IsADirectoryError:
        raise PKIError(f"{path}: is a directory, expected a PEM file") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot read ({e.strerror})") from None


def _check_name(name: str) -> None:
    if not _DNS_NAME.match(name) or len(name) > 253:
        raise PKIError(
            f"{name!r}: not a usable certificate name; use a DNS-style name such as ls1 or "
            "ls1.example.com (letters, digits, hyphens, dots)"
        )
    if name.lower() == "ca":
        raise PKIError("'ca': reserved for the CA's own files; choose another name")


def _check_days(days: int) -> None:
    if days < 1:
        raise PKIError(f"days must be at least 1, not {days}")


def _start(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(UTC)
    return now - _BACKDATE


def _subject_alt_names(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.match(host):
                raise PKIError(f"{host!r}: neither an IP address nor a DNS name") from None
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return names


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600, failing if it exists.

    The mode is set at creation so the key is never readable by others, not
    even for the instant between writing and a later chmod.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PKIError(f"{path}: already exists; refusing to replace the pool CA") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` in one rename so a running server never reads half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
