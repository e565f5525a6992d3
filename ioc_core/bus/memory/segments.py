"""The in-process log bus's on-disk format: a partition's segment files (a header with the
format version, then CRC32-checked, length-prefixed records), reading them back up to the first
torn or damaged record, converting segments of the first format, and each group's committed
offsets as a small JSON file replaced atomically; with the fsync helpers that make all of it
durable."""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from aiokafka.structs import ConsumerRecord, TopicPartition

from ioc_core.errors import IocError

log = logging.getLogger(__name__)

# Segment format. Version 1 (the first release of this bus, no header) stored each record as
# `FIELDS` + key + value. Version 2 starts each segment with `SEGMENT_HEADER` (magic and version
# byte) and stores each record as a big-endian CRC32 (zlib's, of everything after it) + `FIELDS`
# + key + value, so a damaged record is told apart from a good one. Version 1 only ever existed
# in development data directories, but those can hold records the processor has not stored yet,
# so a version 1 segment is converted in place on start rather than refused. A version 1
# segment cannot be mistaken for a version 2 one: it starts with its first record's offset,
# whose first byte would be 0x49 ("I") only for offsets beyond 5e18.
SEGMENT_MAGIC = b"IOCBUS\x00"
FORMAT_VERSION = 2
SEGMENT_HEADER = SEGMENT_MAGIC + bytes([FORMAT_VERSION])
# offset, timestamp (ms), key length, value length (-1: none)
FIELDS = struct.Struct(">qqii")
CHECKSUM = struct.Struct(">I")


def fsync_all(descriptors: list[int], directories: Iterable[Path], *, close: bool = False) -> None:
    try:
        for descriptor in descriptors:
            os.fsync(descriptor)
    finally:
        if close:
            for descriptor in descriptors:
                os.close(descriptor)
    for directory in directories:
        fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """Make the names in a directory (a new, renamed or deleted file) durable."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(path: Path, content: bytes) -> None:
    """Write a file anew so that a crash leaves the old content or the new, never a mix: a
    temporary file fsynced, renamed over it, and the directory fsynced."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    fsync_directory(path.parent)


def write_commits(
    folder: Path, group: str, committed: dict[TopicPartition, int], committed_at: float
) -> None:
    """Replace the group's commits file (named by a hash of the group's name) with these."""
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {
            "group": group,
            "committed_at": committed_at,
            "offsets": [
                {"topic": tp.topic, "partition": tp.partition, "offset": offset}
                for tp, offset in sorted(committed.items())
            ],
        }
    )
    _replace(folder / f"{zlib.crc32(group.encode()):08x}.json", body.encode())


# What reading a commits file that is damaged or not one raises.
UNREADABLE_COMMITS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def read_commits(path: Path) -> tuple[str, dict[TopicPartition, int], float]:
    """A group's commits file: the group's name, its committed offsets and the time of its last
    commit (the file's own for a file written before that was stored). Raises one of
    `UNREADABLE_COMMITS` for a file that cannot be read as one."""
    stored = json.loads(path.read_text())
    name = stored["group"]
    offsets = {
        TopicPartition(entry["topic"], entry["partition"]): int(entry["offset"])
        for entry in stored["offsets"]
    }
    committed_at = float(stored.get("committed_at", path.stat().st_mtime))
    return name, offsets, committed_at


def encode(record: ConsumerRecord[bytes, bytes]) -> bytes:
    key, value = record.key, record.value
    rest = (
        FIELDS.pack(
            record.offset,
            record.timestamp,
            len(key) if key is not None else -1,
            len(value) if value is not None else -1,
        )
        + (key or b"")
        + (value or b"")
    )
    return CHECKSUM.pack(zlib.crc32(rest)) + rest


def _segments(directory: Path) -> list[Path]:
    """A partition's segment files, oldest first (each is named by its first record's offset)."""
    return sorted((p for p in directory.glob("*.log") if p.stem.isdigit()), key=lambda p: int(p.stem))


