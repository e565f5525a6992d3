"""Telemetry as it travels on the bus: the validated `Reading` and `StatusReport` that the
gateway produces and the processors store, the `DeadLetter` of a rejected message, and their
encoding and decoding."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ioc_core.errors import RejectedMessage
from ioc_core.telemetry.reasons import REASON_MALFORMED
from ioc_core.telemetry.topics import DEVICE_ID_PATTERN, TOPIC_ROOT
from ioc_core.telemetry.values import excerpt

DEADLETTER_PAYLOAD_LIMIT = 4096

DEVICE_STATUSES = ("online", "offline")


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated measurement set of one device at one instant.

    `device_time` says whether `ts` came from the device. When it did not (no `ts` in the payload,
    or a SenML time relative to the receipt), `ts` is the receive time (plus the relative offset),
    which differs on every redelivery, so such readings are de-duplicated by what they carry
    instead (see `content_digest` and `BatchTransaction.write`): by `seq` and content, or, without
    a `seq`, by the MQTT delivery (`redelivered`, the DUP flag, and `packet_id`) and content.
    """

    device_id: str
    city: str
    domain: str
    ts: datetime
    seq: int | None
    metrics: dict[str, float]
    received_at: datetime
    device_time: bool = True
    # The broker's word that it may have delivered this message before (MQTT DUP flag), and the
    # packet identifier it delivered it under (None at QoS 0, which is never redelivered).
    redelivered: bool = False
    packet_id: int | None = None

    def to_bytes(self) -> bytes:
        return _encode(
            {
                "kind": "reading",
                "device_id": self.device_id,
                "city": self.city,
                "domain": self.domain,
                "ts": self.ts.isoformat(),
                "device_time": self.device_time,
                "seq": self.seq,
                "metrics": self.metrics,
                "received_at": self.received_at.isoformat(),
                "redelivered": self.redelivered,
                "packet_id": self.packet_id,
            }
        )

    def content_digest(self) -> int:
        """A 63-bit digest of what the reading says: its metrics and, when its time is the receive
        time, its offset from that time (two records of one SenML pack, a minute apart, may carry
        the same values). Copies of one message have the same digest; a device that restarts its
        `seq` sends different values under an old `seq` and so a different digest. Never 0: the
        de-duplication tables keep 0 for entries remembered before digests were."""
        offset_us = (self.ts - self.received_at) // timedelta(microseconds=1)
        canonical = json.dumps([offset_us, sorted(self.metrics.items())], separators=(",", ":"))
        digest = int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big") >> 1
        return digest or 1


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A device's own word on its status: `online` when it connects, `offline` as its last will."""

    device_id: str
    city: str
    domain: str
    status: str
    received_at: datetime

    def to_bytes(self) -> bytes:
        return _encode(
            {
                "kind": "status",
                "device_id": self.device_id,
                "city": self.city,
                "domain": self.domain,
                "status": self.status,
                "received_at": self.received_at.isoformat(),
            }
        )


BusTelemetry = Reading | StatusReport


