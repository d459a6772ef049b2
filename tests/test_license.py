"""Tests for the license file format, its signature, and the vendor key files."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from hypothesis import given
from hypothesis import strategies as st

from licensing.errors import (
    LicenseFileError,
    LicenseFileExpired,
    LicenseFormatError,
    LicenseSignatureError,
    LicensingError,
    PKIError,
)
from licensing.license import (
    MAX_FILE_BYTES,
    Feature,
    License,
    canonical_text,
    parse_unsigned,
    public_key_id,
    read_sequence,
    sign_license,
    verify_license,
)
from licensing.vendor import generate_vendor_keys, load_private_key, load_public_key

EXAMPLE = """\
[license]
sequence = 1                      ; int >= 1
licensee = ACME Corp              ; optional
members = ls1, ls2, ls3           ; optional: the pool members this file may be served by
[feature:cad-pro]
version = 2.0                     ; dotted numeric version
count = 10                        ; int >= 1 (<= 1_000_000)
expires = 2027-12-31              ; ISO date or "never"
majority_rule = yes               ; yes/no/true/false/1/0, default yes
lease_ttl = 60                    ; seconds, default 60, >= 1
distribution = ls1:4, ls2:3, ls3:3   ; optional; values sum to at most count
"""

MINIMAL = """\
[license]
sequence = 7
[feature:viewer]
version = 1
count = 3
expires = never
"""

# The example with every key in another order, other spacing and comments.
EXAMPLE_REWRITTEN = """\
# Issued to ACME, see ticket 4711.
[feature:cad-pro]
  distribution=ls1:4,ls2:3 ,  ls3:3
lease_ttl = 60.0   # one minute
count   =   10
expires = 2027-12-31
version = 2.0
majority_rule = True

