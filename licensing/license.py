"""The license file: its model, its text format, and its Ed25519 signature.

A vendor writes an unsigned INI-style file, signs it with ``sign_license`` and
ships the result. Servers accept only files that ``verify_license`` returns a
``License`` for. What is signed is not the vendor's text but a *canonical form*
rendered from the parsed content (sorted sections and keys, normalised values,
defaults made explicit), so that comments, spacing and key order never change
the signature while any change of meaning does. docs/license-files.md is the
vendor's guide to the format.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import LicenseFileExpired, LicenseFormatError, LicenseSignatureError

__all__ = [
    "MAX_COUNT",
    "MAX_FILE_BYTES",
    "MAX_LEASE_TTL",
    "MAX_SEQUENCE",
    "Feature",
    "License",
    "canonical_text",
    "parse_unsigned",
    "public_key_id",
    "read_sequence",
    "sign_license",
    "verify_license",
]

#: Largest seat count of one feature.
MAX_COUNT = 1_000_000
#: Largest sequence number: it must fit a signed 64-bit integer in every store.
MAX_SEQUENCE = 2**63 - 1
#: Longest lease TTL in seconds: a lease that outlives a day without a
#: heartbeat would no longer be floating.
MAX_LEASE_TTL = 86_400.0
#: Largest file accepted, so a peer cannot make a server parse unbounded input.
MAX_FILE_BYTES = 1 << 20
_MAX_LICENSEE = 200

#: Prefixed to the canonical text before signing, so a signature made for a
#: license can never be mistaken for one over any other data the vendor key signs.
_SIGNING_CONTEXT = b"licensing license file v1\n"

_FEATURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
#: Server names as pool.ini allows them (they are also TLS identities).
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,15}")
_INTEGER = re.compile(r"[0-9]{1,19}")
_SECONDS = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_INLINE_COMMENT = re.compile(r"\s[;#]")
_T = TypeVar("_T")

_BOOLEANS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


@dataclass(frozen=True)
class Feature:
    """One licensed capability and the rules for handing out its seats."""

    name: str
    version: str
    count: int
    expires: datetime.date | None
    majority_rule: bool
    lease_ttl: float
    distribution: Mapping[str, int] | None

    def expired(self, today: datetime.date) -> bool:
        """True once ``today`` is past the expiry date; the expiry day itself is usable."""
        return self.expires is not None and self.expires < today

    def version_satisfies(self, requested: str) -> bool:
        """True if a client asking for ``requested`` may use this feature.

        A license for version 2.0 also serves requests for older versions, as
        vendors expect. Versions compare as integer tuples padded with zeros,
        so "2" equals "2.0". Anything that is not a dotted numeric version is
        simply not satisfied, because the string comes from the network.
        """
        wanted = _version_tuple(requested)
        if wanted is None:
            return False
        licensed = _version_tuple(self.version)
        if licensed is None:
            return False
        width = max(len(wanted), len(licensed))
        return _pad(wanted, width) <= _pad(licensed, width)

    def allocations(self, members: Sequence[str]) -> dict[str, int]:
        """The initial number of seats each of ``members`` may hand out.

        The result always sums to exactly ``count`` so that no seat is lost and
        none is invented. With a distribution, each member gets its share (0 if
        not named) and the seats the distribution leaves unassigned, including
        those it gives to servers outside ``members``, are dealt round-robin to
        ``members`` in order. Without one, the seats are split evenly and the
        remainder goes to the first members.
        """
        if not members:
            raise ValueError("allocations need at least one member")
        if len(set(members)) != len(members):
            raise ValueError(f"members are not unique: {list(members)!r}")
        if self.distribution is None:
            shares = dict.fromkeys(members, 0)
        else:
            shares = {member: self.distribution.get(member, 0) for member in members}
        surplus = self.count - sum(shares.values())
        each, extra = divmod(surplus, len(members))
        for position, member in enumerate(members):
            shares[member] += each + (1 if position < extra else 0)
        return shares


@dataclass(frozen=True)
class License:
    """A parsed license file; ``signed_bytes`` is the exact signed file it came from."""

    sequence: int
    licensee: str | None
    members: tuple[str, ...] | None
    features: Mapping[str, Feature]
    signed_bytes: bytes = field(repr=False)

    def feature(self, name: str) -> Feature | None:
        """The feature called ``name``, or None if this license has none."""
        return self.features.get(name)


def parse_unsigned(text: str) -> License:
    """Parse and validate a vendor's unsigned license text.

    Raises ``LicenseFormatError`` naming the section and key at fault and what
    was expected there. A ``[signature]`` section is refused: the input to
    signing is the unsigned text.
    """
    sections = _tokenise(text)
    if "signature" in sections:
        raise LicenseFormatError(
            f"[signature]: the input is already signed (line {sections['signature'].line}); "
            "give the unsigned license text"
        )
    return _build_license(sections, b"")


def canonical_text(license: License) -> str:
    """The canonical form of ``license``: the text that the signature covers.

    Sections come in a fixed order ([license], then each feature sorted by
    name), keys are sorted, values are normalised and defaults are written
    out, so two inputs with the same meaning have the same canonical form.
    The canonical form is itself a valid unsigned license text.
    """
    lines = ["[license]"]
    if license.licensee is not None:
        lines.append(f"licensee = {license.licensee}")
    if license.members is not None:
        lines.append(f"members = {', '.join(license.members)}")
    lines.append(f"sequence = {license.sequence}")
    for name in sorted(license.features):
        feature = license.features[name]
        lines += ["", f"[feature:{name}]", f"count = {feature.count}"]
        if feature.distribution is not None:
            pairs = sorted(feature.distribution.items())
            shares = ", ".join(f"{member}:{n}" for member, n in pairs)
            lines.append(f"distribution = {shares}")
        expires = "never" if feature.expires is None else feature.expires.isoformat()
        lines += [
            f"expires = {expires}",
            f"lease_ttl = {_format_seconds(feature.lease_ttl)}",
            f"majority_rule = {'yes' if feature.majority_rule else 'no'}",
            f"version = {feature.version}",
        ]
    return "\n".join(lines) + "\n"


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a vendor key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_license(text: str, private_key: Ed25519PrivateKey) -> bytes:
    """Validate the unsigned ``text`` and return the signed license file.

    The signed file is the canonical form followed by a ``[signature]``
    section holding the key id and the base64 Ed25519 signature.
    """
    canonical = canonical_text(parse_unsigned(text))
    signature = private_key.sign(_SIGNING_CONTEXT + canonical.encode("utf-8"))
    key_id = public_key_id(private_key.public_key())
    encoded = base64.b64encode(signature).decode("ascii")
    return f"{canonical}\n[signature]\nkey_id = {key_id}\ned25519 = {encoded}\n".encode()


def verify_license(
    data: bytes, public_key: Ed25519PublicKey, today: datetime.date | None = None
) -> License:
    """Return the license in the signed file ``data`` if it may be installed.

    Raises ``LicenseFormatError`` if the file is malformed,
    ``LicenseSignatureError`` if it is unsigned, signed by another key or
    changed after signing, and ``LicenseFileExpired`` if ``today`` is given and
    every feature has expired. The signature is checked over the canonical
    form recomputed from the parsed content, never over the raw bytes.
    """
    sections = _tokenise(_decode(data))
    license = _build_license(sections, data)
    signature_section = sections.get("signature")
    if signature_section is None:
        raise LicenseSignatureError(
            f"license file with sequence {license.sequence} is not signed; "
            "sign it with `licensectl license sign`"
        )
    key_id, signature = _read_signature(signature_section)
    expected_id = public_key_id(public_key)
    if key_id != expected_id:
        raise LicenseSignatureError(
            f"license file with sequence {license.sequence} is signed by vendor key {key_id}, "
            f"but the configured vendor key is {expected_id}"
        )
    message = _SIGNING_CONTEXT + canonical_text(license).encode("utf-8")
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise LicenseSignatureError(
            f"license file with sequence {license.sequence}: the signature does not match "
            "its content; the file was changed after it was signed"
        ) from None
    if today is not None and all(f.expired(today) for f in license.features.values()):
        last = max(f.expires for f in license.features.values() if f.expires is not None)
        raise LicenseFileExpired(
            f"license file with sequence {license.sequence}: every feature has expired "
            f"(the last on {last.isoformat()})"
        )
    return license


def read_sequence(data: bytes) -> int:
    """The sequence number of a license file, read without verifying anything else.

    Lets a server compare an offered file with the installed one cheaply.
    Raises ``LicenseFormatError`` if the file has no valid sequence number.
    """
    sections = _tokenise(_decode(data))
    section = sections.get("license")
    if section is None:
        raise LicenseFormatError("[license]: section missing; every license file needs one")
    return _required(section, "sequence", _parse_sequence)


# The text format: lines of [section] headers and key = value pairs.


@dataclass
class _Section:
    """One [section] of the text as written: raw values and where they were."""

    name: str
    line: int
    values: dict[str, tuple[str, int]] = field(default_factory=dict)


def _decode(data: bytes) -> str:
    """Bytes to text, refusing oversized and non-UTF-8 files with a format error."""
    if len(data) > MAX_FILE_BYTES:
        raise LicenseFormatError(
            f"license file is {len(data)} bytes; at most {MAX_FILE_BYTES} are accepted"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LicenseFormatError(f"license file is not UTF-8 text (byte {e.start})") from None


def _tokenise(text: str) -> dict[str, _Section]:
    """Split the text into sections of raw key/value strings, in file order.

    Only the structure is checked here: headers, ``key = value`` lines,
    duplicates. A line whose first character is ``;`` or ``#`` is a comment;
    elsewhere a comment starts only at a ``;`` or ``#`` that follows
    whitespace, so values such as ``ACME;Corp`` stay intact.
    """
    if len(text) > MAX_FILE_BYTES:
        raise LicenseFormatError(f"license text is longer than {MAX_FILE_BYTES} characters")
    sections: dict[str, _Section] = {}
    current: _Section | None = None
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = _strip_comment(raw)
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise LicenseFormatError(
                    f"line {number}: section header {_show(line)} has no closing ']'"
                )
            name = line[1:-1].strip()
            if name in sections:
                raise LicenseFormatError(
                    f"[{name}]: section appears twice (lines {sections[name].line} and {number})"
                )
            current = sections[name] = _Section(name, number)
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        if not equals or not key:
            raise LicenseFormatError(
                f"line {number}: expected 'key = value' or a [section] header, got {_show(line)}"
            )
        if current is None:
            raise LicenseFormatError(f"line {number}: {key} is set before any [section] header")
        if key in current.values:
            first = current.values[key][1]
            raise LicenseFormatError(
                f"[{current.name}] {key}: set twice (lines {first} and {number})"
            )
        current.values[key] = (value.strip(), number)
    return sections


def _strip_comment(raw: str) -> str:
    """The line without its comment and surrounding whitespace."""
    line = raw.strip()
    if ";" not in line and "#" not in line:
        return line
    if line.startswith((";", "#")):
        return ""
    match = _INLINE_COMMENT.search(line)
    if match is not None:
        line = line[: match.start()]
    return line.strip()


def _show(value: str) -> str:
    """A value quoted for an error message, shortened so messages stay readable."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


