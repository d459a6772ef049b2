"""Processes for one benchmark run: members, the baseline server, load generators.

``Bench`` is what every scenario gets. It starts real ``twistd licensing``
members through ``licensing.sandbox`` (the same PKI, license and pool.ini an
operator would have), the bare-AMP baseline server with the same certificates,
and one load generator process per measurement. While a load generator runs,
``Bench`` samples the target process's CPU time (``/proc/PID/stat``) and
resident memory (``/proc/PID/status``) at the moments the load generator opens
and closes each recorded window, so every phase comes back with the server's
own cost beside the client's view.

Every process started here is in its own process group and is killed in
``close()``, which ``run.py`` calls from a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from licensing.sandbox import Sandbox, make_sandbox  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

FEATURE = "bench"
EXPIRY_FEATURE = "bench-expiry"


def child_env() -> dict[str, str]:
    """The environment for every child: this tree first on the path, output unbuffered."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""), PYTHONUNBUFFERED="1")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def system_busy_seconds() -> float:
    """CPU time spent by the whole machine outside idle and iowait, summed over CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    # guest time is already counted in user time
    return (sum(values[:8]) - idle) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_files_limit(pid: int) -> int:
    """The soft limit on open files of a process (``Max open files`` in /proc/PID/limits)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                value = line.split()[3]
                return 1 << 62 if value == "unlimited" else int(value)
    raise RuntimeError(f"no open files limit for pid {pid}")


def raise_open_files(pid: int, needed: int) -> int:
    """Raise a running process's soft open-files limit to its hard limit if it is below ``needed``.

    Children inherit the bench's limits; a member that has to hold 10,000
    client connections needs more than the usual 1,024. Returns the soft
    limit in force afterwards (still below ``needed`` if the hard limit is).
    """
    import resource

    soft = open_files_limit(pid)
    if soft < needed:
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        target = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
        if target == resource.RLIM_INFINITY:
            target = needed
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (target, hard))
        soft = open_files_limit(pid)
    return soft


