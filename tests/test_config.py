"""Tests for licensing.config: loading, validation, file checks and rendering of pool.ini."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from licensing.config import (
    Address,
    ClientSettings,
    PoolSettings,
    ServerSettings,
    StoreSpec,
    Timings,
    load_config,
    parse_address,
    render_config,
)
from licensing.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "pool.ini"

Sections = dict[str, dict[str, str]]


def pool_sections(*members: str) -> Sections:
    """A valid pool of ``members`` (default three) as section -> key -> value."""
    members = members or ("ls1", "ls2", "ls3")
    sections: Sections = {
        "pool": {"members": ", ".join(members), "ca": "pki/ca.pem", "vendor_key": "vendor.pub"}
    }
    for offset, name in enumerate(members):
        sections[f"server:{name}"] = {
            "client": f"127.0.0.1:{7401 + offset}",
            "peer": f"127.0.0.1:{7501 + offset}",
            "http": f"127.0.0.1:{7601 + offset}",
            "cert": f"pki/{name}.pem",
            "key": f"pki/{name}.key",
            "store": f"sqlite:data/{name}.db",
        }
    return sections


def write_ini(folder: Path, sections: Sections) -> Path:
    """Write ``sections`` as pool.ini in ``folder`` and return its path."""
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()) + "\n"
        for section, values in sections.items()
    )
    path = folder / "pool.ini"
    path.write_text(text)
    return path


def assert_names(error: ConfigError, path: Path, section: str | None, key: str | None) -> None:
    """The error carries file, section and key, and its text names all three."""
    assert (error.path, error.section, error.key) == (str(path), section, key)
    text = str(error)
    assert str(path) in text
    if section is not None:
        assert f"[{section}]" in text
    if key is not None:
        assert key in text


def test_example_loads() -> None:
    """The shipped etc/pool.ini is a valid three-member pool with etc/-relative paths."""
    settings = load_config(EXAMPLE)
    folder = EXAMPLE.parent
    assert settings.members == ("ls1", "ls2", "ls3")
    assert settings.ca == folder / "pki" / "ca.pem"
    assert settings.vendor_key == folder / "vendor.pub"
    assert settings.timings == Timings()
    for offset, name in enumerate(settings.members):
        server = settings.server(name)
        assert server.client == Address("127.0.0.1", 7401 + offset)
        assert server.peer == Address("127.0.0.1", 7501 + offset)
        assert server.http == Address("127.0.0.1", 7601 + offset)
        assert server.cert == folder / "pki" / f"{name}.pem"
        assert server.store == StoreSpec("sqlite", folder / "data" / f"{name}.db")
        assert server.preference == offset + 1
    assert settings.client is not None
    assert settings.client.cert == folder / "pki" / "client.pem"


def test_one_member_pool(tmp_path: Path) -> None:
    """A single member is a valid pool, and server() needs no name for it."""
    sections = pool_sections("solo")
    sections["server:solo"]["store"] = "memory:"
    del sections["server:solo"]["http"]
    settings = load_config(write_ini(tmp_path, sections))
    server = settings.server()
    assert server.name == "solo"
    assert server.http is None
    assert server.store == StoreSpec("memory", None)
    assert server.preference == 1
    assert settings.license is None
    assert settings.client is None


def test_server_needs_a_name_in_a_larger_pool(tmp_path: Path) -> None:
    """With several members, server() without a name (or with a wrong one) points at --name."""
    path = write_ini(tmp_path, pool_sections())
    settings = load_config(path)
    for name in (None, "ls9"):
        with pytest.raises(ConfigError) as info:
            settings.server(name)
        assert "--name" in str(info.value)
        assert_names(info.value, path, "pool", "members")


def test_paths_resolve_against_the_ini_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are taken from the INI's folder, not the working directory; absolute stay."""
    folder = tmp_path / "conf"
    folder.mkdir()
    sections = pool_sections("ls1")
    sections["pool"]["vendor_key"] = str(tmp_path / "keys" / "vendor.pub")
    sections["pool"]["license"] = "../licenses/site.lic"
    write_ini(folder, sections)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_config(Path("..") / "conf" / "pool.ini")
    assert settings.path.is_absolute()
    assert settings.ca == settings.path.parent / "pki" / "ca.pem"
    assert settings.ca.resolve() == folder / "pki" / "ca.pem"
    assert settings.vendor_key == tmp_path / "keys" / "vendor.pub"
    assert settings.license is not None
    assert settings.license.resolve() == tmp_path / "licenses" / "site.lic"
    assert settings.server().store.path is not None
    assert settings.server().store.path.resolve() == folder / "data" / "ls1.db"