; the header may come after the features
[license]
members = ls1,ls2,ls3
licensee =   ACME Corp
sequence = 1
"""

TODAY = datetime.date(2026, 6, 1)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    """One vendor key for the module; generating keys is cheap but not free."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def signed(key: Ed25519PrivateKey) -> bytes:
    """The example license, signed with ``key``."""
    return sign_license(EXAMPLE, key)


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with the single occurrence of ``old`` replaced, failing if it is not unique."""
    assert data.count(old) == 1, (old, data)
    return data.replace(old, new)


# Parsing the unsigned input.


def test_parse_example() -> None:
    """Every key of the documented example is read into the model."""
    license = parse_unsigned(EXAMPLE)
    assert license.sequence == 1
    assert license.licensee == "ACME Corp"
    assert license.members == ("ls1", "ls2", "ls3")
    assert license.signed_bytes == b""
    assert license.feature("cad-pro") == Feature(
        name="cad-pro",
        version="2.0",
        count=10,
        expires=datetime.date(2027, 12, 31),
        majority_rule=True,
        lease_ttl=60.0,
        distribution={"ls1": 4, "ls2": 3, "ls3": 3},
    )


def test_parse_defaults() -> None:
    """Optional keys take their documented defaults."""
    license = parse_unsigned(MINIMAL)
    assert license.licensee is None
    assert license.members is None
    feature = license.feature("viewer")
    assert feature is not None
    assert feature.expires is None
    assert feature.majority_rule is True
    assert feature.lease_ttl == 60.0
    assert feature.distribution is None


def test_feature_lookup_unknown() -> None:
    """Looking up a feature the license does not have gives None, not an error."""
    assert parse_unsigned(MINIMAL).feature("cad-pro") is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("yes", True), ("no", False), ("TRUE", True), ("false", False), ("1", True), ("0", False)],
)
def test_majority_rule_spellings(raw: str, expected: bool) -> None:
    """All documented spellings of a boolean are accepted, case-insensitively."""
    license = parse_unsigned(MINIMAL + f"majority_rule = {raw}\n")
    feature = license.feature("viewer")
    assert feature is not None
    assert feature.majority_rule is expected


def test_inline_comment_needs_whitespace() -> None:
    """A ';' or '#' inside a value is part of it; only one after whitespace starts a comment."""
    text = MINIMAL.replace("[license]\n", "[license]\nlicensee = ACME;Corp#1 ; comment\n")
    assert parse_unsigned(text).licensee == "ACME;Corp#1"


def test_windows_line_endings_and_bom() -> None:
    """A file saved by a Windows editor parses like the original."""
    text = "\ufeff" + EXAMPLE.replace("\n", "\r\n")
    assert canonical_text(parse_unsigned(text)) == canonical_text(parse_unsigned(EXAMPLE))


def test_version_is_normalised() -> None:
    """Leading zeros do not survive into the model or the canonical form."""
    feature = parse_unsigned(MINIMAL.replace("version = 1", "version = 02.010")).feature("viewer")
    assert feature is not None
    assert feature.version == "2.10"


def test_canonical_text_is_a_fixed_point() -> None:
    """The canonical form is itself valid input and canonicalises to itself."""
    canonical = canonical_text(parse_unsigned(EXAMPLE))
    assert canonical_text(parse_unsigned(canonical)) == canonical


def test_rewritten_input_has_same_canonical_form() -> None:
    """Key order, spacing, comments and default spellings do not change the canonical form."""
    assert canonical_text(parse_unsigned(EXAMPLE_REWRITTEN)) == canonical_text(
        parse_unsigned(EXAMPLE)
    )


# Malformed input: each case names the section and key at fault.

MALFORMED = [
    # (description, text, section, key or None)
    (
        "no license section",
        "[feature:a]\nversion = 1\ncount = 1\nexpires = never\n",
        "[license]",
        None,
    ),
    ("no sequence", "[license]\nlicensee = x\n", "[license]", "sequence"),
    ("sequence zero", "[license]\nsequence = 0\n", "[license]", "sequence"),
    ("sequence negative", "[license]\nsequence = -1\n", "[license]", "sequence"),
    ("sequence not a number", "[license]\nsequence = one\n", "[license]", "sequence"),
    ("sequence with underscore", "[license]\nsequence = 1_0\n", "[license]", "sequence"),
    ("sequence fraction", "[license]\nsequence = 1.5\n", "[license]", "sequence"),
    ("sequence too large", "[license]\nsequence = 9223372036854775808\n", "[license]", "sequence"),
    ("licensee empty", "[license]\nsequence = 1\nlicensee =\n", "[license]", "licensee"),
    ("licensee control", "[license]\nsequence = 1\nlicensee = a\x07b\n", "[license]", "licensee"),
    ("members empty", "[license]\nsequence = 1\nmembers =\n", "[license]", "members"),
    ("members duplicate", "[license]\nsequence = 1\nmembers = a, a\n", "[license]", "members"),
    ("members case", "[license]\nsequence = 1\nmembers = a1, A1\n", "[license]", "members"),
    ("members bad name", "[license]\nsequence = 1\nmembers = a, b c\n", "[license]", "members"),
    ("members trailing comma", "[license]\nsequence = 1\nmembers = a,\n", "[license]", "members"),
    ("unknown license key", "[license]\nsequence = 1\nlicencee = x\n", "[license]", "licencee"),
    ("unknown section", "[license]\nsequence = 1\n[licence]\n", "[licence]", None),
    ("bad feature name", "[license]\nsequence = 1\n[feature:-a]\n", "[feature:-a]", None),
    ("feature name with space", "[license]\nsequence = 1\n[feature:a b]\n", "[feature:a b]", None),
    ("name too long", f"[license]\nsequence = 1\n[feature:{'a' * 65}]\n", "[feature:a", None),
    ("empty feature name", "[license]\nsequence = 1\n[feature:]\n", "[feature:]", None),
    ("no feature", "[license]\nsequence = 1\n", "[feature:NAME]", None),
    ("duplicate section", MINIMAL + "[license]\n", "[license]", None),
    ("duplicate key", MINIMAL + "count = 4\n", "[feature:viewer]", "count"),
    ("key before section", "sequence = 1\n" + MINIMAL, "line 1", "sequence"),
    ("not key = value", MINIMAL + "count 4\n", "line 7", None),
    ("unclosed header", MINIMAL + "[feature:x\n", "line 7", None),
    ("signature in input", MINIMAL + "[signature]\ned25519 = x\n", "[signature]", None),
]

FEATURE_KEY_CASES = [
    ("version", "2.x"),
    ("version", "v2"),
    ("version", "2."),
    ("version", ""),
    ("version", "1" * 10),
    ("count", "0"),
    ("count", "1000001"),
    ("count", "ten"),
    ("count", "+5"),
    ("count", "٣"),
    ("expires", "2027-13-01"),
    ("expires", "2027-02-30"),
    ("expires", "20271231"),
    ("expires", "tomorrow"),
    ("majority_rule", "maybe"),
    ("lease_ttl", "0"),
    ("lease_ttl", "0.5"),
    ("lease_ttl", "1e3"),
    ("lease_ttl", "86401"),
    ("lease_ttl", "nan"),
    ("distribution", "a:2, b:2"),
    ("distribution", "a=1"),
    ("distribution", "a:1,"),
    ("distribution", "a:1, a:1"),
    ("distribution", "a:-1"),
    ("distribution", ""),
]


@pytest.mark.parametrize(
    ("text", "section", "key"),
    [pytest.param(text, section, key, id=name) for name, text, section, key in MALFORMED],
)
def test_malformed_structure(text: str, section: str, key: str | None) -> None:
    """Structural mistakes raise LicenseFormatError naming where they are."""
    with pytest.raises(LicenseFormatError) as caught:
        parse_unsigned(text)
    message = str(caught.value)
    assert section in message
    if key is not None:
        assert key in message


@pytest.mark.parametrize(("key", "value"), FEATURE_KEY_CASES)
def test_malformed_feature_value(key: str, value: str) -> None:
    """A bad feature value names the feature section, the key and what it expects."""
    lines = {"version": "1", "count": "3", "expires": "never", key: value}
    text = "[license]\nsequence = 1\n[feature:viewer]\n" + "".join(
        f"{k} = {v}\n" for k, v in lines.items()
    )
    with pytest.raises(LicenseFormatError) as caught:
        parse_unsigned(text)
    message = str(caught.value)
    assert f"[feature:viewer] {key}:" in message
    assert "expected" in message or "more than" in message


@pytest.mark.parametrize("key", ["version", "count", "expires"])
def test_missing_feature_key(key: str) -> None:
    """Each required feature key, when missing, is named with what it expects."""
    text = MINIMAL.replace(
        {"version": "version = 1\n", "count": "count = 3\n", "expires": "expires = never\n"}[key],
        "",
    )
    with pytest.raises(LicenseFormatError, match=rf"\[feature:viewer\] {key}: missing; expected"):
        parse_unsigned(text)


def test_unknown_feature_key_lists_known_keys() -> None:
    """The message for a typo lists the keys the section may hold."""
    with pytest.raises(LicenseFormatError) as caught:
        parse_unsigned(MINIMAL + "cuont = 4\n")
    assert "[feature:viewer] cuont: unknown key" in str(caught.value)
    assert "count" in str(caught.value)


def test_distribution_must_name_members() -> None:
    """When the license lists its members, a distribution may only give seats to them."""
    text = EXAMPLE.replace("ls3:3", "ls9:3")
    with pytest.raises(LicenseFormatError, match=r"\[feature:cad-pro\] distribution: ls9"):
        parse_unsigned(text)


def test_distribution_without_members_is_free() -> None:
    """Without a members list, a distribution may name any valid server."""
    text = MINIMAL + "distribution = alpha:1, beta:2\n"
    feature = parse_unsigned(text).feature("viewer")
    assert feature is not None
    assert dict(feature.distribution or {}) == {"alpha": 1, "beta": 2}


def test_error_message_shows_line() -> None:
    """The line number points the vendor at the mistake."""
    with pytest.raises(LicenseFormatError, match=r"line 5"):
        parse_unsigned(MINIMAL.replace("count = 3", "count = x"))


# Signing and verification.


def test_sign_verify_round_trip(key: Ed25519PrivateKey, signed: bytes) -> None:
    """A signed file verifies to the license that was signed, keeping its exact bytes."""
    license = verify_license(signed, key.public_key())
    assert license.signed_bytes == signed
    assert canonical_text(license) == canonical_text(parse_unsigned(EXAMPLE))
    assert license.feature("cad-pro") == parse_unsigned(EXAMPLE).feature("cad-pro")


def test_signed_file_layout(key: Ed25519PrivateKey, signed: bytes) -> None:
    """The signed file is the canonical text followed by the [signature] section."""
    canonical = canonical_text(parse_unsigned(EXAMPLE)).encode()
    assert signed.startswith(canonical + b"\n[signature]\n")
    assert f"key_id = {public_key_id(key.public_key())}\n".encode() in signed
    assert b"\ned25519 = " in signed


def test_signature_independent_of_layout(key: Ed25519PrivateKey, signed: bytes) -> None:
    """Reordered keys, other spacing and comments give the same signed file."""
    assert sign_license(EXAMPLE_REWRITTEN, key) == signed


def test_reformatting_signed_file_still_verifies(key: Ed25519PrivateKey, signed: bytes) -> None:
    """A signed file that gained a comment or spacing still verifies: the meaning is signed."""
    edited = b"; received 2026-01-05\n" + replace_once(signed, b"count = 10", b"count=10 # ten")
    assert verify_license(edited, key.public_key()).sequence == 1


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"count = 10", b"count = 11"),
        (b"sequence = 1", b"sequence = 2"),
        (b"version = 2.0", b"version = 3.0"),
        (b"expires = 2027-12-31", b"expires = never"),
        (b"majority_rule = yes", b"majority_rule = no"),
        (b"lease_ttl = 60", b"lease_ttl = 600"),
        (b"ls1:4, ls2:3, ls3:3", b"ls1:5, ls2:2, ls3:3"),
        (b"members = ls1, ls2, ls3", b"members = ls1, ls2, ls3, ls4"),
        (b"licensee = ACME Corp", b"licensee = ACME Corq"),
        (b"[feature:cad-pro]", b"[feature:cad-pro2]"),
        (b"distribution = ls1:4, ls2:3, ls3:3\n", b""),
        (b"\n[signature]", b"\n[feature:extra]\nversion=1\ncount=1\nexpires=never\n[signature]"),
    ],
)
def test_tampering_fails(key: Ed25519PrivateKey, signed: bytes, old: bytes, new: bytes) -> None:
    """Any change of content after signing is detected."""
    with pytest.raises(LicenseSignatureError, match="does not match"):
        verify_license(replace_once(signed, old, new), key.public_key())


# Hypothesis tests cannot take function-scoped fixtures, so they share this pair.
_PROPERTY_KEY = Ed25519PrivateKey.generate()
_PROPERTY_SIGNED = sign_license(EXAMPLE, _PROPERTY_KEY)


@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_any_byte_change_is_refused_or_harmless(position: int, value: int) -> None:
    """Changing any one byte either is refused or leaves the signed meaning intact."""
    key = _PROPERTY_KEY
    original = _PROPERTY_SIGNED
    data = bytearray(original)
    data[position % len(data)] = value
    try:
        license = verify_license(bytes(data), key.public_key())
    except LicenseFileError:
        return
    assert canonical_text(license) == canonical_text(parse_unsigned(EXAMPLE))


def test_other_key_fails(signed: bytes) -> None:
    """A file signed by another vendor key is refused, naming both key ids."""
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(LicenseSignatureError, match=public_key_id(other)):
        verify_license(signed, other)


def test_forged_key_id_fails(key: Ed25519PrivateKey) -> None:
    """Claiming the vendor's key id does not help a signature made with another key."""
    forger = Ed25519PrivateKey.generate()
    forged = replace_once(
        sign_license(EXAMPLE, forger),
        public_key_id(forger.public_key()).encode(),
        public_key_id(key.public_key()).encode(),
    )
    with pytest.raises(LicenseSignatureError, match="does not match"):
        verify_license(forged, key.public_key())