def listen_overflows() -> dict[str, int]:
    """The kernel's counts of connections a full accept queue turned away (``TcpExt``, machine-wide).

    A listener's accept queue holds at most its backlog; connections beyond
    it are dropped and the client retries its SYN one, three, seven seconds
    later, which shows up as slow handshakes in a connection storm.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]), strict=False))
            return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {}


@dataclass
class Snapshot:
    """Counters of the servers, the load generators and the machine at one moment."""

    wall: float
    server_cpu: list[float]
    server_rss: list[int]
    gen_cpu: float
    busy: float
    overflows: dict[str, int]

    @classmethod
    def take(cls, servers: list[int], generators: list[int]) -> Snapshot:
        return cls(
            time.monotonic(),
            [cpu_seconds(pid) for pid in servers],
            [rss_bytes(pid) for pid in servers],
            sum(cpu_seconds(pid) for pid in generators),
            system_busy_seconds(),
            listen_overflows(),
        )


def window(name: str, start: Snapshot, end: Snapshot, items: int = 0, **extra: Any) -> dict[str, Any]:
    """A phase between two snapshots, in the shape ``Bench.load`` gives its phases.

    Scenarios that drive their own client processes (``connload.py``) record
    their windows with this and add them to ``Bench.runs``, so results.json
    says how busy the rest of the machine was for them too.
    """
    seconds = end.wall - start.wall
    cpu_by = [b - a for a, b in zip(start.server_cpu, end.server_cpu, strict=True)]
    cpu = sum(cpu_by)
    gen = end.gen_cpu - start.gen_cpu
    others = (end.busy - start.busy) - cpu - gen
    return {
        "name": name,
        "seconds": seconds,
        "items": items,
        "server_cpu_s": cpu,
        "server_cpu_s_by_target": cpu_by,
        "server_cpu_util": cpu / seconds if seconds > 0 else 0.0,
        "server_cpu_us_per_item": cpu / items * 1e6 if items else None,
        "server_rss_start": sum(start.server_rss),
        "server_rss_end": sum(end.server_rss),
        "server_rss_start_by_target": start.server_rss,
        "server_rss_end_by_target": end.server_rss,
        "loadgen_cpu": gen / seconds if seconds > 0 else 0.0,
        "other_cpu_util": max(0.0, others) / seconds if seconds > 0 else 0.0,
        "listen_overflows": {k: end.overflows.get(k, 0) - v for k, v in start.overflows.items()},
        **extra,
    }


@dataclass
class Target:
    """Something a load generator can dial: a member or the baseline server."""

    kind: str
    port: int
    pid: int
    pki: Path
    server_name: str = "ls1"
    sandbox: Sandbox | None = None


@dataclass
class Settings:
    """Knobs of one run; all of them are written to results.json."""

    duration: float = 3.0
    repeat: int = 1
    warmup: float = 0.5
    checkout_shapes: tuple[tuple[int, int], ...] = ((1, 1), (1, 16), (1, 128), (50, 4))
    heartbeat_shapes: tuple[tuple[int, int], ...] = ((1, 1), (10, 4))
    leases_per_heartbeat: int = 100
    checkin_leases: int = 20_000
    checkin_shape: tuple[int, int] = (50, 4)
    expiry_leases: int = 10_000
    expiry_ttl: int = 10
    memory_leases: int = 100_000
    memory_clients: int = 10_000
    memory_shape: tuple[int, int] = (20, 8)
    pool_checkout_shapes: tuple[tuple[int, int], ...] = ((1, 1), (3, 1), (50, 4))
    feature_count: int = 1_000_000
    lease_ttl: int = 3600
    store: str = "sqlite"
    profile: bool = False
    profile_rate: int = 250
    loadgen_timeout: float = 240.0

    def features(self) -> dict[str, dict[str, Any]]:
        common = {"version": "1.0", "count": self.feature_count, "expires": "never", "majority_rule": "yes"}
        return {
            FEATURE: {**common, "lease_ttl": self.lease_ttl},
            EXPIRY_FEATURE: {**common, "lease_ttl": self.expiry_ttl},
        }


@dataclass
class Bench:
    """The processes of one run and the ways to measure them."""

    settings: Settings
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="licensing-bench-")))
    progress: Callable[[str], None] = lambda text: None
    _sandboxes: list[Sandbox] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _baseline: Target | None = None
    _member: Target | None = None
    baseline_phases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Baseline phases measured in this run, by load shape and plan, for reuse under the same load."""
    profiles: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    scenario: str = ""

    # -- targets -------------------------------------------------------------

    def new_sandbox(
        self, tag: str, members: tuple[str, ...] = ("ls1",), timings: Mapping[str, float] | None = None
    ) -> Sandbox:
        """A fresh pool directory (own CA, license, data) under the run's work dir."""
        box = make_sandbox(
            self.workdir / tag,
            members,
            features=self.settings.features(),
            store=self.settings.store,
            timings=timings,
        )
        self._sandboxes.append(box)
        return box

    def start_member(self, box: Sandbox, name: str = "ls1", wait: bool = True) -> Target:
        """Start one member of ``box`` as a real ``twistd`` process (and wait until it serves)."""
        saved = dict(os.environ)
        os.environ.update(child_env())
        try:
            proc = box.start(name, wait=20.0 if wait else 0)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return Target("member", box.ports[name]["client"], proc.pid, box.root / "pki", name, box)

    def start_pool(self, box: Sandbox, timeout: float = 30.0, acting: str | None = None) -> list[Target]:
        """Start every member of ``box`` at once, then wait until each serves.

        Members of a pool serve only once a majority is up, so they cannot be
        started one at a time with a wait in between. With ``acting`` (a
        feature name) it also waits until every member acts on that feature:
        a member serves before its allocation lease is first confirmed, and
        answers NoQuorum until then.
        """
        targets = [self.start_member(box, name, wait=False) for name in box.members]
        for name in box.members:
            box.wait_serving(name, timeout)
        if acting is not None:
            self.wait_acting(box, acting, timeout)
        return targets

    def wait_acting(self, box: Sandbox, feature: str, timeout: float = 30.0) -> None:
        """Wait until every member of ``box`` says it acts on ``feature`` (its status's ``acting``)."""
        deadline = time.monotonic() + timeout
        pending = list(box.members)
        while pending:
            doc = box.status(pending[0], timeout=2.0)
            if doc is not None and any(f["name"] == feature and f["acting"] for f in doc["features"]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending[0]} does not act on {feature} within {timeout} s")
            time.sleep(0.05)

    def member(self) -> Target:
        """The shared single member (started on first use)."""
        if self._member is None:
            self._member = self.start_member(self.new_sandbox("single"))
        return self._member

    def baseline(self) -> Target:
        """The bare AMP server, with the shared member's certificate and CA."""
        if self._baseline is None:
            self._baseline = self.start_baseline(self.member().pki)
        return self._baseline

    def start_baseline(self, pki: Path, port: int = 0, options: tuple[str, ...] = ()) -> Target:
        """A new bare AMP server with ``pki``'s ls1 certificate, on ``port`` (0: any), once it listens.

        The shared one is ``baseline()``; a scenario that kills its baseline
        (the reconnection storm) starts its own, and again on the same port.
        ``options`` go to ``baseline_server.py`` (``--backlog N``).
        """
        proc = self._spawn(
            [
                sys.executable,
                str(BENCH / "baseline_server.py"),
                "--ca",
                str(pki / "ca.pem"),
                "--cert",
                str(pki / "ls1.pem"),
                "--key",
                str(pki / "ls1.key"),
                "--port",
                str(port),
                *options,
            ],
            stdout=subprocess.PIPE,
        )
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            raise RuntimeError("the baseline server exited before listening")
        info = json.loads(line)
        return Target("baseline", info["port"], proc.pid, pki)

    def kill(self, pid: int) -> None:
        """SIGKILL a process this run started (``kill -9``) and reap it."""
        for proc in self._procs:
            if proc.pid == pid:
                _killpg(proc)
                return
        raise KeyError(f"no process {pid} started by this run")

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a helper process in its own session; it is killed in ``close()``."""
        return self._spawn(argv, **kwargs)

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, env=child_env(), cwd=REPO, start_new_session=True, text=True, **kwargs)
        self._procs.append(proc)
        return proc

    # -- load --------------------------------------------------------------

    def load(
        self,
        targets: Target | list[Target],
        connections: int,
        outstanding: int,
        plan: list[dict[str, Any]],
        *,
        clients: int = 0,
        feature: str = FEATURE,
        profile: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Run one load generator against ``targets``; its result with server-side samples added.

        With several targets (members of a pool) the connections are spread
        over them round robin. Each recorded phase gains ``server_cpu_s``
        (summed over the targets), ``server_cpu_util``, ``server_cpu_us_per_item``,
        ``server_rss_start``/``server_rss_end`` (bytes, summed), the same per
        target (``server_cpu_s_by_target``, ``server_rss_start_by_target``,
        ``server_rss_end_by_target``, in the order of ``targets``) and
        ``other_cpu_util`` (cores used meanwhile by other processes on the
        machine), taken from /proc at the window's edges. ``profile`` names a phase to sample
        with py-spy (if installed) while its window is open. A plan's
        ``await`` phase calls ``on_event`` and goes on once it returns.
        """
        group = [targets] if isinstance(targets, Target) else list(targets)
        pki = group[0].pki
        argv = [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--port",
            ",".join(str(t.port) for t in group),
            "--server-name",
            ",".join(t.server_name for t in group),
            "--ca",
            str(pki / "ca.pem"),
            "--cert",
            str(pki / "client.pem"),
            "--key",
            str(pki / "client.key"),
            "--connections",
            str(connections),
            "--outstanding",
            str(outstanding),
            "--clients",
            str(clients),
            "--feature",
            feature,
            "--plan",
            json.dumps(plan),
        ]
        stderr = tempfile.TemporaryFile(mode="w+")
        proc = self._spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        timer = threading.Timer(self.settings.loadgen_timeout, _killpg, (proc,))
        timer.start()
        samples: dict[str, dict[str, Any]] = {}
        spies: list[subprocess.Popen] = []
        result: dict[str, Any] | None = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                event = json.loads(line)
                kind = event.get("event")
                if kind in ("window-start", "window-end"):
                    edge = "start" if kind == "window-start" else "end"
                    s = samples.setdefault(event["phase"], {})
                    by_target = [cpu_seconds(t.pid) for t in group]
                    rss_by_target = [rss_bytes(t.pid) for t in group]
                    s[f"cpu_{edge}"] = sum(by_target)
                    s[f"gen_{edge}"] = cpu_seconds(proc.pid)
                    s[f"busy_{edge}"] = system_busy_seconds()
                    s[f"rss_{edge}"] = sum(rss_by_target)
                    s[f"cpu_by_{edge}"] = by_target
                    s[f"rss_by_{edge}"] = rss_by_target
                    s[f"wall_{edge}"] = time.monotonic()
                    if profile == event["phase"] and edge == "start":
                        shape = f"{connections}x{outstanding}"
                        spies = [
                            p for p in (self._start_profiler(t, event["phase"], shape) for t in group) if p
                        ]
                    if spies and edge == "end":
                        self._stop_profilers(spies)
                        spies = []
                elif kind == "result":
                    result = event
                if on_event is not None:
                    on_event(event)
                if kind == "await" and proc.stdin is not None:
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
            proc.wait()
        except BaseException:
            stderr.close()
            raise
        finally:
            timer.cancel()
            self._stop_profilers(spies)
            _killpg(proc)
        with stderr:
            if result is None or proc.returncode != 0:
                stderr.seek(0)
                raise RuntimeError(f"load generator failed (exit {proc.returncode}): {stderr.read()[-3000:]}")
        for phase in result["phases"]:
            s = samples.get(phase["name"], {})
            if "cpu_end" in s:
                cpu = s["cpu_end"] - s["cpu_start"]
                phase["server_cpu_s"] = cpu
                phase["server_cpu_util"] = cpu / phase["seconds"] if phase["seconds"] else 0.0
                phase["server_cpu_us_per_item"] = cpu / phase["items"] * 1e6 if phase["items"] else None
                phase["server_rss_start"] = s["rss_start"]
                phase["server_rss_end"] = s["rss_end"]
                start_by, end_by = s["cpu_by_start"], s["cpu_by_end"]
                phase["server_cpu_s_by_target"] = [b - a for a, b in zip(start_by, end_by, strict=True)]
                phase["server_rss_start_by_target"] = s["rss_by_start"]
                phase["server_rss_end_by_target"] = s["rss_by_end"]
                # Whatever else ran on the machine meanwhile (other processes
                # take cores from both sides and skew every figure).
                others = (s["busy_end"] - s["busy_start"]) - cpu - (s["gen_end"] - s["gen_start"])
                phase["other_cpu_util"] = max(0.0, others) / phase["seconds"] if phase["seconds"] else 0.0
        result["target"] = "+".join(t.kind for t in group)
        self.runs.append(
            {
                "scenario": self.scenario,
                "targets": [t.kind for t in group],
                "connections": connections,
                "outstanding": outstanding,
                "clients": clients,
                "feature": feature,
                "plan": plan,
                "result": result,
            }
        )
        return result

    # -- profiling -----------------------------------------------------------

    def _start_profiler(self, target: Target, phase: str, shape: str) -> subprocess.Popen | None:
        from shutil import which

        spy = which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.progress("py-spy not found; profiling skipped (pip install py-spy)")
            return None
        out = self.workdir / "profiles" / f"{target.kind}-{target.server_name}-{phase}-{shape}.txt"
        out.parent.mkdir(exist_ok=True)
        proc = self._spawn(
            [
                spy,
                "record",
                "--pid",
                str(target.pid),
                "--format",
                "raw",
                "--rate",
                str(self.settings.profile_rate),
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.profiles.append(
            {
                "target": f"{target.kind} {target.server_name}",
                "phase": phase,
                "shape": shape,
                "path": str(out),
            }
        )
        return proc

    def _stop_profilers(self, procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                _killpg(proc)

    # -- observation ----------------------------------------------------------

    def feature_in_use(self, target: Target, feature: str) -> int | None:
        """``in_use`` of a feature from the member's /api/status, or None if it does not answer."""
        assert target.sandbox is not None
        doc = target.sandbox.status(target.server_name, timeout=2.0)
        if doc is None:
            return None
        for f in doc["features"]:
            if f["name"] == feature:
                return int(f["in_use"])
        return None

    # -- cleanup -------------------------------------------------------------

    def close(self) -> None:
        """Stop every member and kill every process this run started."""
        for box in self._sandboxes:
            try:
                box.stop_all()
            except Exception as e:  # keep cleaning up the rest
                self.progress(f"stopping {box.root} failed: {e}")
        for proc in self._procs:
            _killpg(proc)
        self._procs.clear()


def _killpg(proc: subprocess.Popen) -> None:
    """SIGKILL a child's whole process group (it was started in its own session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