def test_inline_comments_and_optional_values(tmp_path: Path) -> None:
    """Comments with ; or # after a value are ignored; an empty optional key means unset."""
    path = tmp_path / "pool.ini"
    path.write_text(
        "# a pool of one\n"
        "[pool]\n"
        "members = ls1   ; just one\n"
        "ca = pki/ca.pem # the pool CA\n"
        "vendor_key = vendor.pub\n"
        "license =\n"
        "peer_heartbeat = 0.1 ; faster\n"
        "snapshot_every = 10\n"
        "[server:ls1]\n"
        "client = [::1]:7401 ; IPv6\n"
        "peer = LS1.Example.org:0 # any port\n"
        "http = 0.0.0.0:0\n"
        "cert = pki/ls1.pem\n"
        "key = pki/ls1.key\n"
        "store = sqlite:data/ls1.db ; durable\n"
        "preference = 7\n"
        "[client]\n"
        "cert = pki/client.pem\n"
        "key = pki/client.key\n"
        "home = ls1 ; try it first\n"
        "heartbeat = 5\n"
        "request_timeout = 0.5\n"
    )
    settings = load_config(path)
    assert settings.license is None
    assert settings.timings == Timings(peer_heartbeat=0.1, snapshot_every=10)
    server = settings.server("ls1")
    assert server.client == Address("::1", 7401)
    assert str(server.client) == "[::1]:7401"
    assert server.peer == Address("ls1.example.org", 0)
    assert server.http == Address("0.0.0.0", 0)
    assert server.preference == 7
    assert settings.client == ClientSettings(
        cert=tmp_path / "pki" / "client.pem",
        key=tmp_path / "pki" / "client.key",
        home="ls1",
        heartbeat=5.0,
        request_timeout=0.5,
    )


def test_members_may_continue_on_indented_lines(tmp_path: Path) -> None:
    """A long members list may be wrapped onto indented continuation lines."""
    sections = pool_sections()
    sections["pool"]["members"] = "ls1,\n  ls2,\n  ls3"
    assert load_config(write_ini(tmp_path, sections)).members == ("ls1", "ls2", "ls3")


def test_documented_examples_load(tmp_path: Path) -> None:
    """Every INI example in docs/configuration.md is a valid configuration."""
    text = (EXAMPLE.parent.parent / "docs" / "configuration.md").read_text()
    examples = re.findall(r"```ini\n(.*?)```", text, re.S)
    assert examples
    for number, example in enumerate(examples):
        path = tmp_path / f"example{number}.ini"
        path.write_text(example)
        load_config(path)


def test_port_zero_may_repeat(tmp_path: Path) -> None:
    """Port 0 lets the OS pick, so several listeners may ask for it on one host."""
    sections = pool_sections("ls1", "ls2")
    for name in ("ls1", "ls2"):
        for key in ("client", "peer", "http"):
            sections[f"server:{name}"][key] = "127.0.0.1:0"
    settings = load_config(write_ini(tmp_path, sections))
    assert settings.server("ls2").peer == Address("127.0.0.1", 0)


def test_eleven_members_are_allowed(tmp_path: Path) -> None:
    """Eleven is the largest pool."""
    members = tuple(f"ls{number}" for number in range(1, 12))
    assert load_config(write_ini(tmp_path, pool_sections(*members))).members == members


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7401", Address("127.0.0.1", 7401)),
        ("[::1]:0", Address("::1", 0)),
        ("[0:0::1]:65535", Address("::1", 65535)),
        ("License-1.example.COM:80", Address("license-1.example.com", 80)),
        ("localhost:7401", Address("localhost", 7401)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    """IPv4, bracketed IPv6 and host names parse, normalised so equal addresses compare equal."""
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["abc", "127.0.0.1", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:http", "::1:7401",
     "[::1]7401", "[::g]:1", ":7401", "999.1.1.1:7401", "bad_host:1", "-a.example:1"],
)
def test_parse_address_refuses(text: str) -> None:
    """Anything but host:port with a port of 0..65535 is refused with a reason."""
    with pytest.raises(ValueError):
        parse_address(text)


