"""``make bench``: run every scenario, print the table, write bench/results.json.

Every speed figure of a member comes with the same figure of the bare-AMP
baseline server (``baseline_server.py``) measured in this run under the same
load shape, and their ratio. Options: ``--only checkout,heartbeat`` runs some
scenarios (including ones not run by default), ``--list`` names them,
``--duration`` sets the seconds per measured point, ``--repeat N``
runs each point N times (member and baseline in turns) and keeps the medians, ``--quick`` shrinks the
lease counts for a smoke run, ``--profile`` also samples the member with
py-spy under checkout and heartbeat load and prints its hot spots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hotspots
from figures import Figure, judge, table
from harness import REPO, Bench, Settings
from scenarios import SCENARIOS


def machine_info() -> dict[str, Any]:
    """What the figures depend on: the machine and the versions in use."""
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl.backend import backend

    import twisted

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "reactor": "epoll (twistd default on Linux)",
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "licensing"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["licensing_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


CONTENTION_WARNING = 0.15
"""Cores used by other processes, on average over the windows, above which the run is flagged."""


def other_load(runs: list[dict[str, Any]]) -> dict[str, float]:
    """How much CPU the rest of the machine took while windows were open (cores)."""
    seconds = busy = peak = 0.0
    for run in runs:
        for p in run["result"]["phases"]:
            if "other_cpu_util" in p:
                seconds += p["seconds"]
                busy += p["other_cpu_util"] * p["seconds"]
                peak = max(peak, p["other_cpu_util"])
    return {
        "mean_cores": busy / seconds if seconds else 0.0,
        "max_cores": peak,
        "load_average_end": os.getloadavg()[0],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--duration", type=float, default=Settings.duration, help="seconds per measured point"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=Settings.repeat,
        help="runs per point, member and baseline in turns; median kept",
    )
    parser.add_argument("--quick", action="store_true", help="small lease counts and 1 s points (smoke test)")
    parser.add_argument("--profile", action="store_true", help="sample the member with py-spy")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results.json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(duration=args.duration, repeat=args.repeat, profile=args.profile)
    if args.quick:
        s.duration = min(s.duration, 1.0)
        s.checkin_leases = 2000
        s.expiry_leases = 2000
        s.expiry_ttl = 3
        s.memory_leases = 10_000
        s.memory_clients = 1000
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            print(f"{sc.name:14} {'' if sc.default else '(not by default) '}{sc.description}")
        return 0
    names = [n for n in args.only.split(",") if n] or [n for n, sc in SCENARIOS.items() if sc.default]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; --list names them", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP unwind like Ctrl-C (and SIGINT does even when started in the
    # background, where it is ignored), so the finally below kills every child.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    settings = settings_from(args)
    bench = Bench(settings, progress=lambda text: print(text, file=sys.stderr, flush=True))
    try:
        return run(bench, names, args)
    except KeyboardInterrupt:
        print("\ninterrupted: no results written", file=sys.stderr)
        return 130
    finally:
        bench.close()
        if args.keep:
            print(f"work directory kept: {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)


def run(bench: Bench, names: list[str], args: argparse.Namespace) -> int:
    """Run the scenarios, then write results.json and print the report."""
    settings = bench.settings
    started = time.monotonic()
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    timings: dict[str, float] = {}
    try:
        for name in names:
            bench.scenario = name
            print(
                f"[{time.monotonic() - started:6.1f} s] {name}: {SCENARIOS[name].description}",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.monotonic()
            try:
                figures += SCENARIOS[name].run(bench)
            except (RuntimeError, TimeoutError, OSError, KeyError) as e:
                failures[name] = f"{type(e).__name__}: {e}"
                print(f"  {name} failed: {failures[name]}", file=sys.stderr, flush=True)
            timings[name] = time.monotonic() - t0
    finally:
        bench.close()
    profiles = []
    for p in bench.profiles:
        path = Path(p["path"])
        if path.exists() and path.stat().st_size:
            profiles.append({**p, **hotspots.summarize(path)})

    verdicts = judge(figures)
    contention = other_load(bench.runs)
    doc = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": asdict(settings),
        "scenarios": names,
        "scenario_seconds": timings,
        "total_seconds": time.monotonic() - started,
        "failures": failures,
        "figures": [f.as_dict() for f in figures],
        "targets": verdicts,
        "contention": contention,
        "profiles": profiles,
        "runs": bench.runs,
    }
    args.output.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    m = doc["machine"]
    print(
        f"\nlicensing benchmarks: {m['cpu_count']} CPUs ({m.get('cpu_model')}), Python {m['python']}, "
        f"Twisted {m['twisted']}, {m['openssl']}; {settings.duration:g} s per point; "
        f"baseline = bare AMP over the same mutual TLS\n"
    )
    print(table(figures))
    if contention["mean_cores"] > CONTENTION_WARNING:
        print(
            f"\nWARNING: other processes used {contention['mean_cores']:.2f} cores on average "
            f"(up to {contention['max_cores']:.2f}) during the measurements; every figure is skewed. "
            f"Run again on an idle machine."
        )
    print("\ntargets (goals from issue 5):")
    for v in verdicts:
        mark = {True: "met", False: "NOT met", None: "not measured"}[v["met"]]
        print(f"  [{mark:>12}] {v['target']}: {v['measured']}")
    for p in profiles:
        print()
        print(hotspots.render(p, f"py-spy profile of {p['target']} during {p['phase']} {p['shape']}"))
    for name, why in failures.items():
        print(f"\nscenario {name} failed: {why}")
    print(f"\nwrote {args.output} in {doc['total_seconds']:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
