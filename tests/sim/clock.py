"""Simulated time: one shared clock for the whole run, and a drifting view of it per node."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer


class SimClock(Clock):
    """The true time of a simulation; ``run_until`` executes events at their exact times.

    ``Clock.advance`` runs every due call at the *end* of the interval, so a
    long advance would squash timings. Stepping from one scheduled call to the
    next keeps each event at its own instant.
    """

    def run_until(self, end: float) -> None:
        """Run every call scheduled up to ``end``, each at its own time, then stop at ``end``."""
        while self.calls and self.calls[0].getTime() <= end:
            self.rightNow = max(self.rightNow, self.calls[0].getTime())
            self.advance(0)
        self.rightNow = max(self.rightNow, end)


@implementer(IDelayedCall)
class _DriftingCall:
    """A call scheduled on a DriftingClock, in that clock's seconds."""

    def __init__(self, clock: DriftingClock) -> None:
        self._clock = clock
        self.inner: IDelayedCall | None = None

    def getTime(self) -> float:
        assert self.inner is not None
        return self._clock.local(self.inner.getTime())

    def cancel(self) -> None:
        assert self.inner is not None
        self.inner.cancel()
        self._clock.forget(self)

    def delay(self, secondsLater: float) -> None:
        assert self.inner is not None
        self.inner.delay(secondsLater / self._clock.rate)

    def reset(self, secondsFromNow: float) -> None:
        assert self.inner is not None
        self.inner.reset(secondsFromNow / self._clock.rate)

    def active(self) -> bool:
        return self.inner is not None and self.inner.active()


@implementer(IReactorTime)
class DriftingClock:
    """A node's own clock: the shared clock at ``rate`` (1 +/- drift), from ``offset``.

    Timers scheduled for ``d`` local seconds fire after ``d / rate`` true
    seconds, so a fast clock times out early and a slow one late, as a real
    machine's would.
    """

    def __init__(self, base: SimClock, rate: float, offset: float) -> None:
        self._base = base
        self.rate = rate
        self._offset = offset
        self._calls: set[_DriftingCall] = set()

    def local(self, true_time: float) -> float:
        """This clock's reading at the shared clock's ``true_time``."""
        return self._offset + true_time * self.rate

    def seconds(self) -> float:
        return self.local(self._base.seconds())

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        call = _DriftingCall(self)

        def fire() -> None:
            self._calls.discard(call)
            callable(*args, **kw)

        call.inner = self._base.callLater(max(0.0, delay) / self.rate, fire)
        self._calls.add(call)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [call for call in self._calls if call.active()]

    def forget(self, call: _DriftingCall) -> None:
        """``call`` was cancelled."""
        self._calls.discard(call)
