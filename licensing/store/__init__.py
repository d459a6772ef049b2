"""ILicenseStore backends and the one function that picks one from the configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import StoreError
from ..interfaces import ILicenseStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorCore

    from ..config import StoreSpec

__all__ = ["MemoryStore", "SQLiteStore", "open_store"]


def open_store(spec: StoreSpec, reactor: IReactorCore) -> ILicenseStore:
    """Open the store ``spec`` names (``kind`` "memory" or "sqlite", ``path`` for sqlite).

    Raises StoreError if the kind is unknown, the sqlite path is missing, or
    the file cannot be opened; the message says what to change.
    """
    if spec.kind == "memory":
        return MemoryStore()
    if spec.kind == "sqlite":
        if spec.path is None:
            raise StoreError("the sqlite store needs a path: write store = sqlite:/path/to/file")
        return SQLiteStore(spec.path, reactor)
    raise StoreError(f"unknown store kind {spec.kind!r}: use memory or sqlite")