def test_unsigned_fails(key: Ed25519PrivateKey) -> None:
    """An unsigned file is refused with advice on how to sign it."""
    advice = r"is not signed; sign it with `licensectl license sign`"
    with pytest.raises(LicenseSignatureError, match=advice):
        verify_license(EXAMPLE.encode(), key.public_key())


@pytest.mark.parametrize(
    ("old", "new", "key_name"),
    [
        (b"ed25519 = ", b"ed25519 = !!", "ed25519"),
        (b"ed25519 = ", b"ed25519 = AAAA", "ed25519"),
        (b"key_id = ", b"key_id = zz", "key_id"),
        (b"key_id = ", b"lost_id = ", "lost_id"),
    ],
)
def test_malformed_signature_section(
    signed: bytes, key: Ed25519PrivateKey, old: bytes, new: bytes, key_name: str
) -> None:
    """A damaged [signature] section is a format error naming the key."""
    with pytest.raises(LicenseFormatError, match=rf"\[signature\] {key_name}"):
        verify_license(replace_once(signed, old, new), key.public_key())


def test_signature_section_missing_signature(signed: bytes, key: Ed25519PrivateKey) -> None:
    """A [signature] section without the signature itself names the missing key."""
    head, _, _ = signed.partition(b"ed25519 = ")
    with pytest.raises(LicenseFormatError, match=r"\[signature\] ed25519: missing"):
        verify_license(head, key.public_key())