def _version_of(path: Path, data: bytes) -> int | None:
    """The segment's format version; None for a segment whose header was torn while it was made
    (it holds no record)."""
    if len(data) >= len(SEGMENT_HEADER) and data.startswith(SEGMENT_MAGIC):
        version = data[len(SEGMENT_MAGIC)]
        if version != FORMAT_VERSION:
            raise IocError(
                f"{path} is an in-process log bus segment of format {version}, which this version"
                f" cannot read (it reads {FORMAT_VERSION}); run the version that wrote it, or move"
                f" {path.parent.parent.parent.parent} aside to start with an empty bus"
            )
        return version
    if SEGMENT_HEADER.startswith(data):
        return None
    return 1


def _scan(
    data: bytes, version: int, topic: str, partition: int, expected: int
) -> tuple[list[ConsumerRecord[bytes, bytes]], int, str | None]:
    """The whole, intact records of one segment from offset `expected` on; the byte position
    where they end, and what is wrong with the record there if the data goes on."""
    view = memoryview(data)
    checked = version == FORMAT_VERSION
    position = len(SEGMENT_HEADER) if checked else 0
    prefix = CHECKSUM.size if checked else 0
    records: list[ConsumerRecord[bytes, bytes]] = []
    while position < len(data):
        fields = position + prefix
        if fields + FIELDS.size > len(data):
            return records, position, "is incomplete (torn)"
        offset, timestamp, key_size, value_size = FIELDS.unpack_from(data, fields)
        if key_size < -1 or value_size < -1:
            return records, position, "has a damaged header"
        body = fields + FIELDS.size
        finish = body + max(key_size, 0) + max(value_size, 0)
        if finish > len(data):
            return records, position, "is incomplete (torn)"
        if checked and zlib.crc32(view[fields:finish]) != CHECKSUM.unpack_from(data, position)[0]:
            return records, position, "fails its checksum"
        if offset != expected:
            return records, position, f"has offset {offset} where {expected} was due"
        records.append(
            ConsumerRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=timestamp,
                timestamp_type=0,
                key=data[body : body + key_size] if key_size >= 0 else None,
                value=data[body + max(key_size, 0) : finish] if value_size >= 0 else None,
                checksum=None,
                serialized_key_size=key_size,
                serialized_value_size=value_size,
                headers=(),
            )
        )
        expected += 1
        position = finish
    return records, position, None


def read_segments(directory: Path, topic: str, partition: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a partition's segments up to the first one that is torn (a crash while
    writing it, before its send was acknowledged) or damaged (its checksum does not match): the
    readable log ends there, and the rest is cut off, as Kafka recovers a log. Segments of the
    first format are converted to the current one."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    segments = _segments(directory)
    converted = 0
    for number, path in enumerate(segments):
        data = path.read_bytes()
        version = _version_of(path, data)
        if version is None:
            _replace(path, SEGMENT_HEADER)
            continue
        expected = records[-1].offset + 1 if records else int(path.stem)
        found, end, problem = _scan(data, version, topic, partition, expected)
        records.extend(found)
        if version != FORMAT_VERSION:
            _replace(path, SEGMENT_HEADER + b"".join(encode(record) for record in found))
            converted += 1
        elif problem is not None:
            with path.open("r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
        if problem is None:
            continue
        later = segments[number + 1 :]
        log.warning(
            "in-process log bus: the record at byte %d of %s %s; the log of %s/%d ends at offset %d"
            " (%d bytes there and %d later segments cut off)",
            end,
            path,
            problem,
            topic,
            partition,
            expected + len(found),
            len(data) - end,
            len(later),
        )
        for dropped in later:
            dropped.unlink()
        fsync_directory(directory)
        break
    if converted:
        log.info(
            "in-process log bus: converted %d segments of %s/%d to format %d",
            converted,
            topic,
            partition,
            FORMAT_VERSION,
        )
    remaining = _segments(directory)
    if remaining:
        # A process killed before its last fsync may have left records only in the page cache;
        # from here on they count as durable.
        fsync_file(remaining[-1])
    return records


def next_offset_of_empty(directory: Path) -> int:
    """An empty partition starts where its newest (empty) segment's name says."""
    names = _segments(directory)
    return int(names[-1].stem) if names else 0


def drop_segments_before(directory: Path, start: int) -> None:
    """Delete segments whose records all lie before `start` (the newest is never deleted)."""
    segments = _segments(directory)
    for current, following in itertools.pairwise(segments):
        if int(following.stem) <= start:
            current.unlink()
