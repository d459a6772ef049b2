"""Tests for licensectl (licensing.cli): the offline verbs through main(argv), and the
console script as a subprocess for a verb that needs the network.

Every failure must be one line on stderr, starting with ``licensectl:``, and a
non-zero exit: operators script these commands.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from licensing.cli import main
from licensing.sandbox import license_text

from .conftest import FEATURES

LICENSECTL = [str(Path(sys.executable).with_name("licensectl"))]
if not Path(LICENSECTL[0]).exists():
    LICENSECTL = [sys.executable, "-c", "from licensing.cli import main; main()"]


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run licensectl in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def one_error_line(code: int, err: str) -> str:
    """Assert the failure shape every verb shares, and return the message."""
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("licensectl: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def vendor(tmp_path: Path, capsys) -> Path:
    """A directory with vendor.key and vendor.pub made by licensectl."""
    assert run(capsys, "vendor", "keygen", tmp_path / "vendor")[0] == 0
    return tmp_path / "vendor"


@pytest.fixture
def signed(tmp_path: Path, vendor: Path, capsys) -> Path:
    """A license signed by licensectl with the ``FEATURES`` of the unit tests."""
    unsigned = tmp_path / "license.txt"
    unsigned.write_text(license_text(4, FEATURES, "Test Corp"))
    code, out, _ = run(capsys, "license", "sign", "--key", vendor / "vendor.key", unsigned,
                       tmp_path / "license.lic")
    assert code == 0 and "license.lic" in out
    return tmp_path / "license.lic"


def test_pki_init_and_issue(tmp_path: Path, capsys) -> None:
    """init writes the CA; issue writes a member's and a client's certificate and key."""
    pki = tmp_path / "pki"
    code, out, _ = run(capsys, "pki", "init", pki)
    assert code == 0 and "ca.pem" in out
    assert run(capsys, "pki", "issue", pki, "ls1", "--host", "10.0.0.5")[0] == 0
    assert run(capsys, "pki", "issue", pki, "app", "--client")[0] == 0
    for name in ("ca", "ls1", "app"):
        assert (pki / f"{name}.pem").exists()
        assert stat.S_IMODE((pki / f"{name}.key").stat().st_mode) == 0o600

    from cryptography import x509

    cert = x509.load_pem_x509_certificate((pki / "ls1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "ls1" in sans.get_values_for_type(x509.DNSName)
    assert "10.0.0.5" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def test_pki_init_twice_is_one_line(tmp_path: Path, capsys) -> None:
    """Replacing a CA is refused in one line."""
    run(capsys, "pki", "init", tmp_path)
    message = one_error_line(*run(capsys, "pki", "init", tmp_path)[::2])
    assert "already exists" in message


def test_pki_issue_without_a_ca_is_one_line(tmp_path: Path, capsys) -> None:
    """Issuing with no CA in the directory says so in one line."""
    message = one_error_line(*run(capsys, "pki", "issue", tmp_path, "ls1")[::2])
    assert "ca" in message


def test_vendor_keygen(vendor: Path, capsys) -> None:
    """keygen writes a private key only its owner reads and a public key; never twice."""
    assert stat.S_IMODE((vendor / "vendor.key").stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in (vendor / "vendor.pub").read_bytes()
    message = one_error_line(*run(capsys, "vendor", "keygen", vendor)[::2])
    assert "refusing to replace" in message


def test_license_verify(signed: Path, vendor: Path, capsys) -> None:
    """verify reports the sequence and the number of features."""
    code, out, _ = run(capsys, "license", "verify", "--pub", vendor / "vendor.pub", signed)
    assert code == 0
    assert out.strip() == f"{signed}: valid, sequence 4, 3 feature(s)"


def test_license_verify_tampered_is_one_line(signed: Path, vendor: Path, capsys) -> None:
    """A file changed after signing fails verification in one line."""
    signed.write_bytes(signed.read_bytes().replace(b"count = 3", b"count = 30"))
    message = one_error_line(*run(capsys, "license", "verify", "--pub", vendor / "vendor.pub",
                                  signed)[::2])
    assert "changed after it was signed" in message


def test_license_verify_with_another_vendor_key(signed: Path, tmp_path: Path, capsys) -> None:
    """A file signed by another vendor is refused, naming both key ids."""
    run(capsys, "vendor", "keygen", tmp_path / "other")
    message = one_error_line(*run(capsys, "license", "verify", "--pub",
                                  tmp_path / "other" / "vendor.pub", signed)[::2])
    assert "signed by vendor key" in message


def test_license_show(signed: Path, capsys) -> None:
    """show prints the header and one row per feature; --json is machine-readable."""
    code, out, _ = run(capsys, "license", "show", signed)
    assert code == 0
    assert out.splitlines()[0] == "sequence 4  licensee Test Corp  signed"
    assert any(line.split()[:3] == ["cad-pro", "2.0", "3"] for line in out.splitlines())
    code, out, _ = run(capsys, "license", "show", "--json", signed)
    doc = json.loads(out)
    assert doc["sequence"] == 4 and doc["signed"] is True
    assert {f["name"]: f["count"] for f in doc["features"]} == {
        "cad-pro": 3, "viewer": 10, "old": 5}


def test_license_show_unsigned(tmp_path: Path, capsys) -> None:
    """An unsigned file can be shown and says it is unsigned."""
    unsigned = tmp_path / "license.txt"
    unsigned.write_text(license_text(1, FEATURES))
    code, out, _ = run(capsys, "license", "show", unsigned)
    assert code == 0 and "UNSIGNED" in out.splitlines()[0]


def test_license_sign_malformed_is_one_line(tmp_path: Path, vendor: Path, capsys) -> None:
    """A malformed input names the section and key at fault."""
    bad = tmp_path / "bad.txt"
    bad.write_text("[license]\nsequence = first\n")
    message = one_error_line(*run(capsys, "license", "sign", "--key", vendor / "vendor.key",
                                  bad, tmp_path / "out.lic")[::2])
    assert "[license] sequence" in message
    assert not (tmp_path / "out.lic").exists()


@pytest.mark.parametrize("verb", [("license", "show"), ("license", "verify", "--pub", "x.pub")])
def test_missing_file_is_one_line(tmp_path: Path, capsys, verb) -> None:
    """A file that does not exist is named in one line."""
    message = one_error_line(*run(capsys, *verb, tmp_path / "none.lic")[::2])
    assert "none.lic" in message or "x.pub" in message


@pytest.mark.parametrize("verb", [("status",), ("checkout", "cad-pro"), ("checkin", "0" * 32),
                                  ("license", "install", "x.lic"), ("license", "push", "x.lic")])
def test_pool_verbs_need_a_config(capsys, verb) -> None:
    """Verbs that talk to a pool say that they need --config."""
    message = one_error_line(*run(capsys, *verb)[::2])
    assert "needs --config" in message


def test_unknown_verb_is_a_usage_error(capsys) -> None:
    """argparse's usage errors exit 2."""
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_status_of_a_pool_that_is_down(tmp_path: Path) -> None:
    """The console script reports an unreachable pool in one line and exits 1."""
    from licensing.sandbox import make_sandbox

    box = make_sandbox(tmp_path, ("ls1",), store="memory")
    result = subprocess.run([*LICENSECTL, "--config", str(box.ini), "status"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("licensectl: ")
    assert "ls1" in lines[0] and "Refused" in lines[0]


def test_format_status_tables(solo) -> None:
    """`licensectl status` prints who answered, the license, members, features and leases."""
    from licensing.cli import format_status

    from .conftest import resolve

    lease = resolve(solo.server.checkout("cad-pro", "", "app-1", "alice", "ws1", 2))
    text = format_status(solo.server.status(verbose=True), verbose=True)
    lines = text.splitlines()
    assert lines[0] == "asked ls1: role leader, leader ls1, term 0"
    assert lines[1] == "license sequence 1 (Test Corp)"
    rows = {line.split()[0]: line.split() for line in lines if line and line[0] != "-"}
    assert rows["cad-pro"][:5] == ["cad-pro", "2.0", "3", "2", "1"]
    assert rows["old"][5:7] == ["2030-01-01", "EXPIRED"]
    assert rows[lease.lease_id][1:6] == ["cad-pro", "2", "app-1", "alice", "ws1"]
    assert rows["ls1"][1:3] == ["leader", "yes"]


@pytest.mark.allow_logged_errors
def test_format_status_without_a_license(make_solo) -> None:
    """A server with no license says so instead of an empty table of features.

    (Its start logs the refused empty license file.)
    """
    from licensing.cli import format_status

    s = make_solo(license=b"")
    assert format_status(s.server.status()).splitlines()[1] == "no license installed"


def test_license_install_refuses_an_expired_file(tmp_path: Path) -> None:
    """install judges expiry as the running pool does on push: a file whose every feature has
    expired is refused in one line, and the member's store is not even created."""
    from licensing.sandbox import make_sandbox

    box = make_sandbox(tmp_path, ("ls1",), store="sqlite")
    expired = {name: {**f, "expires": "2020-01-31"} for name, f in FEATURES.items()}
    result = subprocess.run([*LICENSECTL, "--config", str(box.ini), "license", "install", "--name", "ls1",
                             str(box.sign(9, expired, name="expired.lic"))],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == ""
    message = one_error_line(result.returncode, result.stderr)
    assert "every feature has expired" in message and "2020-01-31" in message
    assert not (tmp_path / "data" / "ls1.db").exists()