def test_malformed_signed_file_is_format_error(key: Ed25519PrivateKey) -> None:
    """A malformed body is reported as such even when the file carries a signature."""
    data = sign_license(MINIMAL, key).replace(b"count = 3", b"count = three")
    with pytest.raises(LicenseFormatError, match=r"\[feature:viewer\] count"):
        verify_license(data, key.public_key())


def test_not_utf8(key: Ed25519PrivateKey) -> None:
    """Bytes that are not UTF-8 are a format error, not a crash."""
    with pytest.raises(LicenseFormatError, match="UTF-8"):
        verify_license(b"[license]\nlicensee = \xff\n", key.public_key())


def test_oversized(key: Ed25519PrivateKey) -> None:
    """A file beyond the size limit is refused before it is parsed."""
    with pytest.raises(LicenseFormatError, match="bytes"):
        verify_license(b";" * (MAX_FILE_BYTES + 1), key.public_key())


def test_sign_refuses_malformed(key: Ed25519PrivateKey) -> None:
    """Signing validates first, so a vendor can never ship a malformed file."""
    with pytest.raises(LicenseFormatError, match=r"\[feature:viewer\] count"):
        sign_license(MINIMAL.replace("count = 3", "count = 0"), key)


def test_sign_refuses_signed_input(key: Ed25519PrivateKey, signed: bytes) -> None:
    """Signing an already signed file is refused rather than silently re-signed."""
    with pytest.raises(LicenseFormatError, match="already signed"):
        sign_license(signed.decode(), key)