# The bus format is JSON, written and read by orjson: the standard library's codec was a tenth of
# the processor's time and a twentieth of the gateway's. The standard library stays the fallback
# for what orjson refuses and JSON allows (integers beyond 64 bits, lone surrogates in a string
# that validation passed on), so the bytes on the bus mean what they meant before.
#
# orjson's output keeps the 4 KiB buffer it was written into, twenty times a reading's length; the
# gateway holds each record until Kafka has acknowledged it (10,000 of them when its queue is
# full: 40 MB). Formatting it into a new bytes object (`b"%b" %`, the cheapest copy, 0.04 µs) keeps
# only its length.
def _encode(body: dict[str, Any]) -> bytes:
    try:
        return b"%b" % orjson.dumps(body)
    except TypeError:
        return json.dumps(body, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def decode_record(raw: bytes) -> BusTelemetry:
    """Decode a telemetry-topic record; raises `RejectedMessage` if it is not one of ours."""
    try:
        body = _decode(raw)
        kind = body.get("kind", "reading")
        if kind == "status":
            status = str(body["status"])
            if status not in DEVICE_STATUSES:
                raise ValueError(f"status {status!r}")
            return StatusReport(
                device_id=str(body["device_id"]),
                city=str(body["city"]),
                domain=str(body["domain"]),
                status=status,
                received_at=datetime.fromisoformat(body["received_at"]),
            )
        if kind != "reading":
            raise ValueError(f"unknown record kind {kind!r}")
        # Interned: a processor keeps a device's id as the key of its caches (profile, detector
        # state, latest reading) and its city and domain in each, from whichever reading came
        # first; one string each instead of one per reading kept is 20 MB at 100,000 devices.
        return Reading(
            device_id=sys.intern(str(body["device_id"])),
            city=sys.intern(str(body["city"])),
            domain=sys.intern(str(body["domain"])),
            ts=datetime.fromisoformat(body["ts"]),
            seq=None if body.get("seq") is None else int(body["seq"]),
            metrics={str(k): float(v) for k, v in body["metrics"].items()},  # OverflowError: caught
            received_at=datetime.fromisoformat(body["received_at"]),
            device_time=bool(body.get("device_time", True)),
            redelivered=bool(body.get("redelivered", False)),
            packet_id=_packet_id(body.get("packet_id")),
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise RejectedMessage(REASON_MALFORMED, f"not a telemetry record: {str(exc)[:200]}") from exc


def _packet_id(value: Any) -> int | None:
    """An MQTT packet identifier (1 to 65535) from a bus record; a record that carries anything
    else is not one of ours, and storing it would fail every batch it is in."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**16:
        raise ValueError(f"packet_id {excerpt(value)} is not an MQTT packet identifier")
    return value


# A dead letter keeps its payload twice: as the first 4 KiB decoded as UTF-8 text, for people
# and for readers of the first record format, and byte for byte (base64 on the bus, `bytea` in the
# database) up to the gateway's payload limit (`payload.MAX_PAYLOAD_BYTES`, which imports this
# module), so that a letter can be replayed exactly as the device sent it.
DEADLETTER_RAW_LIMIT = 64 * 1024

# The format of the dead-letter records the gateway writes now. The first format (no `format`
# field) had only the text excerpt; both are read.
DEADLETTER_FORMAT = 2


def device_named_by(topic: str) -> str | None:
    """The device id a device topic names, even when another part of it is wrong (an unknown
    domain, a bad city), so that a letter from a device nobody registered yet names it; None when
    the topic is not a device topic at all."""
    parts = topic.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or parts[5] not in ("telemetry", "status"):
        return None
    return parts[4] if DEVICE_ID_PATTERN.fullmatch(parts[4]) else None


def exact_payload(text: str, size: int) -> bytes | None:
    """The payload bytes behind a first-format letter's text, when the text holds them exactly:
    the whole payload (no cut) decoded without a replacement character. A payload that was not
    UTF-8, or was longer than the excerpt, cannot be told from its text: None."""
    if "\ufffd" in text:
        return None
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: the text was never decoded UTF-8
        return None
    return raw if len(raw) == size else None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be accepted, kept with why and where it came from, and how the
    broker delivered it (QoS, retain and DUP flags, packet id), so that a replay validates it as
    the gateway did, and the MQTT 5 properties its publisher set (decoded by the gateway: content
    type, user properties and the like), which tell its sender what it meant to send."""

    reason: str
    detail: str
    topic: str
    received_at: datetime
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        mqtt: dict[str, Any] = {
            "qos": self.qos,
            "retain": self.retain,
            "dup": self.dup,
            "packet_id": self.packet_id,
        }
        if self.properties:
            mqtt["properties"] = self.properties
        return json.dumps(
            {
                "format": DEADLETTER_FORMAT,
                "reason": self.reason,
                "detail": self.detail,
                "topic": self.topic,
                "device_id": device_named_by(self.topic),
                "received_at": self.received_at.isoformat(),
                "payload_size": len(self.payload),
                "payload": self.payload[:DEADLETTER_PAYLOAD_LIMIT].decode("utf-8", errors="replace"),
                "payload_base64": base64.b64encode(self.payload[:DEADLETTER_RAW_LIMIT]).decode("ascii"),
                "mqtt": mqtt,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter as read back from the bus, ready to be stored once (`source` is unique).

    `raw` is the payload byte for byte (at most `DEADLETTER_RAW_LIMIT`), None when it is not known
    exactly (a first-format letter whose text is not the whole payload, a bus record the processor
    itself rejected); `mqtt` the delivery flags (None: not known)."""

    source: str
    reason: str
    detail: str
    topic: str
    received_at: datetime
    payload: str
    payload_size: int
    raw: bytes | None = None
    device_id: str | None = None
    mqtt: dict[str, Any] | None = None

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> StoredDeadLetter:
        try:
            body = json.loads(raw)
            topic = str(body["topic"])[:512]
            text = str(body.get("payload", ""))[:DEADLETTER_PAYLOAD_LIMIT]
            size = int(body.get("payload_size", 0))
            exact = _raw_payload(body.get("payload_base64"))
            return cls(
                source=source,
                reason=str(body["reason"])[:64],
                detail=str(body.get("detail", ""))[:1000],
                topic=topic,
                received_at=datetime.fromisoformat(body["received_at"]),
                payload=text,
                payload_size=size,
                raw=exact if "payload_base64" in body else exact_payload(text, size),
                device_id=device_named_by(topic),
                mqtt=_mqtt_flags(body.get("mqtt")),
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            # Not written by a gateway; keep it anyway, as the bytes it is.
            return cls.of_rejection(
                RejectedMessage(REASON_MALFORMED, "record on the dead-letter topic is not a dead letter"),
                raw,
                source=source,
            )

    @classmethod
    def of_rejection(cls, rejection: RejectedMessage, raw: bytes, *, source: str) -> StoredDeadLetter:
        """A bus record that the processor itself cannot accept, stored under its bus position. It
        was never a device's message, so it has no raw payload to replay."""
        return cls(
            source=source,
            reason=rejection.reason,
            detail=rejection.detail,
            topic=source,
            received_at=utcnow(),
            payload=raw[:DEADLETTER_PAYLOAD_LIMIT].decode("utf-8", errors="replace"),
            payload_size=len(raw),
        )


def _raw_payload(value: Any) -> bytes | None:
    """The payload of a record's `payload_base64`; None when that is not base64 (a record written
    by someone else than a gateway: kept, but not replayable)."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)[:DEADLETTER_RAW_LIMIT]
    except binascii.Error:
        return None


def _mqtt_flags(value: Any) -> dict[str, Any] | None:
    """A record's delivery flags, checked: anything else than what a gateway writes is None."""
    if not isinstance(value, dict):
        return None
    qos, retain, dup, packet_id = (value.get(k) for k in ("qos", "retain", "dup", "packet_id"))
    if (
        isinstance(qos, bool)
        or qos not in (0, 1, 2)
        or not isinstance(retain, bool)
        or not isinstance(dup, bool)
    ):
        return None
    try:
        packet_id = _packet_id(packet_id)
    except ValueError:
        return None
    flags: dict[str, Any] = {"qos": qos, "retain": retain, "dup": dup, "packet_id": packet_id}
    properties = _mqtt_properties(value.get("properties"))
    if properties:
        flags["properties"] = properties
    return flags


# A dead letter's MQTT 5 properties: key -> what its value must be.
_PROPERTY_CHECKS: dict[str, Callable[[Any], bool]] = {
    "payload_format_indicator": lambda v: type(v) is int and v in (0, 1),
    "message_expiry_interval": lambda v: type(v) is int and 0 <= v < 2**32,
    "content_type": lambda v: isinstance(v, str),
    "response_topic": lambda v: isinstance(v, str),
    "correlation_data_base64": lambda v: isinstance(v, str),
    "user_properties": lambda v: (
        isinstance(v, list)
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in v)
    ),
    "undecoded_base64": lambda v: isinstance(v, str),
}


def _mqtt_properties(value: Any) -> dict[str, Any] | None:
    """A record's MQTT 5 properties, each checked; what a gateway does not write is left out."""
    if not isinstance(value, dict):
        return None
    checked = {key: v for key, v in value.items() if key in _PROPERTY_CHECKS and _PROPERTY_CHECKS[key](v)}
    return checked or None


def utcnow() -> datetime:
    return datetime.now(tz=UTC)