# Values: one parser per key. Each returns the typed value or raises
# _Invalid; the caller adds section, key and line to the message.


class _Invalid(ValueError):
    """A raw value is not acceptable for its key; the detail is optional."""


def _parse_sequence(value: str) -> int:
    if not _INTEGER.fullmatch(value) or not 1 <= int(value) <= MAX_SEQUENCE:
        raise _Invalid
    return int(value)


def _parse_licensee(value: str) -> str:
    text = unicodedata.normalize("NFC", value)
    if not text or len(text) > _MAX_LICENSEE:
        raise _Invalid
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise _Invalid("it contains control characters")
    return text


def _parse_members(value: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in value.split(","))
    for name in names:
        if not _MEMBER_NAME.fullmatch(name):
            raise _Invalid(f"{_show(name)} is not a server name")
    if len({name.lower() for name in names}) != len(names):
        raise _Invalid("a server is named twice (case is ignored, as in pool.ini)")
    return names


def _parse_version(value: str) -> str:
    numbers = _version_tuple(value)
    if numbers is None:
        raise _Invalid
    return ".".join(str(n) for n in numbers)


def _parse_count(value: str) -> int:
    if not _INTEGER.fullmatch(value) or not 1 <= int(value) <= MAX_COUNT:
        raise _Invalid
    return int(value)