def test_large_license(key: Ed25519PrivateKey) -> None:
    """A license with 200 features signs and verifies, with every feature intact."""
    text = "[license]\nsequence = 42\n" + "".join(
        f"[feature:feat-{i:03d}]\nversion = 1.{i}\ncount = {i + 1}\nexpires = never\n"
        for i in range(200)
    )
    license = verify_license(sign_license(text, key), key.public_key(), today=TODAY)
    assert len(license.features) == 200
    feature = license.feature("feat-199")
    assert feature is not None
    assert (feature.version, feature.count) == ("1.199", 200)


# Sequence numbers.


def test_read_sequence_signed(signed: bytes) -> None:
    """The sequence number of a signed file is read without a key."""
    assert read_sequence(signed) == 1


def test_read_sequence_does_not_verify(signed: bytes) -> None:
    """read_sequence does not check the signature: verification is a separate step."""
    assert read_sequence(replace_once(signed, b"sequence = 1", b"sequence = 99")) == 99


def test_read_sequence_unsigned() -> None:
    """An unsigned text also has a sequence number."""
    assert read_sequence(MINIMAL.encode()) == 7


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[feature:a]\ncount = 1\n",
        b"[license]\nlicensee = x\n",
        b"[license]\nsequence = x\n",
        b"\xff\xfe",
    ],
)
def test_read_sequence_missing(data: bytes) -> None:
    """A file without a valid sequence number is a format error."""
    with pytest.raises(LicenseFormatError, match="license"):
        read_sequence(data)


