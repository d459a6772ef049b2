"""How much a durable checkout write costs, and whether it stalls the reactor.

Run ``python bench/bench_store.py`` (from the repository, in its virtualenv).
It measures SQLiteStore on its real thread pool, on a file in ``--dir``
(default: a temporary directory; point it at the disk the server will use):

- the baseline: one raw ``sqlite3`` INSERT + COMMIT with the store's pragmas
  (WAL, synchronous=FULL) on the same disk, without Twisted: the fsync cost
  every acknowledged write pays at least once;
- put_leases latency, p50 and p99, for sequential single writes;
- throughput with 1, 16 and 128 writes outstanding at all times: group
  commit should make it grow with concurrency, and writes per commit shows
  how many writes shared each fsync;
- the reactor's stalls in each phase, from a 1 ms LoopingCall that records
  the gaps between its ticks (the longest and the 99th percentile), next to
  the same figures for an idle reactor: on a shared machine the longest gap
  is mostly other processes and the garbage collector, the p99 is steadier.

It prints a table and writes ``bench/store_results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorCore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from licensing.records import Lease  # noqa: E402
from licensing.store.sqlite import SQLiteStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "store_results.json"


def make_lease(number: int) -> Lease:
    """A lease as a checkout would write it."""
    return Lease(
        f"lease-{number:09d}", "cad-pro", "2.0", f"client-{number % 500}", "ada",
        "ws-17.example.com", 1, "ls1", 1_900_000_000.0, 1_900_000_060.0,
    )


def percentile(samples: list[float], fraction: float) -> float:
    """The sample below which ``fraction`` of the samples lie (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class StallMeter:
    """Gaps between ticks of a 1 ms LoopingCall: how long the reactor was busy elsewhere."""

    def __init__(self, reactor: IReactorCore) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor
        self._last = 0.0
        self.gaps: list[float] = []

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        """Begin measuring from now."""
        self._last = 0.0
        self.gaps = []
        self._loop.start(0.001)

    def stop(self) -> dict[str, float]:
        """Stop; the longest and the 99th-percentile gap, in milliseconds."""
        self._loop.stop()
        return {
            "max_stall_ms": max(self.gaps) * 1000,
            "p99_gap_ms": percentile(self.gaps, 0.99) * 1000,
        }


def raw_commit_latency(directory: Path, count: int) -> list[float]:
    """Seconds per INSERT + COMMIT with plain sqlite3 and the store's pragmas."""
    conn = sqlite3.connect(directory / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
    samples = []
    for number in range(count):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?)", (f"k{number}", b"x" * 120))
        conn.execute("COMMIT")
        samples.append(time.perf_counter() - start)
    conn.close()
    return samples


async def idle(reactor: IReactorCore, meter: StallMeter, seconds: float) -> dict[str, float]:
    """The stalls of a reactor doing nothing else, for comparison."""
    meter.start()
    await task.deferLater(reactor, seconds, lambda: None)
    return meter.stop()


async def sequential(store: SQLiteStore, meter: StallMeter, count: int) -> dict[str, Any]:
    """Latency of put_leases when each write waits for the one before."""
    samples = []
    meter.start()
    for number in range(count):
        start = time.perf_counter()
        await store.put_leases([make_lease(number)])
        samples.append(time.perf_counter() - start)
    return {
        "writes": count,
        "p50_ms": percentile(samples, 0.50) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        **meter.stop(),
    }


async def concurrent(
    store: SQLiteStore, meter: StallMeter, outstanding: int, seconds: float, first: int
) -> dict[str, Any]:
    """Throughput with ``outstanding`` writes in flight at every moment for ``seconds``."""
    samples: list[float] = []
    numbers = iter(range(first, first + 10**8))
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await store.put_leases([make_lease(next(numbers))])
            samples.append(time.perf_counter() - start)

    commits = store.commits
    meter.start()
    began = time.perf_counter()
    await gatherResults([ensureDeferred(writer()) for _ in range(outstanding)])
    elapsed = time.perf_counter() - began
    stall = meter.stop()
    batches = store.commits - commits
    return {
        "outstanding": outstanding,
        "writes": len(samples),
        "writes_per_s": len(samples) / elapsed,
        "commits": batches,
        "writes_per_commit": len(samples) / batches,
        "p50_ms": percentile(samples, 0.50) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        **stall,
    }


def report(results: dict[str, Any]) -> str:
    """The results as a text table."""
    raw = results["baseline_raw_sqlite_commit"]
    idle = results["idle_reactor"]
    lines = [
        f"store file system: {results['directory']}",
        f"raw sqlite3 commit (WAL, synchronous=FULL), no Twisted: "
        f"p50 {raw['p50_ms']:.3f} ms, p99 {raw['p99_ms']:.3f} ms",
        f"idle reactor, 1 ms LoopingCall gaps: p99 {idle['p99_gap_ms']:.2f} ms, "
        f"longest {idle['max_stall_ms']:.2f} ms",
        "",
        f"{'run':<18}{'writes':>8}{'writes/s':>10}{'per commit':>11}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'x raw p50':>10}{'gap p99 ms':>11}{'stall max ms':>13}",
    ]
    seq = results["sequential"]
    rows = [("sequential", seq, 1000 / seq["p50_ms"], 1.0)]
    rows += [
        (f"{run['outstanding']} outstanding", run, run["writes_per_s"], run["writes_per_commit"])
        for run in results["concurrent"]
    ]
    for name, run, rate, per_commit in rows:
        lines.append(
            f"{name:<18}{run['writes']:>8}{rate:>10.0f}{per_commit:>11.1f}"
            f"{run['p50_ms']:>8.3f}{run['p99_ms']:>8.3f}{run['p50_ms'] / raw['p50_ms']:>10.2f}"
            f"{run['p99_gap_ms']:>11.2f}{run['max_stall_ms']:>13.2f}"
        )
    return "\n".join(lines)


async def bench(reactor: IReactorCore, options: argparse.Namespace) -> None:
    """Run every phase on one store file and report."""
    with tempfile.TemporaryDirectory(dir=options.dir) as name:
        directory = Path(name)
        raw = raw_commit_latency(directory, options.sequential)
        meter = StallMeter(reactor)
        store = SQLiteStore(directory / "store.db", reactor)
        results: dict[str, Any] = {
            "directory": str(Path(options.dir or tempfile.gettempdir()).resolve()),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "baseline_raw_sqlite_commit": {
                "p50_ms": percentile(raw, 0.50) * 1000,
                "p99_ms": percentile(raw, 0.99) * 1000,
            },
            "idle_reactor": await idle(reactor, meter, options.seconds),
        }
        results["sequential"] = await sequential(store, meter, options.sequential)
        runs = []
        first = options.sequential
        for outstanding in (1, 16, 128):
            run = await concurrent(store, meter, outstanding, options.seconds, first)
            first += run["writes"]
            runs.append(run)
        results["concurrent"] = runs
        await store.close()
    print(report(results))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


def main(argv: list[str]) -> None:
    """Parse options and run the benchmark on the real reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="directory for the store file (default: system temp)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    parser.add_argument("--sequential", type=int, default=1000, help="sequential writes")
    options = parser.parse_args(argv)
    task.react(lambda reactor: ensureDeferred(bench(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
