"""Event ids of the live stream: the hub's position (the next offset of every partition of the
events topic) as a short, canonical, URL-safe string, and back."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence

Position = tuple[int, ...]

_ID_VERSION = 1
_ID_MAX_CHARS = 4096
_ID_ALPHABET = re.compile(r"^[A-Za-z0-9_-]+$")
_OFFSET_MAX = 2**63 - 1


def _topic_tag(topic: str) -> bytes:
    """Two bytes naming the topic, so that an id of another deployment (or of a test run with
    another topic prefix) is recognised as foreign rather than read as offsets of this one."""
    return hashlib.blake2b(topic.encode(), digest_size=2).digest()


def encode_position(offsets: Sequence[int], *, topic: str) -> str:
    """The SSE id for a position: the next offset of every partition of `topic`.

    Version byte, topic tag, partition count and offsets as unsigned LEB128 varints, in URL-safe
    base64 without padding: 30 characters for 6 partitions with offsets below two million.
    """
    body = bytearray((_ID_VERSION,))
    body += _topic_tag(topic)
    _put_varint(body, len(offsets))
    for offset in offsets:
        if not 0 <= offset <= _OFFSET_MAX:
            raise ValueError(f"offset {offset} is out of range")
        _put_varint(body, offset)
    return base64.urlsafe_b64encode(bytes(body)).rstrip(b"=").decode("ascii")


def decode_position(text: str | None, *, topic: str) -> Position | None:
    """The position an id stands for, or None when it is not an id of this topic's stream
    (missing, garbled, another version, another topic)."""
    if not text or len(text) > _ID_MAX_CHARS or not _ID_ALPHABET.match(text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None
    if len(raw) < 4 or raw[0] != _ID_VERSION or raw[1:3] != _topic_tag(topic):
        return None
    values: list[int] = []
    index = 3
    while index < len(raw):
        value, index = _get_varint(raw, index)
        if value is None:
            return None
        values.append(value)
    if not values or values[0] != len(values) - 1 or values[0] == 0:
        return None
    offsets = tuple(values[1:])
    # Only the canonical spelling counts, so that one position has exactly one id.
    return offsets if encode_position(offsets, topic=topic) == text else None


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(raw: bytes, index: int) -> tuple[int | None, int]:
    value = shift = 0
    while index < len(raw) and shift < 64:
        byte = raw[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, index) if value <= _OFFSET_MAX else (None, index)
        shift += 7
    return None, index
