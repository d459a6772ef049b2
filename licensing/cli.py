"""``licensectl``: PKI, vendor keys and signing, license install/push, and a running pool.

Every error is one clear line on stderr and a non-zero exit, never a
traceback: the tool is used from shell scripts and by operators at 3 a.m.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LicensingError, RequestError

EXIT_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="licensectl", description="Operate a licensing pool.")
    top.add_argument("--config", "-c", help="pool.ini of the pool to talk to")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, parent: Any = verbs) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="pool.ini")
        return p

    pki = verbs.add_parser("pki", help="private CA and certificates").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = verb("init", "create the pool CA in DIR (ca.pem, ca.key)", pki)
    p.add_argument("dir", type=Path)
    p = verb("issue", "issue DIR/NAME.pem and DIR/NAME.key signed by the CA in DIR", pki)
    p.add_argument("dir", type=Path)
    p.add_argument("name")
    p.add_argument("--client", action="store_true", help="a client certificate (not a pool member)")
    p.add_argument("--host", action="append", help="IP or DNS name for the subjectAltName (repeatable)")

    vendor = verbs.add_parser("vendor", help="vendor signing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = verb("keygen", "write DIR/vendor.key and DIR/vendor.pub", vendor)
    p.add_argument("dir", type=Path)

    lic = verbs.add_parser("license", help="license files").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = verb("sign", "sign an unsigned license file", lic)
    p.add_argument("--key", required=True, type=Path, help="vendor.key")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p = verb("verify", "check a signed license file", lic)
    p.add_argument("--pub", required=True, type=Path, help="vendor.pub")
    p.add_argument("file", type=Path)
    p = verb("show", "print a license file's contents", lic)
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true")
    p = verb("install", "write a signed file into a stopped member's store", lic)
    p.add_argument("--name", help="the member (may be left out in a pool of one)")
    p.add_argument("file", type=Path)
    p = verb("push", "hand a signed file to the running pool", lic)
    p.add_argument("file", type=Path)

    p = verb("status", "show the pool, its license and its seats")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="list leases too")
    p.add_argument("--server", help="ask this member")
    p = verb("checkout", "check a lease out; it lives until its TTL unless checked in")
    p.add_argument("feature")
    p.add_argument("--version", default="")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p = verb("checkin", "check a lease in by id")
    p.add_argument("lease_id")

    p = verb("demo", "run a one-member pool on 127.0.0.1 with fresh keys, check seats out, show status")
    p.add_argument("--dir", type=Path, default=None, help="where to write the demo (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="leave the server running until Ctrl-C")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``licensectl`` console script."""
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
    except LicensingError as e:
        print(f"licensectl: {e}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    verb = args.verb if args.verb in ("status", "checkout", "checkin", "demo") else f"{args.verb}_{args.action}"
    return globals()[f"_cmd_{verb}"](args)


def _cmd_pki_init(args: argparse.Namespace) -> int:
    from .pki import init_ca

    cert, key = init_ca(args.dir)
    print(f"wrote {cert} and {key}")
    return 0


def _cmd_pki_issue(args: argparse.Namespace) -> int:
    from .pki import issue_certificate

    hosts = args.host if args.host else ("127.0.0.1", "localhost")
    cert, key = issue_certificate(args.dir, args.name, client=args.client, hosts=hosts)
    print(f"wrote {cert} and {key}")
    return 0


def _cmd_vendor_keygen(args: argparse.Namespace) -> int:
    from .vendor import generate_vendor_keys

    key, pub = generate_vendor_keys(args.dir)
    print(f"wrote {key} (keep it secret) and {pub} (ship it in pool.ini's vendor_key)")
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LicensingError(f"cannot read {path}: {e.strerror}") from None


def _cmd_license_sign(args: argparse.Namespace) -> int:
    from .license import sign_license
    from .vendor import load_private_key

    text = _read(args.input).decode("utf-8", errors="replace")
    signed = sign_license(text, load_private_key(args.key))
    args.output.write_bytes(signed)
    print(f"wrote {args.output}")
    return 0


def _utc_today() -> datetime.date:
    """The date a member judges expiry by (UTC), so that verify and install agree with it."""
    return datetime.datetime.now(datetime.UTC).date()


def _cmd_license_verify(args: argparse.Namespace) -> int:
    from .license import verify_license
    from .vendor import load_public_key

    lic = verify_license(_read(args.file), load_public_key(args.pub), today=_utc_today())
    print(f"{args.file}: valid, sequence {lic.sequence}, {len(lic.features)} feature(s)")
    return 0


def _cmd_license_show(args: argparse.Namespace) -> int:
    from .license import parse_unsigned

    data = _read(args.file).decode("utf-8", errors="replace")
    body = data.split("[signature]")[0]
    lic = parse_unsigned(body)
    doc = {
        "sequence": lic.sequence,
        "licensee": lic.licensee,
        "members": list(lic.members) if lic.members else None,
        "signed": "[signature]" in data,
        "features": [
            {"name": f.name, "version": f.version, "count": f.count,
             "expires": f.expires.isoformat() if f.expires else "never",
             "majority_rule": f.majority_rule, "lease_ttl": f.lease_ttl,
             "distribution": dict(f.distribution) if f.distribution else None}
            for f in lic.features.values()
        ],
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"sequence {doc['sequence']}  licensee {doc['licensee'] or '-'}  "
          f"{'signed' if doc['signed'] else 'UNSIGNED'}")
    _table(["feature", "version", "count", "expires", "majority", "ttl", "distribution"], [
        [f["name"], f["version"], f["count"], f["expires"], "yes" if f["majority_rule"] else "no",
         f["lease_ttl"], ", ".join(f"{k}:{v}" for k, v in (f["distribution"] or {}).items()) or "even"]
        for f in doc["features"]
    ])
    return 0


def _settings(args: argparse.Namespace) -> Any:
    from .config import load_config

    if not getattr(args, "config", None):
        raise LicensingError("this verb needs --config pool.ini")
    return load_config(args.config)


def _cmd_license_install(args: argparse.Namespace) -> int:
    from twisted.internet import task

    settings = _settings(args)
    member = settings.server(args.name)
    data = _read(args.file)

    async def run(reactor: Any) -> int:
        from .license import verify_license
        from .records import InstalledLicense
        from .store import open_store
        from .vendor import load_public_key

        # Refused as the running pool refuses it on push: installed, it would
        # only make the member serve nothing once it starts.
        lic = verify_license(data, load_public_key(settings.vendor_key), today=_utc_today())
        if member.store.kind != "sqlite":
            raise LicensingError(f"member {member.name} has a {member.store.kind} store; "
                                 "only a sqlite store keeps an installed license")
        store = open_store(member.store, reactor)
        try:
            state = await store.load()
            if state.license is not None and state.license.sequence >= lic.sequence:
                raise LicensingError(
                    f"{member.name} already holds sequence {state.license.sequence}; "
                    f"sequence {lic.sequence} is not newer, nothing changed")
            await store.save_license(InstalledLicense(lic.sequence, data))
        finally:
            await store.close()
        print(f"installed sequence {lic.sequence} into {member.name}'s store; "
              "it spreads to the pool when the member starts")
        return 0

    return _react(task, run)


def _react(task: Any, run: Any) -> int:
    from twisted.internet.defer import Deferred

    result: list[Any] = []

    def main(reactor: Any) -> Deferred:
        d = Deferred.fromCoroutine(run(reactor))
        d.addBoth(lambda r: result.append(r))
        return d

    try:
        task.react(main)
    except SystemExit:
        pass
    outcome = result[0] if result else EXIT_ERROR
    from twisted.python.failure import Failure

    if isinstance(outcome, Failure):
        if outcome.check(LicensingError):
            raise outcome.value
        from twisted.internet.error import ConnectError, ConnectingCancelledError
        from twisted.internet.defer import TimeoutError as DeferredTimeout

        if outcome.check(ConnectError, ConnectingCancelledError, DeferredTimeout):
            raise LicensingError(f"cannot reach the pool: {outcome.getErrorMessage()}")
        raise LicensingError(f"unexpected error: {outcome.getErrorMessage()}")
    return int(outcome)


def _client(args: argparse.Namespace, reactor: Any) -> Any:
    from .client import LicenseClient

    return LicenseClient.from_config(reactor, args.config)


def _cmd_license_push(args: argparse.Namespace) -> int:
    from twisted.internet import task

    _settings(args)
    data = _read(args.file)

    async def run(reactor: Any) -> int:
        client = _client(args, reactor)
        try:
            sequence = await client.push_license(data)
        finally:
            client.close()
        print(f"the pool installed license sequence {sequence}")
        return 0

    return _react(task, run)


def _cmd_status(args: argparse.Namespace) -> int:
    from twisted.internet import task

    _settings(args)

    async def run(reactor: Any) -> int:
        client = _client(args, reactor)
        try:
            doc = await client.status(server=args.server, verbose=args.verbose)
        finally:
            client.close()
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(format_status(doc, verbose=args.verbose))
        return 0

    return _react(task, run)


def format_status(doc: dict[str, Any], verbose: bool = False) -> str:
    """The status document as the tables an operator reads."""
    lines = [f"asked {doc['server']}: role {doc['role']}, leader {doc['leader'] or '-'}, term {doc['term']}"]
    lic = doc["license"]
    lines.append(f"license sequence {lic['sequence']} ({lic['licensee'] or 'no licensee'})" if lic
                 else "no license installed")
    lines.append("")
    lines += _table_lines(
        ["member", "role", "reachable", "last contact", "term", "commit", "license"],
        [[m["name"], m["role"], "yes" if m["reachable"] else "NO",
          "-" if m["last_contact"] is None else f"{m['last_contact']:.1f}s ago",
          m["term"], m["commit_index"], m["license_sequence"] if m["license_sequence"] is not None else "-"]
         for m in doc["members"]],
    )
    lines.append("")
    lines += _table_lines(
        ["feature", "version", "count", "in use", "free", "expires", "per member (used/allocated)"],
        [[f["name"], f["version"], f["count"], f["in_use"], f["free"],
          f["expires"] + (" EXPIRED" if f["expired"] else ""),
          ", ".join(f"{k} {v['used']}/{v['allocation']}" for k, v in f["members"].items())]
         for f in doc["features"]],
    )
    if verbose and doc.get("leases") is not None:
        lines.append("")
        lines += _table_lines(
            ["lease", "feature", "count", "client", "user", "host", "server"],
            [[x["lease_id"], x["feature"], x["count"], x["client_id"], x["user"], x["host"], x["server"]]
             for x in doc["leases"]],
        )
    return "\n".join(lines)


def _table_lines(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _table(header: list[str], rows: list[list[Any]]) -> None:
    print("\n".join(_table_lines(header, rows)))


def _cmd_checkout(args: argparse.Namespace) -> int:
    from twisted.internet import task

    _settings(args)

    async def run(reactor: Any) -> int:
        client = _client(args, reactor)
        try:
            lease = await client.checkout(args.feature, version=args.version, count=args.count)
            # The lease must outlive this command: stop heartbeating, leave it to its TTL.
            client._forget(lease)
        finally:
            client.close()
        if args.json:
            print(json.dumps({"lease_id": lease.lease_id, "server": lease.server,
                              "feature": lease.feature, "count": lease.count, "ttl": lease.ttl}))
        else:
            print(lease.lease_id)
        return 0

    try:
        return _react(task, run)
    except RequestError as e:
        raise LicensingError(f"{type(e).__name__}: {e}") from None


def _cmd_checkin(args: argparse.Namespace) -> int:
    from twisted.internet import task

    _settings(args)

    async def run(reactor: Any) -> int:
        client = _client(args, reactor)
        try:
            released = await client.checkin(args.lease_id)
        finally:
            client.close()
        if not released:
            raise LicensingError(f"no member holds lease {args.lease_id}; it was checked in or expired")
        print(f"checked in {args.lease_id}")
        return 0

    return _react(task, run)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, keep=args.keep)


if __name__ == "__main__":
    main()
