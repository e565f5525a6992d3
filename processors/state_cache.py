"""Detector state as last committed, per device, kept in the processor's memory within a budget.

The database holds every device's detector state; reading it back on every batch was a tenth of
the processor's time, so the processor keeps what it committed. But a device's state is 0.4-3.4 KB
of JSON (a traffic counter's three daily profiles are most of it), so a processor owning 100,000
devices would hold 200-300 MB of it, and a city's size would decide how much memory a processor
needs. The budget (`IOC_PROCESSOR_STATE_CACHE_MB`) caps that: past it, devices not yet held are
read from the database when their readings come.

Why admission stops at the budget instead of evicting the least recently used: devices report at
a steady cadence, so a processor sees its devices in the same cycle again and again. With more
devices than fit, least-recently-used evicts each device just before its next reading and hits
nothing; keeping the devices that came first hits in proportion to the budget. The cache is
emptied when the partition assignment changes (another processor may have moved a device on),
and refilled from whatever comes next.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

# What holding one more entry costs beyond its text: the str object's header, and the dict's slot
# with its share of the table (the key is the device id the readings carry).
_ENTRY_OVERHEAD = sys.getsizeof("") + 64


class StateCache:
    """Per device, the JSON text of its detector state as last committed, within `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._texts: dict[str, str] = {}
        self._bytes = 0
        # Devices whose state was not held when their readings came, since the start.
        self.misses = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def bytes(self) -> int:
        """What the held texts cost, by the same count the budget is kept by."""
        return self._bytes

    def get(self, device_id: str) -> str | None:
        text = self._texts.get(device_id)
        if text is None:
            self.misses += 1
        else:
            self.hits += 1
        return text

    def update(self, texts: Mapping[str, str]) -> None:
        """Hold each device's newly committed text: in place of the one held, or as a new entry
        while the budget allows."""
        held = self._texts
        for device_id, text in texts.items():
            previous = held.get(device_id)
            if previous is not None:
                self._bytes += len(text) - len(previous)
                held[device_id] = text
                if self._bytes > self._budget:
                    # States grow as they learn (a daily profile's hours fill in): the one that
                    # grew past the budget goes, and is read from the database next time.
                    del held[device_id]
                    self._bytes -= len(text) + _ENTRY_OVERHEAD
            elif self._bytes + len(text) + _ENTRY_OVERHEAD <= self._budget:
                self._bytes += len(text) + _ENTRY_OVERHEAD
                held[device_id] = text

    def discard(self, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            text = self._texts.pop(device_id, None)
            if text is not None:
                self._bytes -= len(text) + _ENTRY_OVERHEAD

    def clear(self) -> None:
        self._texts.clear()
        self._bytes = 0