# Expiry.


def test_feature_expiry_boundary() -> None:
    """A feature is usable on its expiry day and expired the day after."""
    feature = parse_unsigned(EXAMPLE).feature("cad-pro")
    assert feature is not None
    assert not feature.expired(datetime.date(2027, 12, 31))
    assert feature.expired(datetime.date(2028, 1, 1))


def test_never_expires() -> None:
    """A feature that expires 'never' is never expired."""
    feature = parse_unsigned(MINIMAL).feature("viewer")
    assert feature is not None
    assert not feature.expired(datetime.date.max)


def test_verify_expired_file(key: Ed25519PrivateKey, signed: bytes) -> None:
    """A file whose every feature has expired is refused, naming the last expiry."""
    with pytest.raises(LicenseFileExpired, match="2027-12-31"):
        verify_license(signed, key.public_key(), today=datetime.date(2028, 1, 1))


def test_verify_without_today_skips_expiry(key: Ed25519PrivateKey, signed: bytes) -> None:
    """With no date given, expiry is not checked (e.g. when only reading a stored file)."""
    assert verify_license(signed, key.public_key()).sequence == 1


def test_verify_partly_expired_file(key: Ed25519PrivateKey) -> None:
    """A file with one feature still valid is accepted; only expired features are refused."""
    text = EXAMPLE + "[feature:viewer]\nversion = 1\ncount = 1\nexpires = 2030-01-01\n"
    today = datetime.date(2028, 1, 1)
    license = verify_license(sign_license(text, key), key.public_key(), today=today)
    cad = license.feature("cad-pro")
    assert cad is not None
    assert cad.expired(today)


def test_expiry_checked_after_signature(signed: bytes) -> None:
    """An expired file signed by another key is reported as a signature problem first."""
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(LicenseSignatureError):
        verify_license(signed, other, today=datetime.date(2030, 1, 1))


# Versions.


@pytest.mark.parametrize(
    ("requested", "satisfied"),
    [
        ("2.0", True),
        ("2", True),
        ("2.0.0", True),
        ("1.9", True),
        ("1", True),
        ("0", True),
        ("02.0", True),
        ("2.0.1", False),
        ("2.1", False),
        ("3", False),
        ("10", False),
        ("", False),
        ("2.x", False),
        ("v2", False),
        ("2.", False),
        (" 2", False),
        ("1" * 5000, False),
    ],
)
def test_version_satisfies(requested: str, satisfied: bool) -> None:
    """A license for 2.0 serves requests up to 2.0; junk is never satisfied."""
    feature = parse_unsigned(EXAMPLE).feature("cad-pro")
    assert feature is not None
    assert feature.version_satisfies(requested) is satisfied


def test_version_satisfies_non_string() -> None:
    """A non-string request (from a confused caller) is not satisfied rather than crashing."""
    feature = parse_unsigned(EXAMPLE).feature("cad-pro")
    assert feature is not None
    assert feature.version_satisfies(2) is False  # type: ignore[arg-type]


# Allocations.


def _feature(count: int, distribution: dict[str, int] | None = None) -> Feature:
    """A feature built directly, to test allocations apart from parsing."""
    return Feature(
        name="f",
        version="1",
        count=count,
        expires=None,
        majority_rule=True,
        lease_ttl=60.0,
        distribution=distribution,
    )


