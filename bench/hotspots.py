"""Summaries of py-spy's raw (collapsed-stack) profiles: where the server's time goes.

``python bench/run.py --profile`` records the member with ``py-spy record
--format raw`` while the checkout (1x1, 50x4) and heartbeat (10x4) windows are
open; this module turns each file into the top functions by own time (the
frame on top of the stack) and by total time (anywhere on the stack), in
percent of the samples taken. Run it by hand on a kept profile:
``python bench/hotspots.py FILE [--top N]``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")

# Frames on (nearly) every stack: the twistd start-up chain, the reactor's
# dispatch and the thread pool's plumbing. They say nothing about hot spots.
_PLUMBING = frozenset(
    {
        "<module>",
        "run",
        "runApp",
        "ApplicationRunner.run",
        "UnixApplicationRunner.postApplication",
        "ApplicationRunner.startReactor",
        "runReactorWithLogging",
        "ReactorBase.run",
        "ReactorBase.mainLoop",
        "EPollReactor.doPoll",
        "callWithLogger",
        "callWithContext",
        "ThreadedContextTracker.callWithContext",
        "ContextTracker.callWithContext",
        "_PollLikeMixin._doReadOrWrite",
        "Thread._bootstrap",
        "Thread._bootstrap_inner",
        "Thread.run",
        "ThreadWorker.__init__.<locals>.work",
        "Team._coordinateThisTask.<locals>.doWork",
        "ThreadPool.callInThreadWithCallback.<locals>.inContext",
        "ThreadPool.callInThreadWithCallback.<locals>.<lambda>",
    }
)


def _split(frame: str) -> tuple[str, str]:
    """``func (path/to/module.py:123)`` -> (``func``, ``func (to/module.py)``)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), frame.strip()
    path = m.group("file")
    if path.startswith("licensing/") or "/licensing/" in path:
        short = "licensing/" + path.split("licensing/", 1)[1]
    else:
        short = "/".join(Path(path).parts[-2:])
    return m.group("func"), f"{m.group('func')} ({short})"


# Where a sample's time goes, judged by the stack: the first rule that matches wins.
_CATEGORIES = (
    ("store thread", lambda frames, leaf: frames[0][0] == "Thread._bootstrap"),
    (
        "logging",
        lambda frames, leaf: any(
            f.startswith("Logger.") or "logger/" in label or "logfile" in label for f, label in frames
        ),
    ),
    ("TLS (pyOpenSSL)", lambda frames, leaf: "OpenSSL/" in leaf or "protocols/tls.py" in leaf),
    (
        "AMP encode/decode",
        lambda frames, leaf: (
            "protocols/amp.py" in leaf or "protocols/basic.py" in leaf or "licensing/wire.py" in leaf
        ),
    ),
    ("Deferreds and coroutines", lambda frames, leaf: "internet/defer.py" in leaf),
    ("licensing code", lambda frames, leaf: "(licensing/" in leaf),
    ("stdlib", lambda frames, leaf: "/" not in leaf.rsplit("(", 1)[-1] or "<string>" in leaf),
    ("reactor and syscalls", lambda frames, leaf: "internet/" in leaf or "python/" in leaf),
)


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Own-time and total-time tops of one raw py-spy profile, in percent of all samples.

    ``categories`` sorts every sample into one kind of work (store thread,
    logging, TLS, AMP, Deferreds, licensing code, ...). ``total_licensing``
    ranks only this project's functions; ``total`` leaves out the plumbing
    frames that are on every stack. ``threads`` splits the
    samples between the reactor thread, worker threads (the store's) and
    stacks py-spy could read only in part.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_split(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += n
        # py-spy --nonblocking sometimes reads a stack mid-change and gets only its top part.
        root = frames[0][0]
        threads[
            "reactor"
            if root == "<module>"
            else "worker threads"
            if root == "Thread._bootstrap"
            else "partial stacks"
        ] += n
        own[frames[-1][1]] += n
        leaf = frames[-1][1]
        categories[next((name for name, rule in _CATEGORIES if rule(frames, leaf)), "other")] += n
        for name in {label for func, label in frames if func not in _PLUMBING}:
            total[name] += n

    def pct(counter: Counter[str], keep: Any = lambda name: True) -> list[tuple[str, float]]:
        if not samples:
            return []
        chosen = [(name, c) for name, c in counter.most_common() if keep(name)][:top]
        return [(name, 100.0 * c / samples) for name, c in chosen]

    return {
        "path": str(path),
        "samples": samples,
        "threads": {k: 100.0 * v / samples for k, v in threads.items()} if samples else {},
        "categories": pct(categories),
        "own": pct(own),
        "total_licensing": pct(total, lambda name: "(licensing/" in name),
        "total": pct(total),
    }


def render(summary: dict[str, Any], title: str = "") -> str:
    threads = ", ".join(f"{k} {v:.0f}%" for k, v in summary.get("threads", {}).items())
    lines = [f"{title or summary['path']}: {summary['samples']} samples ({threads})"]
    for kind, heading in (
        ("categories", "kind of work"),
        ("own", "own time"),
        ("total_licensing", "total time, licensing code"),
        ("total", "total time, all code"),
    ):
        lines.append(f"  top by {heading}:")
        lines += [f"    {share:5.1f}%  {name}" for name, share in summary[kind]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    for f in args.files:
        print(render(summarize(f, args.top)))


if __name__ == "__main__":
    main()
