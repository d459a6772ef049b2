"""Summaries of py-spy's raw (collapsed-stack) profiles: where the server's time goes.

``python bench/run.py --profile`` records the member with ``py-spy record
--format raw`` while the checkout (50x4) and heartbeat (10x4) windows are
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


def _name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``, one entry per function."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = "/".join(Path(path).parts[-2:]) if "site-packages" in path or "/lib/" in path else Path(path).name
    if "/licensing/" in path:
        short = "licensing/" + path.split("/licensing/", 1)[1]
    return f"{m.group('func')} ({short})"


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Own-time and total-time tops of one raw py-spy profile."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * c / samples) for name, c in counter.most_common(top)] if samples else []

    return {"path": str(path), "samples": samples, "own": pct(own), "total": pct(total)}


def render(summary: dict[str, Any], title: str = "") -> str:
    lines = [f"{title or summary['path']}: {summary['samples']} samples"]
    for kind in ("own", "total"):
        lines.append(f"  top by {kind} time:")
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
