"""Tests for licensing.pki: the pool's private CA and certificate issuing."""

from __future__ import annotations

import ipaddress
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from licensing.errors import PKIError
from licensing.pki import (
    init_ca,
    issue_certificate,
    load_certificate_and_key,
    load_certificates,
    load_private_key,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """A directory holding a fresh pool CA."""
    directory = tmp_path / "pki"
    init_ca(directory)
    return directory


def test_init_ca_writes_self_signed_ca_with_private_key(tmp_path: Path) -> None:
    """init_ca creates the directory, a CA certificate and a 0600 key that belongs to it."""
    directory = tmp_path / "a" / "b"
    cert_path, key_path = init_ca(directory, common_name="Example pool CA")
    assert (cert_path, key_path) == (directory / "ca.pem", directory / "ca.key")
    assert _mode(key_path) == 0o600
    cert = _cert(cert_path)
    assert cert.subject == cert.issuer
    assert (
        cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "Example pool CA"
    )
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cert)
    load_certificate_and_key(cert_path, key_path)


def test_init_ca_refuses_to_replace_existing_ca(ca_dir: Path) -> None:
    """A second init_ca in the same directory fails and leaves the CA untouched."""
    before = (ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(PKIError, match=r"ca\.key: already exists"):
        init_ca(ca_dir)
    assert ((ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.pem").read_bytes()) == before


def test_init_ca_refuses_when_only_the_certificate_exists(tmp_path: Path) -> None:
    """A ca.pem alone (say, a site's own CA copied in) is not overwritten either."""
    (tmp_path / "ca.pem").write_bytes(b"site CA")
    with pytest.raises(PKIError, match=r"ca\.pem: already exists"):
        init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == b"site CA"
    assert not (tmp_path / "ca.key").exists()


def test_init_ca_validity_follows_days_and_now(tmp_path: Path) -> None:
    """The CA is valid from (slightly before) ``now`` for ``days`` days."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    cert_path, _ = init_ca(tmp_path, days=10, now=now)
    cert = _cert(cert_path)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc >= now + timedelta(days=10)
    assert cert.not_valid_after_utc < now + timedelta(days=11)


def test_member_certificate_names_and_usages(ca_dir: Path) -> None:
    """A member certificate names the member and its hosts, and may serve and dial."""
    cert_path, key_path = issue_certificate(
        ca_dir, "ls1", hosts=("10.0.0.5", "::1", "ls1.example.com")
    )
    assert (cert_path, key_path) == (ca_dir / "ls1.pem", ca_dir / "ls1.key")
    assert _mode(key_path) == 0o600
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ls1", "ls1.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_cert(ca_dir / "ca.pem"))
    load_certificate_and_key(cert_path, key_path)


def test_default_hosts_are_loopback(ca_dir: Path) -> None:
    """Without hosts, the certificate also names 127.0.0.1 (as an IP) and localhost."""
    cert = _cert(issue_certificate(ca_dir, "ls1")[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ls1", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_client_certificate_is_client_auth_only(ca_dir: Path) -> None:
    """A --client certificate cannot act as a server (no serverAuth)."""
    cert = _cert(issue_certificate(ca_dir, "alice", client=True)[0])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_certificates_pass_a_strict_rfc5280_verifier(ca_dir: Path) -> None:
    """cryptography's strict path validator accepts member (as server) and client certificates.

    This catches malformed extensions that OpenSSL alone might let through.
    """
    ca = _cert(ca_dir / "ca.pem")
    member = _cert(issue_certificate(ca_dir, "ls1")[0])
    client = _cert(issue_certificate(ca_dir, "bob", client=True)[0])
    store = Store([ca])
    server_verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("ls1"))
    server_verifier.verify(member, [])
    client_verifier = PolicyBuilder().store(store).build_client_verifier()
    assert client_verifier.verify(client, []).subjects is not None
    assert client_verifier.verify(member, []).subjects is not None


def test_reissue_replaces_certificate_and_key(ca_dir: Path) -> None:
    """Issuing the same name again (rotation) writes a new key and certificate."""
    cert_path, key_path = issue_certificate(ca_dir, "ls1")
    old_cert, old_key = cert_path.read_bytes(), key_path.read_bytes()
    issue_certificate(ca_dir, "ls1", hosts=("10.0.0.9",))
    assert cert_path.read_bytes() != old_cert
    assert key_path.read_bytes() != old_key
    assert _mode(key_path) == 0o600
    load_certificate_and_key(cert_path, key_path)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem", "ls1.key", "ls1.pem"]


def test_issue_is_fast(ca_dir: Path) -> None:
    """Issuing a certificate takes well under a second (ECDSA P-256)."""
    start = time.perf_counter()
    issue_certificate(ca_dir, "ls1")
    assert time.perf_counter() - start < 0.5


def test_issue_without_ca_names_missing_file(tmp_path: Path) -> None:
    """Issuing in a directory without a CA says which file is missing."""
    with pytest.raises(
        PKIError, match=r"ca\.pem: no such file; create it with `licensectl pki init"
    ):
        issue_certificate(tmp_path, "ls1")


@pytest.mark.parametrize("name", ["", "ca", "CA", "../evil", "a/b", "-ls1", "ls 1", "ls1."])
def test_issue_refuses_unusable_names(ca_dir: Path, name: str) -> None:
    """Names that are not DNS names, or would overwrite the CA's files, are refused."""
    with pytest.raises(PKIError):
        issue_certificate(ca_dir, name)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]


def test_issue_refuses_bad_host(ca_dir: Path) -> None:
    """A host that is neither an IP address nor a DNS name is refused, naming it."""
    with pytest.raises(PKIError, match="not a host"):
        issue_certificate(ca_dir, "ls1", hosts=("not a host",))


def test_issue_refuses_non_positive_days(ca_dir: Path) -> None:
    """A validity of zero days is a mistake, not a certificate."""
    with pytest.raises(PKIError, match="days"):
        issue_certificate(ca_dir, "ls1", days=0)


def test_load_certificates_reads_every_certificate(ca_dir: Path, tmp_path: Path) -> None:
    """A PEM bundle yields all its certificates in order (trust bundles, chains)."""
    issue_certificate(ca_dir, "ls1")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((ca_dir / "ls1.pem").read_bytes() + (ca_dir / "ca.pem").read_bytes())
    certs = load_certificates(bundle)
    assert certs == [_cert(ca_dir / "ls1.pem"), _cert(ca_dir / "ca.pem")]


def test_load_certificates_refuses_non_pem(tmp_path: Path) -> None:
    """A file that holds no PEM certificate is named and described."""
    path = tmp_path / "ls1.pem"
    path.write_text("hello")
    with pytest.raises(PKIError, match=r"ls1\.pem: not a PEM certificate"):
        load_certificates(path)


def test_load_certificates_refuses_key_file(ca_dir: Path) -> None:
    """Swapping the certificate and key paths gives 'not a PEM certificate'."""
    with pytest.raises(PKIError, match="not a PEM certificate"):
        load_certificates(ca_dir / "ca.key")


def test_load_private_key_refuses_certificate(ca_dir: Path) -> None:
    """A certificate where a key was expected is named and described."""
    with pytest.raises(PKIError, match=r"ca\.pem: not a PEM private key"):
        load_private_key(ca_dir / "ca.pem")


def test_load_private_key_refuses_encrypted_key(tmp_path: Path) -> None:
    """A passphrase-protected key is refused with advice: servers restart unattended."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ls1.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(PKIError, match="encrypted"):
        load_private_key(path)


def test_load_private_key_missing_file(tmp_path: Path) -> None:
    """A missing key file says how to create one."""
    with pytest.raises(
        PKIError, match=r"ls9\.key: no such file; create it with `licensectl pki issue"
    ):
        load_private_key(tmp_path / "ls9.key")


def test_load_certificate_and_key_detects_mismatch(ca_dir: Path) -> None:
    """A certificate paired with another certificate's key is refused, naming both files."""
    issue_certificate(ca_dir, "ls1")
    issue_certificate(ca_dir, "ls2")
    with pytest.raises(PKIError, match=r"ls2\.key: key does not match certificate .*ls1\.pem"):
        load_certificate_and_key(ca_dir / "ls1.pem", ca_dir / "ls2.key")


def test_issue_with_foreign_rsa_ca(tmp_path: Path) -> None:
    """A site's own RSA CA (no SubjectKeyIdentifier) can sign our certificates too."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Site CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert = _cert(issue_certificate(tmp_path, "ls1")[0])
    cert.verify_directly_issued_by(ca)