def _parse_expires(value: str) -> datetime.date | None:
    if value.lower() == "never":
        return None
    if not _ISO_DATE.fullmatch(value):
        raise _Invalid
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise _Invalid("no such day") from None


def _parse_boolean(value: str) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise _Invalid from None


def _parse_lease_ttl(value: str) -> float:
    if not _SECONDS.fullmatch(value) or not 1.0 <= float(value) <= MAX_LEASE_TTL:
        raise _Invalid
    return float(value)


def _parse_distribution(value: str) -> Mapping[str, int]:
    shares: dict[str, int] = {}
    for item in value.split(","):
        name, colon, number = (part.strip() for part in item.partition(":"))
        if not colon or not _MEMBER_NAME.fullmatch(name) or not _INTEGER.fullmatch(number):
            raise _Invalid(f"{_show(item.strip())} is not 'server:seats'")
        if name in shares:
            raise _Invalid(f"{name} is named twice")
        if int(number) > MAX_COUNT:
            raise _Invalid(f"{name} gets more than {MAX_COUNT} seats")
        shares[name] = int(number)
    return MappingProxyType(shares)


@dataclass(frozen=True)
class _Key:
    """What a key expects, for error messages, and whether it must be present."""

    expected: str
    required: bool = True


_LICENSE_KEYS = {
    "sequence": _Key(f"an integer from 1 to {MAX_SEQUENCE}"),
    "licensee": _Key(f"a name of 1 to {_MAX_LICENSEE} characters", required=False),
    "members": _Key("a comma-separated list of distinct server names", required=False),
}
_FEATURE_KEYS = {
    "version": _Key("a dotted numeric version such as 2.0"),
    "count": _Key(f"an integer from 1 to {MAX_COUNT}"),
    "expires": _Key("an ISO date (YYYY-MM-DD) or 'never'"),
    "majority_rule": _Key("yes, no, true, false, 1 or 0", required=False),
    "lease_ttl": _Key(f"seconds from 1 to {MAX_LEASE_TTL:.0f}", required=False),
    "distribution": _Key(
        "comma-separated 'server:seats' pairs whose seats sum to at most count",
        required=False,
    ),
}
_SIGNATURE_KEYS = {
    "key_id": _Key("16 lowercase hex digits naming the vendor key"),
    "ed25519": _Key("the base64 Ed25519 signature (64 bytes)"),
}
_KEYS_BY_SECTION = {"license": _LICENSE_KEYS, "signature": _SIGNATURE_KEYS}


