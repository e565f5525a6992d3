"""The consumer groups of one in-process log: each group's members and how the partitions of the
topics they subscribe to are dealt out among them, each group's committed offsets (also on disk
for a log with a directory), and what each group holds back from retention: a group with members
from its committed offsets, a group without members only until `GROUP_HOLD_S` after its last
commit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka.structs import TopicPartition

from ioc_core.bus.memory.segments import UNREADABLE_COMMITS, read_commits, write_commits

if TYPE_CHECKING:
    from ioc_core.bus.memory.clients import MemoryConsumer

log = logging.getLogger(__name__)

# How long a group without members still holds retention back after its last commit: Kafka's
# default `offsets.retention.minutes` (7 days), for which it keeps an empty group's offsets.
GROUP_HOLD_S = 7 * 24 * 3600.0


@dataclass
class _Member:
    consumer: MemoryConsumer
    topics: frozenset[str]


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    # Wall-clock time of the last commit (it outlives the process, so not a monotonic clock).
    committed_at: float = 0.0
    members: list[_Member] = field(default_factory=list)
    # Commits of one group are written one at a time, so the newest file is the newest commit.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class Hold:
    """What holds a partition's retention back: the lowest offset still needed and by which
    group, and the earliest time a group without members stops holding it."""

    offset: int | None
    group: str | None
    expires: float | None


class ConsumerGroups:
    """The groups of one log. It knows the log's partitions only through `partition_count`, and
    calls `wake` once it has dealt a group's partitions again, so that members waiting for
    records take their new share."""

    def __init__(
        self,
        folder: Path | None,
        *,
        partition_count: Callable[[str], int | None],
        wake: Callable[[], None],
    ) -> None:
        self.folder = folder
        self._partition_count = partition_count
        self._wake = wake
        self._groups: dict[str, _Group] = {}

    # -- committed offsets ----------------------------------------------------------------

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self._groups.setdefault(group, _Group()).committed.get(tp)

    async def store(self, group: str, offsets: dict[TopicPartition, int]) -> None:
        """Store the offsets, on disk first when there is a folder: a commit that fails to be
        written is not taken."""
        entry = self._groups.setdefault(group, _Group())
        async with entry.lock:
            committed = {**entry.committed, **offsets}
            committed_at = time.time()
            if self.folder is not None:
                await asyncio.to_thread(write_commits, self.folder, group, committed, committed_at)
            entry.committed.update(offsets)
            entry.committed_at = committed_at

    def forget_topic(self, topic: str) -> None:
        """Drop the commits for a deleted topic: a topic made again under the name starts at
        offset 0, and commits of the old one would skip its records."""
        for name, group in self._groups.items():
            kept = {tp: offset for tp, offset in group.committed.items() if tp.topic != topic}
            if len(kept) != len(group.committed):
                group.committed = kept
                if self.folder is not None:
                    write_commits(self.folder, name, kept, group.committed_at)

    def load(self, end_of: Callable[[TopicPartition], int]) -> None:
        """Read back the commits a previous run left, none past the end of its partition's log
        as read back (`end_of`)."""
        if self.folder is None:
            return
        for path in sorted(self.folder.glob("*.json")):
            self._load(path, end_of)

    def _load(self, path: Path, end_of: Callable[[TopicPartition], int]) -> None:
        try:
            name, offsets, committed_at = read_commits(path)
        except UNREADABLE_COMMITS as exc:
            log.warning("ignoring unreadable committed offsets %s: %s", path, exc)
            return
        clamped = False
        for tp, offset in offsets.items():
            end = end_of(tp)
            if offset > end:
                # The records past the end were cut off as torn or damaged: new records will take
                # their offsets, and the group must read those.
                log.warning(
                    "in-process log bus: group %s had committed %s/%d up to offset %d, past its end"
                    " %d after the log was read back; it resumes at the end",
                    name,
                    tp.topic,
                    tp.partition,
                    offset,
                    end,
                )
                offsets[tp] = end
                clamped = True
        group = self._groups.setdefault(name, _Group())
        group.committed.update(offsets)
        group.committed_at = max(group.committed_at, committed_at)
        if clamped:
            assert self.folder is not None
            write_commits(self.folder, name, group.committed, group.committed_at)

    # -- retention holds ------------------------------------------------------------------

    def hold(self, tp: TopicPartition, start: int) -> Hold:
        """What holds back the retention of the partition whose oldest kept record is `start`."""
        now = time.time()
        offset: int | None = None
        holder: str | None = None
        expires: float | None = None
        for name, group in self._groups.items():
            if group.members:
                if not any(tp.topic in member.topics for member in group.members):
                    continue
                needed = group.committed.get(tp, start)
            else:
                committed = group.committed.get(tp)
                until = group.committed_at + GROUP_HOLD_S
                if committed is None or until <= now:
                    continue
                needed = committed
                expires = until if expires is None else min(expires, until)
            if offset is None or needed < offset:
                offset, holder = needed, name
        return Hold(offset, holder, expires)

    # -- members --------------------------------------------------------------------------

    def join(self, group: str, consumer: MemoryConsumer, topics: Iterable[str]) -> None:
        members = self._groups.setdefault(group, _Group()).members
        members.append(_Member(consumer, frozenset(topics)))
        self._assign(group)

    def leave(self, group: str, consumer: MemoryConsumer) -> bool:
        """Whether the consumer was a member of a group known here."""
        entry = self._groups.get(group)
        if entry is None:
            return False
        entry.members = [m for m in entry.members if m.consumer is not consumer]
        self._assign(group)
        return True

    def rebalance(self, topic: str) -> None:
        """Deal the partitions again in every group subscribed to the topic (it was made)."""
        for name, entry in self._groups.items():
            if any(topic in m.topics for m in entry.members):
                self._assign(name)

    def _assign(self, group: str) -> None:
        """Deal the subscribed partitions out to the members in turn; each member takes its new
        share at its next poll, after its listener has heard of the change."""
        members = self._groups[group].members
        shares: dict[int, set[TopicPartition]] = {id(m.consumer): set() for m in members}
        counts = {t: n for m in members for t in m.topics if (n := self._partition_count(t)) is not None}
        turn = 0
        for topic in sorted(counts):
            for index in range(counts[topic]):
                tp = TopicPartition(topic, index)
                takers = [m for m in members if topic in m.topics]
                if not takers:
                    continue
                shares[id(takers[turn % len(takers)].consumer)].add(tp)
                turn += 1
        for member in members:
            member.consumer.pending_assignment = shares[id(member.consumer)]
        self._wake()
