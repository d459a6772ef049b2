"""Tests for the twistd plugin (twisted/plugins/licensing_plugin.py) and licensing.tap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from zope.interface.verify import verifyObject

from licensing.sandbox import make_sandbox
from licensing.tap import Options, makeService

TWISTD = [str(Path(sys.executable).with_name("twistd"))]
if not Path(TWISTD[0]).exists():
    TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def licensing_plugin() -> object:
    import twisted.plugins

    found = [p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "licensing"]
    assert found, "no IServiceMaker plugin named licensing"
    assert {p.module for p in found} == {"licensing.tap"}
    return found[0]


def test_plugin_is_found_and_provides_its_interfaces() -> None:
    """getPlugins finds the "licensing" service maker, and it is a valid one."""
    plugin = licensing_plugin()
    assert verifyObject(IServiceMaker, plugin)
    assert verifyObject(IPlugin, plugin)
    assert plugin.options is Options


@pytest.fixture
def bad_ini(tmp_path: Path) -> Path:
    """A pool.ini with an unknown key in [pool]."""
    ini = tmp_path / "bad.ini"
    ini.write_text("[pool]\nmembers = ls1\nca = ca.pem\nvendor_key = v.pub\nbogus = 1\n")
    return ini


def test_bad_config_is_a_usage_error_naming_file_section_and_key(bad_ini: Path) -> None:
    """A configuration error surfaces as UsageError with the file, section and key."""
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--config", str(bad_ini)])
    message = str(caught.value)
    assert str(bad_ini) in message and "[pool]" in message and "bogus" in message


def test_config_is_required() -> None:
    """Without --config the options say how to give one."""
    with pytest.raises(usage.UsageError, match="--config is required"):
        Options().parseOptions([])


def test_missing_config_file(tmp_path: Path) -> None:
    """A path that does not exist is named in the error."""
    with pytest.raises(usage.UsageError, match="nowhere.ini"):
        Options().parseOptions(["--config", str(tmp_path / "nowhere.ini")])


@pytest.fixture
def sandbox_ini(tmp_path: Path) -> Path:
    """A complete, valid one-member pool directory (memory store)."""
    return make_sandbox(tmp_path / "pool", ("ls1",), store="memory").ini


def test_unknown_member_name(sandbox_ini: Path) -> None:
    """--name of a server not in the pool names the [pool] members key."""
    with pytest.raises(usage.UsageError, match=r"\[pool\] members: no member named 'ls9'"):
        Options().parseOptions(["--config", str(sandbox_ini), "--name", "ls9"])


def test_missing_certificate_names_its_key(sandbox_ini: Path) -> None:
    """A file the member needs but that is missing is refused before anything starts."""
    (sandbox_ini.parent / "pki" / "ls1.pem").unlink()
    with pytest.raises(usage.UsageError, match=r"\[server:ls1\] cert"):
        Options().parseOptions(["--config", str(sandbox_ini)])


def test_good_config_makes_the_service_tree(sandbox_ini: Path) -> None:
    """Valid options carry the settings, and makeService builds (not starts) the tree."""
    options = Options()
    options.parseOptions(["--config", str(sandbox_ini)])
    assert options["member"] == "ls1"
    service = makeService(options)
    assert verifyObject(IService, service)
    assert isinstance(service, MultiService)
    assert not service.running
    assert len(list(service)) == 2  # the client listener and the HTTP status listener


def test_twistd_with_a_bad_config_exits_with_one_line(bad_ini: Path) -> None:
    """`twistd licensing --config bad.ini` exits non-zero with the error once, no traceback."""
    result = subprocess.run([*TWISTD, "-n", "licensing", "--config", str(bad_ini)],
                            capture_output=True, text=True, timeout=60, cwd=bad_ini.parent,
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "bogus" in line]
    assert len(error_lines) == 1
    assert str(bad_ini) in error_lines[0] and "[pool] bogus: unknown key" in error_lines[0]