def _keys_for(section: str) -> dict[str, _Key]:
    """The keys a section may hold; raises for a section the format does not know."""
    if section.startswith("feature:"):
        name = section.removeprefix("feature:")
        if not _FEATURE_NAME.fullmatch(name):
            raise LicenseFormatError(
                f"[{section}]: {_show(name)} is not a feature name; expected 1 to 64 letters, "
                "digits or . _ + - starting with a letter or digit"
            )
        return _FEATURE_KEYS
    keys = _KEYS_BY_SECTION.get(section)
    if keys is None:
        raise LicenseFormatError(
            f"[{section}]: unknown section; expected [license], [feature:NAME] "
            "or, in a signed file, [signature]"
        )
    return keys


def _check_keys(section: _Section) -> None:
    """Refuse unknown and missing keys of a section."""
    keys = _keys_for(section.name)
    for key, (_, line) in section.values.items():
        if key not in keys:
            raise LicenseFormatError(
                f"[{section.name}] {key}: unknown key (line {line}); expected one of "
                f"{', '.join(sorted(keys))}"
            )
    for key, spec in keys.items():
        if spec.required and key not in section.values:
            raise LicenseFormatError(f"[{section.name}] {key}: missing; expected {spec.expected}")


def _optional(section: _Section, key: str, parse: Callable[[str], _T]) -> _T | None:
    """The value of ``key`` in ``section`` read by ``parse``, or None if it is not set."""
    if key not in section.values:
        return None
    value, line = section.values[key]
    try:
        return parse(value)
    except _Invalid as e:
        expected = _keys_for(section.name)[key].expected
        detail = f" ({e})" if str(e) else ""
        raise LicenseFormatError(
            f"[{section.name}] {key}: expected {expected}, got {_show(value)}{detail} "
            f"(line {line})"
        ) from None


