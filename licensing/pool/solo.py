"""A pool of one member: it always leads and holds every seat.

With one member there is nobody to agree with, so the license file goes
straight to the store and the whole count is this server's allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from zope.interface import implementer

from ..errors import StaleLicense
from ..interfaces import IPool
from ..records import InstalledLicense

if TYPE_CHECKING:
    from ..config import Address
    from ..server import LicenseServer


@implementer(IPool)
class SoloPool:
    """``IPool`` for a one-member pool."""

    role = "leader"
    term = 0

    def __init__(self, server: LicenseServer, client_address: Address) -> None:
        self.server = server
        self.client_address = client_address
        self.leader = server.name

    def start(self) -> Deferred[None]:
        self._allocate()
        return succeed(None)

    def stop(self) -> None:
        """Nothing runs on its own in a pool of one."""

    def check_issue(self, feature: Any) -> None:
        """A pool of one is always a majority of itself."""

    def allocation(self, feature: str) -> int:
        return self.server.seats.allocation(feature)

    def _allocate(self) -> None:
        lic = self.server.license
        if lic is None:
            return
        for feature in lic.features.values():
            self.server.seats.set_allocation(feature.name, feature.count)

    def offer_license(self, data: bytes) -> Deferred[int]:
        return ensureDeferred(self._offer(data))

    async def _offer(self, data: bytes) -> int:
        offered = self.server.verify(data)
        current = self.server.license
        if current is not None and data == current.signed_bytes:
            return current.sequence
        if current is not None and offered.sequence <= current.sequence:
            raise StaleLicense(
                f"license sequence {offered.sequence} is not newer than the installed "
                f"sequence {current.sequence}; kept the installed file"
            )
        await self.server.store.save_license(InstalledLicense(offered.sequence, data))
        self.server.stored_sequence = offered.sequence
        self.server.install_license(data)
        self._allocate()
        return offered.sequence

    def members(self) -> list[dict[str, Any]]:
        lic = self.server.license
        return [{
            "name": self.server.name,
            "client_host": self.client_address.host,
            "client_port": self.client_address.port,
            "role": "leader",
            "reachable": True,
            "last_contact": 0.0,
            "term": 0,
            "commit_index": 0,
            "license_sequence": lic.sequence if lic else None,
        }]

    def leases_changed(self) -> None:
        """No leader to report to."""

    def request_seats(self, feature: str, count: int) -> None:
        """The whole count is already here."""

    def retry_after(self, feature: str, lease_id: str | None = None) -> float | None:
        return None

    def lease_adopted(self, lease: Any) -> None:
        """Nothing to record beyond the store."""

    def awaiting_leader(self) -> bool:
        """A pool of one always leads."""
        return False

    def usage(self, feature: str) -> dict[str, dict[str, int]]:
        seats = self.server.seats
        return {self.server.name: {"allocation": seats.allocation(feature), "used": seats.used(feature)}}
