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

    def start_pool(self, box: Sandbox, timeout: float = 30.0) -> list[Target]:
        """Start every member of ``box`` at once, then wait until each serves.

        Members of a pool serve only once a majority is up, so they cannot be
        started one at a time with a wait in between.
        """
        targets = [self.start_member(box, name, wait=False) for name in box.members]
        for name in box.members:
            box.wait_serving(name, timeout)
        return targets

    def member(self) -> Target:
        """The shared single member (started on first use)."""
        if self._member is None:
            self._member = self.start_member(self.new_sandbox("single"))
        return self._member

    def baseline(self) -> Target:
        """The bare AMP server, with the shared member's certificate and CA."""
        if self._baseline is None:
            pki = self.member().pki
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
                ],
                stdout=subprocess.PIPE,
            )
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise RuntimeError("the baseline server exited before listening")
            info = json.loads(line)
            self._baseline = Target("baseline", info["port"], proc.pid, pki)
        return self._baseline

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
        ``server_rss_start``/``server_rss_end`` (bytes, summed) and
        ``other_cpu_util`` (cores used meanwhile by other processes on the
        machine), taken from /proc at the window's edges. ``profile`` names a phase to sample
        with py-spy (if installed) while its window is open.
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
        proc = self._spawn(argv, stdout=subprocess.PIPE, stderr=stderr)
        timer = threading.Timer(self.settings.loadgen_timeout, _killpg, (proc,))
        timer.start()
        samples: dict[str, dict[str, float]] = {}
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
                    s[f"cpu_{edge}"] = sum(cpu_seconds(t.pid) for t in group)
                    s[f"gen_{edge}"] = cpu_seconds(proc.pid)
                    s[f"busy_{edge}"] = system_busy_seconds()
                    s[f"rss_{edge}"] = sum(rss_bytes(t.pid) for t in group)
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