def test_allocations_from_distribution() -> None:
    """A complete distribution is used as written."""
    feature = parse_unsigned(EXAMPLE).feature("cad-pro")
    assert feature is not None
    assert feature.allocations(["ls1", "ls2", "ls3"]) == {"ls1": 4, "ls2": 3, "ls3": 3}


def test_allocations_partial_distribution() -> None:
    """Members the distribution leaves out get 0, then unassigned seats go round-robin."""
    feature = _feature(10, {"ls1": 4})
    assert feature.allocations(["ls1", "ls2", "ls3"]) == {"ls1": 6, "ls2": 2, "ls3": 2}
    assert _feature(9, {"ls2": 2}).allocations(["ls1", "ls2", "ls3"]) == {
        "ls1": 3,
        "ls2": 4,
        "ls3": 2,
    }


def test_allocations_distribution_to_absent_server() -> None:
    """Seats given to a server that is not a member are dealt out to the members."""
    assert _feature(10, {"ls1": 4, "gone": 6}).allocations(["ls1", "ls2"]) == {"ls1": 7, "ls2": 3}


def test_allocations_even_split() -> None:
    """Without a distribution, seats split evenly with the remainder to the first members."""
    assert _feature(10).allocations(["a", "b", "c"]) == {"a": 4, "b": 3, "c": 3}
    assert _feature(2).allocations(["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}


def test_allocations_need_unique_members() -> None:
    """No members, or a member named twice, cannot be given a well-defined split."""
    with pytest.raises(ValueError):
        _feature(3).allocations([])
    with pytest.raises(ValueError):
        _feature(3).allocations(["a", "a"])


_member_names = st.lists(
    st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True), min_size=1, max_size=11, unique=True
)


@st.composite
def _features_and_members(draw: st.DrawFn) -> tuple[Feature, list[str]]:
    members = draw(_member_names)
    count = draw(st.integers(min_value=1, max_value=1_000_000))
    if not draw(st.booleans()):
        return _feature(count), members
    named = draw(st.lists(st.sampled_from([*members, "outsider"]), unique=True))
    distribution: dict[str, int] = {}
    left = count
    for name in named:
        distribution[name] = draw(st.integers(min_value=0, max_value=left))
        left -= distribution[name]
    return _feature(count, distribution), members


@given(_features_and_members())
def test_allocations_sum_to_count(case: tuple[Feature, list[str]]) -> None:
    """Allocations cover exactly the members, are never negative and sum to the count."""
    feature, members = case
    allocations = feature.allocations(members)
    assert list(allocations) == members
    assert sum(allocations.values()) == feature.count
    assert all(n >= 0 for n in allocations.values())
    for member in members:
        assert allocations[member] >= (feature.distribution or {}).get(member, 0)


# Generated licenses: any layout of the same content signs the same.


@st.composite
def _license_texts(draw: st.DrawFn) -> tuple[str, str]:
    """Two texts of the same random license, with shuffled keys, spacing and comments."""
    features = draw(
        st.dictionaries(
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,10}", fullmatch=True),
            st.fixed_dictionaries(
                {
                    "version": st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,2}", fullmatch=True),
                    "count": st.integers(1, 1000).map(str),
                    "expires": st.one_of(st.just("never"), st.dates().map(datetime.date.isoformat)),
                },
                optional={
                    "majority_rule": st.sampled_from(["yes", "no", "1", "0", "True"]),
                    "lease_ttl": st.integers(1, 3600).map(str),
                },
            ),
            min_size=1,
            max_size=5,
        )
    )
    head = {"sequence": str(draw(st.integers(1, 2**40)))}
    if draw(st.booleans()):
        head["licensee"] = draw(st.sampled_from(["ACME Corp", "Müller GmbH", "x;y"]))

    def render(shuffle: bool) -> str:
        sections = [("license", head)] + [(f"feature:{n}", v) for n, v in features.items()]
        if shuffle:
            sections = draw(st.permutations(sections))
        out = []
        for name, values in sections:
            out.append(f"[{name}]")
            items = list(values.items())
            if shuffle:
                items = draw(st.permutations(items))
            for key, value in items:
                space = draw(st.sampled_from(["", " ", "\t"])) if shuffle else " "
                comment = draw(st.sampled_from(["", " ; note", "\t# x"])) if shuffle else ""
                out.append(f"{space}{key}{space}={space}{value}{comment}")
            if shuffle and draw(st.booleans()):
                out.append("; a comment line")
        return "\n".join(out) + "\n"

    return render(False), render(True)


