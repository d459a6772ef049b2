"""One chaos run: a proxied pool, the proxy, the client process, the nemesis and the observer.

``run_chaos`` is what the tests call; ``python -m tests.chaos.harness --seed N
--seconds S`` runs the same thing from a shell (from the repository root),
keeps the work directory and prints where it is, which is how a failing seed
is examined.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from licensing.sandbox import Sandbox, make_sandbox

from .nemesis import KINDS, Nemesis
from .observer import Observer, Violation
from .proxy import ProxyProcess, routes_for, start_proxy

LEASE_TTL = 15
FEATURES = {
    "cad-pro": {"version": "2.0", "count": 8, "expires": "never", "majority_rule": "yes",
                "lease_ttl": LEASE_TTL},
    "viewer": {"version": "1.0", "count": 4, "expires": "never", "majority_rule": "no",
               "lease_ttl": LEASE_TTL},
}
"""A contended majority-rule feature (about 12 of 16 clients want one of 8 seats)
and a small feature without majority rule. The TTL is short so that a lease the
pool drops shows up as lost within a run; 15 s still leaves room for the
slowest failover (request timeout, Locate, the new leader's reclaim wait)."""
CLIENT_WEIGHTS = "cad-pro=3,viewer=1"
TIMINGS = {"client_heartbeat": 1}
_LOG_ERROR = re.compile(r"#(error|critical)\]|Unhandled Error|Traceback \(most recent")


@dataclass
class ChaosReport:
    """What one run did and found."""

    seed: int
    seconds: float
    workdir: str
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for entry in self.history:
            if entry.get("what") == "begin":
                kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
        lines = [f"chaos seed {self.seed}: {self.seconds:.0f} s of faults, work dir {self.workdir}",
                 f"  phases (s): {self.phases}",
                 f"  episodes: {kinds}",
                 f"  stats: {json.dumps(self.stats, sort_keys=True)}"]
        if self.violations:
            lines.append(f"  {len(self.violations)} violation(s):")
            lines += [f"    {v}" for v in self.violations[:30]]
        else:
            lines.append("  no violations")
        return "\n".join(lines)


def member_log_errors(box: Sandbox) -> list[str]:
    """Error and critical lines (and tracebacks) in the members' twistd logs."""
    found = []
    for name in box.members:
        lines = box.log(name).splitlines()
        for i, line in enumerate(lines):
            if _LOG_ERROR.search(line):
                found.append(f"{name}: " + "\n".join(lines[i:i + 12]))
    return found


def run_chaos(
    workdir: Path,
    seed: int,
    seconds: float,
    *,
    members: Sequence[str] = ("ls1", "ls2", "ls3"),
    clients: int = 16,
    kinds: Sequence[str] = KINDS,
    max_down: int | None = None,
    script: Callable[[Nemesis], None] | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> ChaosReport:
    """Run the nemesis for ``seconds`` against a fresh pool; every process is stopped on return.

    ``script``, if given, runs instead of the random schedule (it calls
    ``Nemesis.episode``): a regression test replays the faults that found a bug.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    report = ChaosReport(seed, seconds, str(workdir))
    rng = random.Random(seed)
    t0 = time.monotonic()
    box = make_sandbox(workdir / "pool", members, features=FEATURES, timings=TIMINGS, proxied=True)
    proxy: ProxyProcess | None = None
    client_proc: subprocess.Popen | None = None
    observer: Observer | None = None
    events = workdir / "events.jsonl"
    try:
        proxy = start_proxy(workdir, routes_for(box.ports), seed=seed)
        for name in members:
            box.start(name, wait=0)
        for name in members:
            box.wait_serving(name, 30)
        nemesis = Nemesis(box, proxy.control, rng, kinds=kinds, max_down=max_down, features=FEATURES,
                          say=say)
        observer = Observer(box, events, nemesis.timeline, trace=workdir / "observer.jsonl", say=say)
        if observer.wait_converged(1, timeout=30) is None:
            raise RuntimeError(f"the pool never formed: {observer.violations}")
        report.phases["setup"] = round(time.monotonic() - t0, 1)

        with open(workdir / "clients.err", "wb") as err:
            client_proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("clients.py")), "--config", str(box.ini),
                 "--events", str(events), "--log", str(workdir / "clients.log"), "--clients", str(clients),
                 "--seed", str(seed), "--features", CLIENT_WEIGHTS],
                stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        observer.start()
        time.sleep(3.0)
        t1 = time.monotonic()
        if script is None:
            nemesis.run(seconds)
        else:
            try:
                script(nemesis)
            finally:
                nemesis.heal()
        report.phases["faults+heal"] = round(time.monotonic() - t1, 1)
        for when, what in nemesis.stuck:
            observer.fail("rejoin", what, when)

        t2 = time.monotonic()
        client_proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        observer.stop()
        expected = max(nemesis.sequence, observer.stats.highest_sequence)
        snap = observer.wait_converged(expected, timeout=30)
        if snap is not None:
            _eventually_held(observer, timeout=LEASE_TTL)
        report.phases["converge"] = round(time.monotonic() - t2, 1)

        t3 = time.monotonic()
        client_proc.terminate()
        try:
            client_proc.wait(30)
        except subprocess.TimeoutExpired:
            observer.fail("clients", "the client process did not exit 30 s after SIGTERM")
        observer.read_events()
        observer.wait_drained(LEASE_TTL + 10)
        report.phases["drain"] = round(time.monotonic() - t3, 1)
        for text in member_log_errors(box):
            observer.fail("member errors", text)
        stats = proxy.control.stats()
        if stats["stats"]["unidentified"]:
            observer.fail("proxy", f"{stats['stats']['unidentified']} peer connection(s) of unknown origin")
        report.history = nemesis.history
        report.stats = {**asdict(observer.stats), "proxy": stats["stats"],
                        "expected_sequence": expected}
    finally:
        if client_proc is not None and client_proc.poll() is None:
            client_proc.kill()
            client_proc.wait(10)
        if observer is not None:
            observer.close()
            report.violations = list(observer.violations)
        box.stop_all()
        if proxy is not None:
            proxy.stop()
    report.phases["total"] = round(time.monotonic() - t0, 1)
    (workdir / "report.json").write_text(json.dumps(
        {**asdict(report), "violations": [str(v) for v in report.violations]}, indent=1, default=str))
    return report


def _eventually_held(observer: Observer, timeout: float) -> None:
    """After healing, every lease the quiet clients hold is honoured by a member, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.6)
        observer.read_events()
        snap = observer.snapshot()
        held = {lease_id for leases in snap.honoured().values() for lease_id in leases}
        orphans = [x for x in observer.client_view if x["lease_id"] not in held]
        if not orphans:
            return
        if time.monotonic() > deadline:
            observer.fail("client view", f"{len(orphans)} lease(s) the clients hold are honoured by no "
                                         f"member {timeout:.0f} s after healing: {orphans[:5]}")
            return


def main(argv: list[str] | None = None) -> int:
    """Run one chaos seed from a shell; exit 1 if it found a violation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--max-down", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
    start = time.time()

    def say(text: str) -> None:
        print(f"{time.time() - start:7.2f} {text}", flush=True)

    report = run_chaos(workdir, seed, args.seconds, members=[f"ls{i + 1}" for i in range(args.members)],
                       clients=args.clients, kinds=args.kinds.split(","), max_down=args.max_down, say=say)
    print(report.summary())
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
