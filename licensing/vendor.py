"""The vendor's Ed25519 key pair: the private key signs license files, the
public key goes into every server's configuration to verify them.

The private key is the one secret that makes licenses unforgeable, so it is
written once, readable only by its owner, and never silently replaced: a new
key would invalidate every license already shipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from .errors import LicensingError, PKIError

__all__ = ["generate_vendor_keys", "load_private_key", "load_public_key"]

PRIVATE_KEY_NAME = "vendor.key"
PUBLIC_KEY_NAME = "vendor.pub"


def generate_vendor_keys(directory: Path) -> tuple[Path, Path]:
    """Create a new vendor key pair in ``directory`` and return (private, public) paths.

    The private key is PKCS#8 PEM with mode 0600, the public key
    SubjectPublicKeyInfo PEM. ``directory`` is created (mode 0700) if needed.
    Raises ``LicensingError`` if a private key is already there, because
    replacing it would orphan every license signed with it.
    """
    directory = Path(directory)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    if private_path.exists():
        raise LicensingError(
            f"{private_path} already exists; refusing to replace a vendor key, since every "
            "license signed with it would stop verifying. Move it away first if you really "
            "mean to start over."
        )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise LicensingError(f"{directory}: cannot create directory: {e.strerror}") from None
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    _write_new_secret(private_path, private_pem)
    try:
        public_path.write_bytes(public_pem)
    except OSError as e:
        raise LicensingError(f"{public_path}: cannot write: {e.strerror}") from None
    return private_path, public_path


def _write_new_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a file that must not exist yet, readable by its owner only.

    O_EXCL closes the race between the existence check and the write, and the
    mode is set at creation so the key is never readable by others, not even
    for an instant.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LicensingError(f"{path} already exists; refusing to replace a vendor key") from None
    except OSError as e:
        raise LicensingError(f"{path}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The vendor's signing key from a PEM file; ``PKIError`` names the file and the problem."""
    data = _read(path, "private key")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(
            f"{path}: the private key is encrypted; licensing expects an unencrypted "
            "PKCS#8 PEM key protected by file permissions"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PKIError(f"{path}: the key is {_kind(key)}, but vendor keys are Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The vendor's verifying key from a PEM file; ``PKIError`` names the file and the problem."""
    data = _read(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise PKIError(
            f"{path}: holds a private key; give the vendor's public key ({PUBLIC_KEY_NAME}) "
            "instead, and keep the private key off the servers"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: not a PEM public key (SubjectPublicKeyInfo)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PKIError(f"{path}: the key is {_kind(key)}, but vendor keys are Ed25519")
    return key


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: no such file; expected the vendor {what}") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot read the vendor {what}: {e.strerror}") from None


def _kind(key: object) -> str:
    """The type of a key that is not Ed25519, for error messages."""
    return f"a {type(key).__name__}"