@given(_license_texts())
def test_layout_never_changes_signature(texts: tuple[str, str]) -> None:
    """Two layouts of the same content sign to the same bytes, which verify."""
    plain, shuffled = texts
    signed = sign_license(plain, _PROPERTY_KEY)
    assert sign_license(shuffled, _PROPERTY_KEY) == signed
    license = verify_license(signed, _PROPERTY_KEY.public_key())
    assert canonical_text(license) == canonical_text(parse_unsigned(plain))


# Vendor keys.


def test_generate_vendor_keys(tmp_path: Path) -> None:
    """The generated pair signs and verifies, with the private key readable by its owner only."""
    private_path, public_path = generate_vendor_keys(tmp_path / "vendor" / "keys")
    assert private_path == tmp_path / "vendor" / "keys" / "vendor.key"
    assert public_path == tmp_path / "vendor" / "keys" / "vendor.pub"
    assert stat.S_IMODE(os.stat(private_path).st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signed = sign_license(EXAMPLE, load_private_key(private_path))
    assert verify_license(signed, load_public_key(public_path)).sequence == 1


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    """An existing vendor key is never replaced."""
    private_path, _ = generate_vendor_keys(tmp_path)
    before = private_path.read_bytes()
    with pytest.raises(LicensingError, match="already exists"):
        generate_vendor_keys(tmp_path)
    assert private_path.read_bytes() == before


def test_load_private_key_missing(tmp_path: Path) -> None:
    """A missing key file is a PKIError naming the file."""
    with pytest.raises(PKIError, match=r"nope\.key: no such file"):
        load_private_key(tmp_path / "nope.key")


def test_load_private_key_garbage(tmp_path: Path) -> None:
    """A file that is not a PEM key is a PKIError naming the file."""
    path = tmp_path / "vendor.key"
    path.write_bytes(b"hello")
    with pytest.raises(PKIError, match=r"vendor\.key: not a PEM private key"):
        load_private_key(path)


def test_load_private_key_encrypted(tmp_path: Path) -> None:
    """An encrypted key is refused with a reason rather than a password prompt."""
    path = tmp_path / "vendor.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")
        )
    )
    with pytest.raises(PKIError, match="encrypted"):
        load_private_key(path)


def test_load_keys_wrong_algorithm(tmp_path: Path) -> None:
    """An EC key is refused: vendor keys are Ed25519."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    private_path = tmp_path / "ec.key"
    public_path = tmp_path / "ec.pub"
    private_path.write_bytes(
        ec_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    public_path.write_bytes(
        ec_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(PKIError, match="Ed25519"):
        load_private_key(private_path)
    with pytest.raises(PKIError, match="Ed25519"):
        load_public_key(public_path)


def test_load_public_key_given_private_key(tmp_path: Path) -> None:
    """Configuring the private key where the public one belongs is caught and explained."""
    private_path, _ = generate_vendor_keys(tmp_path)
    with pytest.raises(PKIError, match="holds a private key"):
        load_public_key(private_path)


def test_load_public_key_missing(tmp_path: Path) -> None:
    """A missing public key file is a PKIError naming the file."""
    with pytest.raises(PKIError, match=r"vendor\.pub: no such file"):
        load_public_key(tmp_path / "vendor.pub")


def test_license_repr_omits_bytes(signed: bytes, key: Ed25519PrivateKey) -> None:
    """Logging a License does not dump the whole file."""
    license: License = verify_license(signed, key.public_key())
    assert "signature" not in repr(license)