def _set(section: str, key: str, value: str) -> Callable[[Sections], None]:
    def change(sections: Sections) -> None:
        sections.setdefault(section, {})[key] = value

    return change


def _drop(section: str, key: str | None = None) -> Callable[[Sections], None]:
    def change(sections: Sections) -> None:
        if key is None:
            del sections[section]
        else:
            del sections[section][key]

    return change


def _add_client(**values: str) -> Callable[[Sections], None]:
    def change(sections: Sections) -> None:
        sections["client"] = {"cert": "pki/client.pem", "key": "pki/client.key", **values}

    return change


def _many_members(sections: Sections) -> None:
    members = [f"ls{number}" for number in range(1, 13)]
    sections.clear()
    sections.update(pool_sections(*members))


def _same_ipv6_client_address(sections: Sections) -> None:
    sections["server:ls1"]["client"] = "[::1]:9"
    sections["server:ls2"]["client"] = "[0::1]:9"


INVALID: list[tuple[str, Callable[[Sections], None], str | None, str | None, str]] = [
    ("unknown section", _set("extra", "a", "1"), "extra", None, "unknown section"),
    ("default section", _set("DEFAULT", "a", "1"), "DEFAULT", None, "unknown section"),
    ("unknown pool key", _set("pool", "electon_timeout", "1"), "pool", "electon_timeout",
     "did you mean election_timeout"),
    ("unknown server key", _set("server:ls1", "port", "1"), "server:ls1", "port", "unknown key"),
    ("unknown client key", _add_client(colour="red"), "client", "colour", "unknown key"),
    ("missing pool", _drop("pool"), "pool", None, "missing section"),
    ("missing members", _drop("pool", "members"), "pool", "members", "missing"),
    ("missing ca", _drop("pool", "ca"), "pool", "ca", "missing"),
    ("missing vendor_key", _drop("pool", "vendor_key"), "pool", "vendor_key", "missing"),
    ("missing client addr", _drop("server:ls2", "client"), "server:ls2", "client", "missing"),
    ("missing peer", _drop("server:ls2", "peer"), "server:ls2", "peer", "missing"),
    ("missing cert", _drop("server:ls2", "cert"), "server:ls2", "cert", "missing"),
    ("missing key", _drop("server:ls2", "key"), "server:ls2", "key", "missing"),
    ("missing store", _drop("server:ls2", "store"), "server:ls2", "store", "missing"),
    ("client without cert", _add_client(cert=""), "client", "cert", "missing"),
    ("zero heartbeat", _set("pool", "peer_heartbeat", "0"), "pool", "peer_heartbeat",
     "greater than 0"),
    ("negative timing", _set("pool", "status_report", "-1"), "pool", "status_report",
     "greater than 0"),
    ("word timing", _set("pool", "request_timeout", "abc"), "pool", "request_timeout",
     "got 'abc'"),
    ("nan timing", _set("pool", "client_heartbeat", "nan"), "pool", "client_heartbeat",
     "greater than 0"),
    ("infinite timing", _set("pool", "allocation_lease", "inf"), "pool", "allocation_lease",
     "greater than 0"),
    ("election too short", _set("pool", "election_timeout", "0.4"), "pool", "election_timeout",
     "twice peer_heartbeat"),
    ("lease too short", _set("pool", "allocation_lease", "0.2"), "pool", "allocation_lease",
     "more than peer_heartbeat"),
    ("drift of one", _set("pool", "clock_drift", "1"), "pool", "clock_drift", "fraction"),
    ("negative drift", _set("pool", "clock_drift", "-0.1"), "pool", "clock_drift", "fraction"),
    ("small snapshots", _set("pool", "snapshot_every", "9"), "pool", "snapshot_every",
     "at least 10"),
    ("fractional snapshots", _set("pool", "snapshot_every", "10.5"), "pool", "snapshot_every",
     "whole number"),
    ("zero preference", _set("server:ls1", "preference", "0"), "server:ls1", "preference",
     "at least 1"),
    ("client heartbeat", _add_client(heartbeat="0"), "client", "heartbeat", "greater than 0"),
    ("client timeout", _add_client(request_timeout="x"), "client", "request_timeout", "seconds"),
    ("client home", _add_client(home="ls9"), "client", "home", "one of the members"),
    ("empty members", _set("pool", "members", ""), "pool", "members", "missing"),
    ("empty member name", _set("pool", "members", "ls1,,ls2"), "pool", "members", "empty name"),
    ("duplicate member", _set("pool", "members", "ls1, ls2, ls1"), "pool", "members", "twice"),
    ("duplicate by case", _set("pool", "members", "ls1, LS1"), "pool", "members", "twice"),
    ("bad member name", _set("pool", "members", "ls1, -ls2"), "pool", "members", "'-ls2'"),
    ("spaces in members", _set("pool", "members", "ls1 ls2"), "pool", "members", "commas"),
    ("long member name", _set("pool", "members", "a" * 64), "pool", "members", "1 to 63"),
    ("twelve members", _many_members, "pool", "members", "at most 11"),
    ("member without section", _drop("server:ls3"), "server:ls3", None, "missing section"),
    ("section for non-member", _set("server:ls4", "client", "127.0.0.1:1"), "server:ls4", None,
     "not in [pool] members"),
    ("shared address", _set("server:ls2", "peer", "127.0.0.1:7401"), "server:ls2", "peer",
     "already used by [server:ls1] client"),
    ("same address twice in one server", _set("server:ls1", "http", "127.0.0.1:7501"),
     "server:ls1", "http", "already used by [server:ls1] peer"),
    ("same IPv6 address", _same_ipv6_client_address, "server:ls2", "client", "already used"),
    ("bad address", _set("server:ls1", "client", "abc"), "server:ls1", "client",
     "expected host:port such as 127.0.0.1:7401, got 'abc'"),
    ("bare IPv6", _set("server:ls1", "peer", "::1:7501"), "server:ls1", "peer", "brackets"),
    ("port too large", _set("server:ls1", "http", "127.0.0.1:70000"), "server:ls1", "http",
     "0 to 65535"),
    ("unknown store", _set("server:ls1", "store", "redis:db"), "server:ls1", "store",
     "expected sqlite:PATH or memory:"),
    ("store without scheme", _set("server:ls1", "store", "data/ls1.db"), "server:ls1", "store",
     "sqlite:PATH"),
    ("sqlite without path", _set("server:ls1", "store", "sqlite:"), "server:ls1", "store",
     "database file"),
    ("memory with path", _set("server:ls1", "store", "memory:x"), "server:ls1", "store",
     "nothing after it"),
    ("continuation line", _set("pool", "ca", "pki/ca.pem\n  more"), "pool", "ca", "single line"),
]


