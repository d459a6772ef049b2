"""What a scenario reports: figures (member value, baseline value, ratio) and targets.

A ``Figure`` is one number of the member under one load shape, with the
baseline's number for the same shape when there is one. ``ratio`` is always
member / baseline, so for rates higher is better and for latencies lower is
better; ``better`` says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """One measured number (and its baseline) as it goes into the table and results.json."""

    scenario: str
    key: str
    label: str
    unit: str
    value: float | None
    baseline: float | None = None
    better: str = "higher"
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass(frozen=True)
class Target:
    """A goal from the issue: a figure's ratio (or value) compared with a threshold."""

    key: str
    description: str
    check: Callable[[Figure], bool]
    show: Callable[[Figure], str]

    def judge(self, figures: dict[str, Figure]) -> dict[str, Any]:
        figure = figures.get(self.key)
        if figure is None or figure.value is None:
            return {"target": self.description, "figure": self.key, "met": None, "measured": "not measured"}
        return {
            "target": self.description,
            "figure": self.key,
            "met": bool(self.check(figure)),
            "measured": self.show(figure),
        }


def _ratio(f: Figure) -> str:
    return "n/a" if f.ratio is None else f"{f.ratio:.2f}x baseline"


TARGETS = [
    Target(
        "checkout.50x4.rate",
        "checkout throughput, 50 connections >= 0.75x baseline",
        lambda f: f.ratio is not None and f.ratio >= 0.75,
        _ratio,
    ),
    Target(
        "checkout.1x1.p50",
        "checkout p50 latency (sequential) <= 1.3x baseline",
        lambda f: f.ratio is not None and f.ratio <= 1.3,
        _ratio,
    ),
    Target(
        "heartbeat.10x4.rate",
        "heartbeat renewals/s (100 leases a call) >= 0.5x baseline",
        lambda f: f.ratio is not None and f.ratio >= 0.5,
        _ratio,
    ),
    Target(
        "memory.bytes_per_lease",
        "resident memory per lease <= 1 KiB",
        lambda f: f.value is not None and f.value <= 1024,
        lambda f: f"{f.value:.0f} B/lease",
    ),
    Target(
        "scale.bytes_per_pool_lease",
        "resident memory per lease per member of a 3-member pool <= 1 KiB",
        lambda f: f.value is not None and f.value <= 1024,
        lambda f: f"{f.value:.0f} B/lease",
    ),
    Target(
        "failover.half.renewed.median",
        "failover, pool half full: clients of the killed leader renewed/converted, median <= 2 s",
        lambda f: f.value is not None and f.value <= 2.0,
        lambda f: f"{f.value:.2f} s",
    ),
    Target(
        "failover.half.renewed.max",
        "failover, pool half full: clients of the killed leader renewed/converted, max <= 4 s",
        lambda f: f.value is not None and f.value <= 4.0,
        lambda f: f"{f.value:.2f} s",
    ),
    Target(
        "failover.full.renewed.max",
        "failover, pool full: clients of the killed leader renewed/converted, max <= 5 s",
        lambda f: f.value is not None and f.value <= 5.0,
        lambda f: f"{f.value:.2f} s",
    ),
    Target(
        "failover.over_issued",
        "failover: no seat over-issued at any observer poll",
        lambda f: f.value == 0,
        lambda f: f"{f.value:.0f} seat(s) over the count",
    ),
    Target(
        "failover.lost",
        "failover: no lease lost",
        lambda f: f.value == 0,
        lambda f: f"{f.value:.0f} lost",
    ),
]


def judge(figures: list[Figure]) -> list[dict[str, Any]]:
    by_key = {f.key: f for f in figures}
    return [t.judge(by_key) for t in TARGETS]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("ms", "s"):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def table(figures: list[Figure]) -> str:
    """A plain-text table: one line per figure, grouped by scenario."""
    rows = [("scenario", "figure", "member", "baseline", "ratio", "unit")]
    for f in figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        rows.append((f.scenario, f.label, fmt(f.value, f.unit), fmt(f.baseline, f.unit), ratio, f.unit))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i < 2 or i == 5 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {f.key}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)