def _required(section: _Section, key: str, parse: Callable[[str], _T]) -> _T:
    """The value of a key that must be present."""
    value = _optional(section, key, parse)
    if value is None:
        expected = _keys_for(section.name)[key].expected
        raise LicenseFormatError(f"[{section.name}] {key}: missing; expected {expected}")
    return value


def _build_license(sections: dict[str, _Section], signed_bytes: bytes) -> License:
    """Turn tokenised sections into a validated ``License``."""
    for section in sections.values():
        _check_keys(section)
    head = sections.get("license")
    if head is None:
        raise LicenseFormatError("[license]: section missing; every license file needs one")
    sequence = _required(head, "sequence", _parse_sequence)
    licensee = _optional(head, "licensee", _parse_licensee)
    members = _optional(head, "members", _parse_members)
    features = {}
    for section in sections.values():
        if section.name.startswith("feature:"):
            feature = _build_feature(section, members)
            features[feature.name] = feature
    if not features:
        raise LicenseFormatError("[feature:NAME]: the license has no feature section")
    return License(
        sequence=sequence,
        licensee=licensee,
        members=members,
        features=MappingProxyType(dict(sorted(features.items()))),
        signed_bytes=signed_bytes,
    )


def _build_feature(section: _Section, members: tuple[str, ...] | None) -> Feature:
    """One feature, with the checks that relate its keys to each other."""
    majority_rule = _optional(section, "majority_rule", _parse_boolean)
    lease_ttl = _optional(section, "lease_ttl", _parse_lease_ttl)
    feature = Feature(
        name=section.name.removeprefix("feature:"),
        version=_required(section, "version", _parse_version),
        count=_required(section, "count", _parse_count),
        expires=_optional(section, "expires", _parse_expires),
        majority_rule=True if majority_rule is None else majority_rule,
        lease_ttl=60.0 if lease_ttl is None else lease_ttl,
        distribution=_optional(section, "distribution", _parse_distribution),
    )
    if feature.distribution is not None:
        line = section.values["distribution"][1]
        total = sum(feature.distribution.values())
        if total > feature.count:
            raise LicenseFormatError(
                f"[{section.name}] distribution: the seats sum to {total}, more than "
                f"count = {feature.count} (line {line})"
            )
        if members is not None:
            strangers = sorted(set(feature.distribution) - set(members))
            if strangers:
                raise LicenseFormatError(
                    f"[{section.name}] distribution: {', '.join(strangers)} not in "
                    f"[license] members (line {line})"
                )
    return feature


def _read_signature(section: _Section) -> tuple[str, bytes]:
    """The key id and raw signature bytes of a [signature] section."""
    key_id, key_line = section.values["key_id"]
    if not _KEY_ID.fullmatch(key_id):
        raise LicenseFormatError(
            f"[signature] key_id: expected {_SIGNATURE_KEYS['key_id'].expected}, "
            f"got {_show(key_id)} (line {key_line})"
        )
    encoded, line = section.values["ed25519"]
    try:
        signature = base64.b64decode(encoded, validate=True)
    except ValueError:
        signature = b""
    if len(signature) != 64:
        raise LicenseFormatError(
            f"[signature] ed25519: expected {_SIGNATURE_KEYS['ed25519'].expected}, "
            f"got {_show(encoded)} (line {line})"
        )
    return key_id, signature


def _version_tuple(value: object) -> tuple[int, ...] | None:
    """A dotted numeric version as integers, or None if it is not one."""
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        return None
    return tuple(int(part) for part in value.split("."))


def _pad(numbers: tuple[int, ...], width: int) -> tuple[int, ...]:
    return numbers + (0,) * (width - len(numbers))


def _format_seconds(seconds: float) -> str:
    """Seconds written so that parsing them back gives the same float."""
    return str(int(seconds)) if seconds.is_integer() else repr(seconds)
