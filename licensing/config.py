"""pool.ini -> typed, validated settings.

The INI format is a contract shared with ``licensectl``, the demo and the
operators' own tooling, so the loader is strict: an unknown section or key, a
malformed value or an inconsistent pool is refused at load time with a
``ConfigError`` naming the file, the section and the key, instead of surfacing
later as a server that quietly ignores a typo. Files the configuration points
at (certificates, keys, the vendor key) are *not* required at load time because
``licensectl pki`` creates them from this very file; the server calls
``PoolSettings.check_files`` when it starts. The operator reference is
docs/configuration.md.
"""

from __future__ import annotations

import configparser
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from licensing.errors import ConfigError

MAX_MEMBERS = 11
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
STORE_KINDS = ("sqlite", "memory")

# configparser treats the section named by default_section as defaults for
# every other section. Nobody can write a NUL in a section header, so this
# turns a stray [DEFAULT] into an ordinary section, refused as unknown.
_NO_DEFAULT_SECTION = "\0"
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PORT = re.compile(r"[0-9]{1,5}")
_ADDRESS_EXAMPLE = "expected host:port such as 127.0.0.1:7401"

_T = TypeVar("_T")


@dataclass(frozen=True)
class Address:
    """A listening or connecting endpoint; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreSpec:
    """Which ILicenseStore backend a server uses; ``path`` is set for sqlite only."""

    kind: str
    path: Path | None


@dataclass(frozen=True)
class Timings:
    """Pool timing parameters in seconds, plus the two non-time tunables.

    ``election_timeout`` is the lower end: the random timeout is drawn from
    ``[election_timeout, 2 * election_timeout]``. ``clock_drift`` is the
    fraction by which two servers' clocks may run apart; the leader waits
    ``allocation_lease * (1 + clock_drift)`` before reclaiming seats.
    """

    peer_heartbeat: float = 0.2
    election_timeout: float = 1.0
    allocation_lease: float = 2.0
    status_report: float = 1.0
    client_heartbeat: float = 10.0
    request_timeout: float = 2.0
    clock_drift: float = 0.05
    snapshot_every: int = 1000


@dataclass(frozen=True)
class ServerSettings:
    """One member of the pool: its listeners, TLS identity and store."""

    name: str
    client: Address
    peer: Address
    http: Address | None
    cert: Path
    key: Path
    store: StoreSpec
    preference: int
    client_bind: Address | None = None
    peer_bind: Address | None = None
    """Where to listen when it differs from the address others connect to
    (a proxy, NAT or load balancer in between); None: listen on client/peer."""

    @property
    def client_listen(self) -> Address:
        return self.client_bind or self.client

    @property
    def peer_listen(self) -> Address:
        return self.peer_bind or self.peer


@dataclass(frozen=True)
class ClientSettings:
    """The [client] section: what licensectl and LicenseClient.from_config use.

    ``None`` for ``heartbeat`` and ``request_timeout`` means "use the pool's
    ``client_heartbeat`` / ``request_timeout``".
    """

    cert: Path
    key: Path
    home: str | None = None
    heartbeat: float | None = None
    request_timeout: float | None = None


@dataclass(frozen=True)
class PoolSettings:
    """A whole pool.ini: every path in it is absolute (resolved at load)."""

    path: Path
    members: tuple[str, ...]
    ca: Path
    vendor_key: Path
    license: Path | None
    timings: Timings
    servers: Mapping[str, ServerSettings]
    client: ClientSettings | None

    def server(self, name: str | None = None) -> ServerSettings:
        """The settings of member ``name``.

        ``None`` is only unambiguous in a pool of one; otherwise the caller
        (twistd's ``--name``, licensectl) must say which member it is.
        """
        if name is None:
            if len(self.members) == 1:
                return self.servers[self.members[0]]
            raise ConfigError(
                str(self.path),
                "pool",
                "members",
                f"the pool has {len(self.members)} members ({', '.join(self.members)}); "
                "say which one this server is with --name",
            )
        try:
            return self.servers[name]
        except KeyError:
            raise ConfigError(
                str(self.path),
                "pool",
                "members",
                f"no member named {name!r} (given with --name); "
                f"expected one of {', '.join(self.members)}",
            ) from None

    def check_files(self, name: str | None = None) -> None:
        """Refuse to start member ``name`` while a file it needs is missing.

        Checked at server start rather than at load, because the same INI is
        loaded before ``licensectl pki`` has created the certificates.
        """
        server = self.server(name)
        section = f"server:{server.name}"
        pki_hint = "create it with licensectl pki or fix the path"
        wanted = [
            ("pool", "ca", self.ca, pki_hint),
            ("pool", "vendor_key", self.vendor_key, "the software vendor supplies it"),
            (section, "cert", server.cert, pki_hint),
            (section, "key", server.key, pki_hint),
        ]
        if self.license is not None:
            no_license = "remove the key to start without one"
            wanted.insert(2, ("pool", "license", self.license, no_license))
        for section_name, key, path, hint in wanted:
            problem = _file_problem(path)
            if problem is not None:
                raise ConfigError(str(self.path), section_name, key, f"{problem}; {hint}")


def parse_address(text: str) -> Address:
    """Parse ``host:port`` (``[v6]:port`` for IPv6); ValueError says what is wrong.

    IP literals are normalised (so ``[0::1]`` and ``[::1]`` are the same
    address) and host names lower-cased, which makes equal addresses compare
    equal when the loader looks for two listeners on one address.
    """
    text = text.strip()
    if text.startswith("["):
        inner, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError("an IPv6 address in brackets must be followed by :port")
        try:
            host = str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"{inner!r} is not an IPv6 address") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError("the :port is missing")
        if ":" in host:
            raise ValueError("write IPv6 addresses in brackets, as in [::1]:7401")
        host = _parse_host(host)
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {port!r}")
    return Address(host, int(port))


def load_config(path: str | os.PathLike[str]) -> PoolSettings:
    """Read and validate a pool.ini; raise ConfigError on the first problem."""
    ini = Path(path).absolute()
    return _PoolReader(ini, _parse_ini(ini)).settings()


def render_config(settings: PoolSettings) -> str:
    """Write ``settings`` as pool.ini text that ``load_config`` reads back equal.

    Paths under the INI file's folder are written relative to it, so a pool
    directory can be moved as a whole. Defaults are left out, which keeps the
    file short and lets a later release change an unset default.
    """
    folder = settings.path.parent

    def path_text(value: Path) -> str:
        try:
            return value.relative_to(folder).as_posix()
        except ValueError:
            return str(value)

    lines = [
        "; licensing pool configuration; reference: docs/configuration.md",
        "",
        "[pool]",
        f"members = {', '.join(settings.members)}",
        f"ca = {path_text(settings.ca)}",
        f"vendor_key = {path_text(settings.vendor_key)}",
    ]
    if settings.license is not None:
        lines.append(f"license = {path_text(settings.license)}")
    for timing in fields(Timings):
        value = getattr(settings.timings, timing.name)
        if value != timing.default:
            lines.append(f"{timing.name} = {value!r}")
    for position, name in enumerate(settings.members, start=1):
        server = settings.servers[name]
        lines += ["", f"[server:{name}]", f"client = {server.client}", f"peer = {server.peer}"]
        if server.http is not None:
            lines.append(f"http = {server.http}")
        lines += [f"cert = {path_text(server.cert)}", f"key = {path_text(server.key)}"]
        if server.store.path is None:
            lines.append(f"store = {server.store.kind}:")
        else:
            lines.append(f"store = {server.store.kind}:{path_text(server.store.path)}")
        if server.preference != position:
            lines.append(f"preference = {server.preference}")
        if server.client_bind is not None:
            lines.append(f"client_bind = {server.client_bind}")
        if server.peer_bind is not None:
            lines.append(f"peer_bind = {server.peer_bind}")
    client = settings.client
    if client is not None:
        lines += ["", "[client]", f"cert = {path_text(client.cert)}"]
        lines.append(f"key = {path_text(client.key)}")
        if client.home is not None:
            lines.append(f"home = {client.home}")
        if client.heartbeat is not None:
            lines.append(f"heartbeat = {client.heartbeat!r}")
        if client.request_timeout is not None:
            lines.append(f"request_timeout = {client.request_timeout!r}")
    for line in lines:
        if not line.startswith(";"):
            _check_writable(line)
    return "\n".join(lines) + "\n"


_TIMING_KEYS = tuple(timing.name for timing in fields(Timings))
_POOL_KEYS = ("members", "ca", "vendor_key", "license", *_TIMING_KEYS)
_SERVER_KEYS = ("client", "peer", "http", "cert", "key", "store", "preference", "client_bind", "peer_bind")
_CLIENT_KEYS = ("cert", "key", "home", "heartbeat", "request_timeout")
_REQUIRED = {
    "members": "comma-separated member names such as ls1, ls2, ls3",
    "ca": "the path of the pool CA certificate such as pki/ca.pem",
    "vendor_key": "the path of the vendor's Ed25519 public key such as vendor.pub",
    "client": "the host:port clients connect to, such as 127.0.0.1:7401",
    "peer": "the host:port the other servers connect to, such as 127.0.0.1:7501",
    "cert": "the path of a certificate signed by the pool CA, such as pki/ls1.pem",
    "key": "the path of the certificate's private key, such as pki/ls1.key",
    "store": "sqlite:PATH (such as sqlite:data/ls1.db) or memory:",
    "client.cert": "the path of a client certificate signed by the pool CA, such as pki/client.pem",
    "client.key": "the path of the client certificate's private key, such as pki/client.key",
}


class _PoolReader:
    """Turns a parsed INI into PoolSettings, one section at a time.

    Holds the file path so that every check can raise a ConfigError naming it.
    """

    def __init__(self, ini: Path, parser: configparser.ConfigParser) -> None:
        self._ini = ini
        self._parser = parser

    def settings(self) -> PoolSettings:
        self._check_section_names()
        pool = self._section("pool", _POOL_KEYS)
        members = self._members(pool)
        ca = self._required(pool, "pool", "ca", self._path)
        vendor_key = self._required(pool, "pool", "vendor_key", self._path)
        license_path = self._optional(pool, "pool", "license", self._path)
        timings = self._timings(pool)
        self._check_server_sections(members)
        servers = {
            name: self._server(name, position) for position, name in enumerate(members, start=1)
        }
        self._check_distinct_addresses(servers)
        client = self._client(members) if self._parser.has_section("client") else None
        return PoolSettings(
            path=self._ini,
            members=members,
            ca=ca,
            vendor_key=vendor_key,
            license=license_path,
            timings=timings,
            servers=MappingProxyType(servers),
            client=client,
        )

    def _error(self, section: str | None, key: str | None, message: str) -> ConfigError:
        return ConfigError(str(self._ini), section, key, message)

    def _check_section_names(self) -> None:
        for name in self._parser.sections():
            if name not in ("pool", "client") and not name.startswith("server:"):
                hint = _did_you_mean(name, ["pool", "client", "server:NAME"])
                raise self._error(
                    name, None, f"unknown section; expected [pool], [server:NAME] or [client]{hint}"
                )
        if not self._parser.has_section("pool"):
            raise self._error(
                "pool", None, "missing section; it must list members, ca and vendor_key"
            )

    def _section(self, section: str, known: tuple[str, ...]) -> dict[str, str]:
        values = dict(self._parser.items(section))
        for key in values:
            if key not in known:
                hint = _did_you_mean(key, known)
                raise self._error(
                    section, key, f"unknown key; expected one of {', '.join(known)}{hint}"
                )
        return values

    def _members(self, pool: dict[str, str]) -> tuple[str, ...]:
        text = self._required(pool, "pool", "members", str, multiline=True)
        names = [name.strip() for name in text.split(",")]
        seen: dict[str, str] = {}
        for name in names:
            if not name:
                raise self._error(
                    "pool",
                    "members",
                    f"expected comma-separated member names, got an empty name in {text!r}",
                )
            if not MEMBER_NAME.fullmatch(name):
                raise self._error(
                    "pool",
                    "members",
                    f"expected member names of 1 to 63 letters, digits, '.', '_' or '-' "
                    f"starting with a letter or digit, separated by commas, got {name!r}",
                )
            first = seen.get(name.lower())
            if first == name:
                raise self._error("pool", "members", f"member {name!r} is listed twice")
            if first is not None:
                raise self._error(
                    "pool",
                    "members",
                    f"members {first!r} and {name!r} are listed twice: names are TLS "
                    "identities and must differ in more than upper/lower case",
                )
            seen[name.lower()] = name
        if len(names) > MAX_MEMBERS:
            raise self._error(
                "pool", "members", f"expected at most {MAX_MEMBERS} members, got {len(names)}"
            )
        return tuple(names)

    def _check_server_sections(self, members: tuple[str, ...]) -> None:
        for section in self._parser.sections():
            if section.startswith("server:") and section[len("server:") :] not in members:
                raise self._error(
                    section,
                    None,
                    f"{section[len('server:') :]!r} is not in [pool] members "
                    f"({', '.join(members)}); add it there or remove this section",
                )
        for name in members:
            if not self._parser.has_section(f"server:{name}"):
                raise self._error(
                    f"server:{name}",
                    None,
                    f"missing section for member {name!r}; "
                    "it needs client, peer, cert, key and store",
                )

    def _server(self, name: str, position: int) -> ServerSettings:
        section = f"server:{name}"
        values = self._section(section, _SERVER_KEYS)
        preference = self._optional(values, section, "preference", _preference)
        return ServerSettings(
            name=name,
            client=self._required(values, section, "client", _address),
            peer=self._required(values, section, "peer", _address),
            http=self._optional(values, section, "http", _address),
            cert=self._required(values, section, "cert", self._path),
            key=self._required(values, section, "key", self._path),
            store=self._required(values, section, "store", self._store),
            preference=position if preference is None else preference,
            client_bind=self._optional(values, section, "client_bind", _address),
            peer_bind=self._optional(values, section, "peer_bind", _address),
        )

    def _check_distinct_addresses(self, servers: dict[str, ServerSettings]) -> None:
        # Port 0 asks the OS for a free port, so any number of those coexist.
        # Names are not resolved: "localhost" and "127.0.0.1" are not compared.
        used: dict[Address, str] = {}
        for name, server in servers.items():
            listeners = (("client", server.client), ("peer", server.peer), ("http", server.http),
                         ("client_bind", server.client_bind), ("peer_bind", server.peer_bind))
            for key, address in listeners:
                if address is None or address.port == 0:
                    continue
                if address in used:
                    raise self._error(
                        f"server:{name}",
                        key,
                        f"address {address} is already used by {used[address]}; "
                        "every listener needs its own host:port",
                    )
                used[address] = f"[server:{name}] {key}"

    def _timings(self, pool: dict[str, str]) -> Timings:
        given: dict[str, float | int] = {}
        for key in _TIMING_KEYS:
            parse = _TIMING_PARSERS.get(key, _seconds)
            value = self._optional(pool, "pool", key, parse)
            if value is not None:
                given[key] = value
        timings = Timings(**given)  # type: ignore[arg-type]
        if not timings.election_timeout > 2 * timings.peer_heartbeat:
            raise self._error(
                "pool",
                "election_timeout",
                f"must be more than twice peer_heartbeat ({timings.peer_heartbeat:g} s) so that "
                f"followers do not start elections between heartbeats, "
                f"got {timings.election_timeout:g}",
            )
        if not timings.allocation_lease > timings.peer_heartbeat:
            raise self._error(
                "pool",
                "allocation_lease",
                f"must be more than peer_heartbeat ({timings.peer_heartbeat:g} s) so that "
                f"followers keep their allocation between heartbeats, "
                f"got {timings.allocation_lease:g}",
            )
        return timings

    def _client(self, members: tuple[str, ...]) -> ClientSettings:
        values = self._section("client", _CLIENT_KEYS)
        home = self._optional(values, "client", "home", str)
        if home is not None and home not in members:
            raise self._error(
                "client",
                "home",
                f"expected one of the members ({', '.join(members)}), got {home!r}",
            )
        return ClientSettings(
            cert=self._required(values, "client", "cert", self._path),
            key=self._required(values, "client", "key", self._path),
            home=home,
            heartbeat=self._optional(values, "client", "heartbeat", _seconds),
            request_timeout=self._optional(values, "client", "request_timeout", _seconds),
        )

    def _required(
        self,
        values: dict[str, str],
        section: str,
        key: str,
        parse: Callable[[str], _T],
        multiline: bool = False,
    ) -> _T:
        value = self._optional(values, section, key, parse, multiline)
        if value is None:
            expected = _REQUIRED.get(f"{section}.{key}", _REQUIRED.get(key))
            raise self._error(section, key, f"missing required key; expected {expected}")
        return value

    def _optional(
        self,
        values: dict[str, str],
        section: str,
        key: str,
        parse: Callable[[str], _T],
        multiline: bool = False,
    ) -> _T | None:
        """Parse one value; an empty value counts as absent (handy in templates)."""
        text = values.get(key, "").strip()
        if not text:
            return None
        if "\n" in text and not multiline:
            raise self._error(
                section, key, f"expected a single line, got continuation lines in {text!r}"
            )
        try:
            return parse(text)
        except ValueError as exc:
            raise self._error(section, key, str(exc)) from None

    def _path(self, text: str) -> Path:
        path = Path(text)
        if path.is_absolute():
            return path
        return self._ini.parent / path

    def _store(self, text: str) -> StoreSpec:
        kind, colon, rest = text.partition(":")
        rest = rest.strip()
        if not colon or kind not in STORE_KINDS:
            raise ValueError(f"expected sqlite:PATH or memory:, got {text!r}")
        if kind == "memory":
            if rest:
                raise ValueError(f"expected memory: with nothing after it, got {text!r}")
            return StoreSpec("memory", None)
        if not rest:
            raise ValueError(
                f"expected a database file after sqlite:, such as sqlite:data/ls1.db, got {text!r}"
            )
        return StoreSpec("sqlite", self._path(rest))


def _parse_ini(ini: Path) -> configparser.ConfigParser:
    """Read the file into a strict ConfigParser, mapping every failure to ConfigError."""

    def fail(message: str, section: str | None = None, key: str | None = None) -> ConfigError:
        return ConfigError(str(ini), section, key, message)

    try:
        text = ini.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise fail("no such file; expected a pool configuration (pool.ini)") from None
    except IsADirectoryError:
        raise fail("is a directory; expected a pool configuration file") from None
    except UnicodeDecodeError as exc:
        raise fail(f"expected UTF-8 text, got undecodable bytes ({exc.reason})") from None
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror}") from None
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";", "#"),
        interpolation=None,
        default_section=_NO_DEFAULT_SECTION,
        empty_lines_in_values=False,
        strict=True,
    )
    try:
        parser.read_string(text, source=str(ini))
    except configparser.DuplicateSectionError as exc:
        raise fail(f"section appears twice (again on line {exc.lineno})", exc.section) from None
    except configparser.DuplicateOptionError as exc:
        raise fail(
            f"key appears twice in the section (again on line {exc.lineno})",
            exc.section,
            exc.option,
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise fail(
            f"line {exc.lineno}: expected a [section] header before any key, got {exc.line!r}"
        ) from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0]
        raise fail(
            f"line {lineno}: expected 'key = value', a [section] header or a comment, got {line}"
        ) from None
    except configparser.Error as exc:
        raise fail(f"cannot parse the INI file: {exc.message}") from None
    return parser


def _parse_host(host: str) -> str:
    if not host:
        raise ValueError("the host is missing (use 0.0.0.0 or [::] to listen on every interface)")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if (
        len(host) > 253
        or not all(_HOST_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return host.lower()


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise ValueError(f"{_ADDRESS_EXAMPLE}, got {text!r}; {exc}") from None


def _seconds(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise ValueError(f"expected a number of seconds greater than 0 such as 0.5, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise ValueError(
            f"expected a fraction from 0 up to (not including) 1 such as 0.05, got {text!r}"
        )
    return value


def _snapshot_every(text: str) -> int:
    value = _int(text)
    if value is None or value < 10:
        raise ValueError(
            f"expected a whole number of log entries of at least 10 such as 1000, got {text!r}"
        )
    return value


def _preference(text: str) -> int:
    value = _int(text)
    if value is None or value < 1:
        raise ValueError(
            f"expected a whole number of at least 1 (lower is preferred), got {text!r}"
        )
    return value


def _float(text: str) -> float:
    """A finite float, or NaN (which fails every range check) for anything else."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _int(text: str) -> int | None:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        return None
    return int(text)


_TIMING_PARSERS: dict[str, Callable[[str], float | int]] = {
    "clock_drift": _fraction,
    "snapshot_every": _snapshot_every,
}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _file_problem(path: Path) -> str | None:
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    return None


def _check_writable(line: str) -> None:
    """Refuse to write a value configparser would read back differently."""
    if "\n" in line or " ;" in line or " #" in line or "\t;" in line or "\t#" in line:
        raise ValueError(f"cannot write {line!r} to an INI file: it would be read back differently")