@pytest.mark.parametrize(
    ("change", "section", "key", "fragment"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_configuration(
    tmp_path: Path,
    change: Callable[[Sections], None],
    section: str | None,
    key: str | None,
    fragment: str,
) -> None:
    """Each kind of mistake is refused with a ConfigError naming file, section and key."""
    sections = pool_sections()
    change(sections)
    path = write_ini(tmp_path, sections)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_names(info.value, path, section, key)
    assert fragment in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    """A configuration file that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_names(info.value, path, None, None)
    assert "no such file" in info.value.message


@pytest.mark.parametrize(
    ("text", "section", "key", "fragment"),
    [
        ("members = ls1\n", None, None, "[section] header"),
        ("[pool]\nmembers = ls1\nthis is not a key\n", None, None, "line 3"),
        ("[pool]\nmembers = ls1\nmembers = ls2\n", "pool", "members", "appears twice"),
        ("[pool]\nmembers = ls1\n[pool]\n", "pool", None, "appears twice"),
        ("[pool\nmembers = ls1\n", None, None, "line 1"),
    ],
)
def test_unparseable_ini(
    tmp_path: Path, text: str, section: str | None, key: str | None, fragment: str
) -> None:
    """Text that is not INI is refused with the line at fault and, when known, the section/key."""
    path = tmp_path / "pool.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_names(info.value, path, section, key)
    assert fragment in info.value.message


def test_render_round_trips_the_example(tmp_path: Path) -> None:
    """The example, rendered into another folder with its files, loads back the same."""
    original = load_config(EXAMPLE)
    text = render_config(original)
    copy = tmp_path / "pool.ini"
    copy.write_text(text)
    again = load_config(copy)
    assert again.members == original.members
    assert again.server("ls2").client == original.server("ls2").client
    assert again.ca == tmp_path / "pki" / "ca.pem"
    assert render_config(again) == text


def test_render_round_trips_every_field(tmp_path: Path) -> None:
    """Settings built in code, with every optional field set, survive render -> load unchanged."""
    path = tmp_path / "pool.ini"
    outside = tmp_path.parent / "shared" / "vendor.pub"
    servers = {
        "a": ServerSettings(
            name="a",
            client=Address("::1", 7401),
            peer=Address("a.example.org", 7501),
            http=None,
            cert=tmp_path / "pki" / "a.pem",
            key=tmp_path / "pki" / "a.key",
            store=StoreSpec("memory", None),
            preference=5,
        ),
        "b.2": ServerSettings(
            name="b.2",
            client=Address("127.0.0.1", 0),
            peer=Address("127.0.0.1", 0),
            http=Address("127.0.0.1", 0),
            cert=tmp_path / "pki" / "b.pem",
            key=tmp_path / "pki" / "b.key",
            store=StoreSpec("sqlite", tmp_path / "data" / "b.db"),
            preference=2,
        ),
    }
    settings = PoolSettings(
        path=path,
        members=("a", "b.2"),
        ca=tmp_path / "pki" / "ca.pem",
        vendor_key=outside,
        license=tmp_path / "site.lic",
        timings=Timings(peer_heartbeat=0.05, election_timeout=0.3, allocation_lease=0.5,
                        status_report=0.1, client_heartbeat=1.5, request_timeout=0.25,
                        clock_drift=0.0, snapshot_every=10),
        servers=MappingProxyType(servers),
        client=ClientSettings(cert=tmp_path / "c.pem", key=tmp_path / "c.key", home="b.2",
                              heartbeat=3.0, request_timeout=1.0),
    )
    path.write_text(render_config(settings))
    assert load_config(path) == settings
    assert f"vendor_key = {outside}" in path.read_text()
    assert "store = memory:" in path.read_text()


def test_render_refuses_values_it_cannot_write(tmp_path: Path) -> None:
    """A path that would read back as a value plus a comment is refused, not silently cut."""
    settings = load_config(EXAMPLE)
    broken = PoolSettings(
        path=settings.path,
        members=settings.members,
        ca=Path("/srv/pki ;old/ca.pem"),
        vendor_key=settings.vendor_key,
        license=None,
        timings=settings.timings,
        servers=settings.servers,
        client=None,
    )
    with pytest.raises(ValueError):
        render_config(broken)


def _touch_all(settings: PoolSettings, name: str) -> None:
    server = settings.server(name)
    paths = [settings.ca, settings.vendor_key, server.cert, server.key]
    if settings.license is not None:
        paths.append(settings.license)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_check_files(tmp_path: Path) -> None:
    """check_files passes once every file exists, and names the section/key of a missing one."""
    sections = pool_sections()
    sections["pool"]["license"] = "site.lic"
    path = write_ini(tmp_path, sections)
    settings = load_config(path)
    with pytest.raises(ConfigError) as info:
        settings.check_files("ls2")
    assert_names(info.value, path, "pool", "ca")
    assert "licensectl pki" in info.value.message
    _touch_all(settings, "ls2")
    settings.check_files("ls2")
    for section, key, missing in [
        ("server:ls2", "key", settings.server("ls2").key),
        ("pool", "license", tmp_path / "site.lic"),
        ("pool", "vendor_key", settings.vendor_key),
    ]:
        missing.unlink()
        with pytest.raises(ConfigError) as info:
            settings.check_files("ls2")
        assert_names(info.value, path, section, key)
        assert str(missing) in info.value.message
        missing.write_text("x")
    (tmp_path / "site.lic").unlink()
    (tmp_path / "site.lic").mkdir()
    with pytest.raises(ConfigError) as info:
        settings.check_files("ls2")
    assert "not a file" in info.value.message


def test_check_files_of_a_pool_of_one(tmp_path: Path) -> None:
    """In a pool of one, check_files needs no name; cert/key of other members are not needed."""
    settings = load_config(write_ini(tmp_path, pool_sections("solo")))
    _touch_all(settings, "solo")
    settings.check_files()
