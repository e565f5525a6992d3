"""Detector state as last computed, per device, kept in the processor's memory within a budget,
with which of it the database does not have yet.

The database holds every device's detector state; reading it back on every batch was a tenth of
the processor's time, so the processor keeps what it computed. But a device's state is 0.4-3.4 KB
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

Writing every device's state in every batch was the largest cost in the database with many
devices. So a held state whose alarms did not change may stay *unwritten* for a while (see
`BatchWriter`): the cache remembers since when, oldest first, for the writer to catch up.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Mapping

# What holding one more entry costs beyond its text: the str object's header, and the dict's slot
# with its share of the table (the key is the device id the readings carry).
_ENTRY_OVERHEAD = sys.getsizeof("") + 64


class StateCache:
    """Per device, the JSON text of its detector state, within `budget_bytes`; and, oldest first,
    the held states not written to the database yet."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._texts: dict[str, str] = {}
        self._bytes = 0
        # Held states the database does not have, by device, with since when (the caller's
        # clock); in that order, since a device stays in place until it is written.
        self._unwritten: dict[str, float] = {}
        # Held states a failed transaction tried to write: the database has either the held one
        # or a newer one, depending on whether the commit was made after all (see `doubt`).
        self._doubted: set[str] = set()
        # Devices whose state was not held when their readings came, since the start.
        self.misses = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def bytes(self) -> int:
        """What the held texts cost, by the same count the budget is kept by."""
        return self._bytes

    @property
    def unwritten(self) -> int:
        """How many held states the database does not have yet."""
        return len(self._unwritten)

    def get(self, device_id: str) -> str | None:
        text = self._texts.get(device_id)
        if text is None:
            self.misses += 1
        else:
            self.hits += 1
        return text

    def doubt(self, device_ids: Iterable[str]) -> None:
        """A transaction that wrote these devices' new states failed, perhaps after committing:
        their held states may be older than the database's. They stay held (they may hold
        learning the database does not have) but are not written from here until one is chosen."""
        for device_id in device_ids:
            if device_id in self._texts:
                self._doubted.add(device_id)
                self._unwritten.pop(device_id, None)

    def doubted(self, device_id: str) -> bool:
        return device_id in self._doubted

    def holds_after(self, texts: Mapping[str, str]) -> set[str]:
        """The devices of `texts` that `update(texts, ...)` would hold, changing nothing: a state
        the cache cannot hold must be written with the batch that made it."""
        return self._admit(texts, apply=False)

    def update(self, texts: Mapping[str, str], *, unwritten: Collection[str] = (), at: float = 0.0) -> None:
        """Hold each device's new text: in place of the one held, or as a new entry while the
        budget allows. The devices in `unwritten` (all held, see `holds_after`) are not in the
        database yet, from `at` on unless they already were not; the others are."""
        self._admit(texts, apply=True)
        pending = self._unwritten
        for device_id in texts:
            self._doubted.discard(device_id)
            if device_id not in unwritten:
                pending.pop(device_id, None)
            elif device_id not in pending and device_id in self._texts:
                # (Only a held state can wait: one the cache let go has to be written now.)
                pending[device_id] = at

    def unwritten_since(self, before: float) -> dict[str, str]:
        """The texts of the held states left unwritten since before `before`."""
        due = {}
        for device_id, since in self._unwritten.items():
            if since > before:
                break
            due[device_id] = self._texts[device_id]
        return due

    def all_unwritten(self) -> dict[str, str]:
        return {device_id: self._texts[device_id] for device_id in self._unwritten}

    def written(self, device_ids: Iterable[str]) -> None:
        """The database now has these devices' held states."""
        for device_id in device_ids:
            self._unwritten.pop(device_id, None)

    def discard(self, device_ids: Iterable[str]) -> int:
        """Let these devices' states go (read from the database next time); returns how many of
        them the database did not have."""
        lost = 0
        for device_id in device_ids:
            text = self._texts.pop(device_id, None)
            if text is not None:
                self._bytes -= len(text) + _ENTRY_OVERHEAD
            self._doubted.discard(device_id)
            if self._unwritten.pop(device_id, None) is not None:
                lost += 1
        return lost

    def clear(self) -> int:
        """Let every state go; returns how many the database did not have."""
        lost = len(self._unwritten)
        self._texts.clear()
        self._unwritten.clear()
        self._doubted.clear()
        self._bytes = 0
        return lost

    def _admit(self, texts: Mapping[str, str], *, apply: bool) -> set[str]:
        held = self._texts
        total = self._bytes
        kept = set()
        for device_id, text in texts.items():
            previous = held.get(device_id)
            if previous is not None:
                total += len(text) - len(previous)
                if total > self._budget:
                    # States grow as they learn (a daily profile's hours fill in): the one that
                    # grew past the budget goes, and is read from the database next time.
                    total -= len(text) + _ENTRY_OVERHEAD
                    if apply:
                        del held[device_id]
                        self._unwritten.pop(device_id, None)
                        self._doubted.discard(device_id)
                    continue
                if apply:
                    held[device_id] = text
                kept.add(device_id)
            elif total + len(text) + _ENTRY_OVERHEAD <= self._budget:
                total += len(text) + _ENTRY_OVERHEAD
                if apply:
                    held[device_id] = text
                kept.add(device_id)
        if apply:
            self._bytes = total
        return kept
