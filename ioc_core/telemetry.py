"""Telemetry as it travels: MQTT topics, device payloads (JSON object or SenML pack), and the
validated `Reading` that the gateway puts on the bus and the processors store.

Everything here is pure; the gateway supplies the receive time and the device registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ioc_core import units
from ioc_core.domains import DOMAINS, Domain
from ioc_core.errors import RejectedMessage

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_FUTURE_SKEW = timedelta(minutes=5)
DEADLETTER_PAYLOAD_LIMIT = 4096
TOPIC_ROOT = "ioc/v1"

CITY_PATTERN = re.compile(r"[a-z0-9-]{1,32}")
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Stable reason codes: dead letters and counters are keyed by them.
REASON_TOO_LARGE = "payload_too_large"
REASON_BAD_TOPIC = "bad_topic"
REASON_MALFORMED = "malformed_payload"
REASON_UNKNOWN_DEVICE = "unknown_device"
REASON_DEVICE_MISMATCH = "device_mismatch"
REASON_UNKNOWN_METRIC = "unknown_metric"
REASON_NOT_FINITE = "not_finite"
REASON_OUT_OF_RANGE = "out_of_range"
# A SenML value in a unit (`u`, `bu`) that is unknown or does not measure what its metric measures.
REASON_UNIT_MISMATCH = "unit_mismatch"
REASON_BAD_TIMESTAMP = "bad_timestamp"
REASON_FUTURE_TIMESTAMP = "future_timestamp"
REASON_NO_METRICS = "no_metrics"
REASON_BAD_STATUS = "bad_status"
# A message that made validation fail in a way it does not foresee: kept, never fatal to the gateway.
REASON_UNPROCESSABLE = "unprocessable"

DEVICE_STATUSES = ("online", "offline")

# SenML (RFC 8428 §4.5.3): times below 2**28 are relative to now.
_SENML_RELATIVE_LIMIT = 2**28
# Epoch numbers above this are milliseconds (1e11 s is the year 5138).
_EPOCH_MS_THRESHOLD = 1e11
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TopicAddress:
    city: str
    domain: str
    device_id: str
    kind: str  # "telemetry" or "status"


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
        return json.dumps(
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
            },
            separators=(",", ":"),
        ).encode()

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
        return json.dumps(
            {
                "kind": "status",
                "device_id": self.device_id,
                "city": self.city,
                "domain": self.domain,
                "status": self.status,
                "received_at": self.received_at.isoformat(),
            },
            separators=(",", ":"),
        ).encode()


BusTelemetry = Reading | StatusReport


def decode_record(raw: bytes) -> BusTelemetry:
    """Decode a telemetry-topic record; raises `RejectedMessage` if it is not one of ours."""
    try:
        body = json.loads(raw)
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
        return Reading(
            device_id=str(body["device_id"]),
            city=str(body["city"]),
            domain=str(body["domain"]),
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
        raise ValueError(f"packet_id {_excerpt(value)} is not an MQTT packet identifier")
    return value


def parse_status(payload: bytes) -> str:
    """The payload of a status topic: `online` or `offline`."""
    text = payload[:16].decode("ascii", errors="replace").strip().lower()
    if len(payload) > 16 or text not in DEVICE_STATUSES:
        raise RejectedMessage(REASON_BAD_STATUS, "status payload must be 'online' or 'offline'")
    return text


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be accepted, kept with why and where it came from."""

    reason: str
    detail: str
    topic: str
    received_at: datetime
    payload: bytes

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "topic": self.topic,
                "received_at": self.received_at.isoformat(),
                "payload_size": len(self.payload),
                "payload": self.payload[:DEADLETTER_PAYLOAD_LIMIT].decode("utf-8", errors="replace"),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter as read back from the bus, ready to be stored once (`source` is unique)."""

    source: str
    reason: str
    detail: str
    topic: str
    received_at: datetime
    payload: str
    payload_size: int

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str) -> StoredDeadLetter:
        try:
            body = json.loads(raw)
            return cls(
                source=source,
                reason=str(body["reason"])[:64],
                detail=str(body.get("detail", ""))[:1000],
                topic=str(body["topic"])[:512],
                received_at=datetime.fromisoformat(body["received_at"]),
                payload=str(body.get("payload", ""))[:DEADLETTER_PAYLOAD_LIMIT],
                payload_size=int(body.get("payload_size", 0)),
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
        """A bus record that the processor itself cannot accept, stored under its bus position."""
        return cls(
            source=source,
            reason=rejection.reason,
            detail=rejection.detail,
            topic=source,
            received_at=utcnow(),
            payload=raw[:DEADLETTER_PAYLOAD_LIMIT].decode("utf-8", errors="replace"),
            payload_size=len(raw),
        )


def parse_topic(topic: str) -> TopicAddress:
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != TOPIC_ROOT or parts[5] not in ("telemetry", "status"):
        raise RejectedMessage(REASON_BAD_TOPIC, f"expected {TOPIC_ROOT}/CITY/DOMAIN/DEVICE/telemetry")
    city, domain, device_id, kind = parts[2], parts[3], parts[4], parts[5]
    if not CITY_PATTERN.fullmatch(city):
        raise RejectedMessage(REASON_BAD_TOPIC, f"city {city!r} is not a slug [a-z0-9-]{{1,32}}")
    if domain not in DOMAINS:
        raise RejectedMessage(REASON_BAD_TOPIC, f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}")
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise RejectedMessage(REASON_BAD_TOPIC, f"device id {device_id!r} is not [A-Za-z0-9_.-]{{1,64}}")
    return TopicAddress(city=city, domain=domain, device_id=device_id, kind=kind)


def parse_timestamp(value: Any, *, now: datetime) -> datetime:
    """RFC 3339 with an offset, or epoch seconds or milliseconds."""
    if isinstance(value, bool):
        raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must be RFC 3339 text or an epoch number")
    if isinstance(value, int | float):
        number = _finite_float(value)
        if number is None:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {_excerpt(value)} is not a finite epoch number")
        seconds = number / 1000 if abs(number) >= _EPOCH_MS_THRESHOLD else number
        try:
            ts = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {_excerpt(value)} is out of range") from exc
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value[:40]!r} is not RFC 3339") from exc
        if ts.tzinfo is None:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must carry a UTC offset (e.g. +07:00 or Z)")
        try:
            ts = ts.astimezone(UTC)
        except OverflowError as exc:  # 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value[:40]!r} is out of range") from exc
    else:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must be RFC 3339 text or an epoch number")
    return check_time(ts, now=now)


def check_time(ts: datetime, *, now: datetime) -> datetime:
    if ts > now + MAX_FUTURE_SKEW:
        raise RejectedMessage(REASON_FUTURE_TIMESTAMP, f"ts {ts.isoformat()} is more than 5 minutes ahead")
    if ts < _EARLIEST:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {ts.isoformat()} is before 2000")
    return ts


def _finite_float(value: int | float) -> float | None:
    """`value` as a finite float, or None: an integer too large for a float (JSON allows any number
    of digits) is as unusable as an infinity, and `float()` would raise OverflowError on it."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _excerpt(value: object, limit: int = 40) -> str:
    """A bounded rendering of a stranger's value for a dead letter's detail (never the whole of a
    64 KiB string or a 4,000-digit number)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<integer of {len(str(abs(value)))} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reject_constant(name: str) -> float:
    raise RejectedMessage(REASON_NOT_FINITE, f"{name} is not a finite number")


def _decode_json(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RejectedMessage(REASON_TOO_LARGE, f"{len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        return json.loads(payload, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise RejectedMessage(REASON_MALFORMED, "JSON nested too deeply") from exc
    except ValueError as exc:
        # JSONDecodeError and UnicodeDecodeError, and also the plain ValueError that Python's
        # integer-digit limit raises for a number of more than 4,300 digits.
        raise RejectedMessage(REASON_MALFORMED, f"not JSON: {str(exc)[:200]}") from exc


def _metric_value(domain: Domain, name: str, value: Any, unit: str = "", base: float = 0.0) -> float:
    """A metric's value in the metric's own unit: `base + value` given in `unit` ("" for the
    metric's unit), converted, then checked against the metric's range."""
    metric = domain.metric(name)
    if metric is None:
        known = ", ".join(m.name for m in domain.metrics)
        raise RejectedMessage(REASON_UNKNOWN_METRIC, f"{name[:64]!r} is not a {domain.name} metric ({known})")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RejectedMessage(REASON_MALFORMED, f"{name} must be a number")
    number = _finite_float(value)
    if number is None:
        raise RejectedMessage(REASON_NOT_FINITE, f"{name} is not a finite number")
    number += base
    if unit:
        conversion = units.conversion(metric, unit)
        if conversion is None:
            accepted = ", ".join(units.accepted_units(metric))
            raise RejectedMessage(
                REASON_UNIT_MISMATCH,
                f"{name} in {_excerpt(unit)} cannot be stored in {metric.unit or 'its unit'}"
                f" (accepted: {accepted})",
            )
        number = conversion.apply(number)
    if not metric.accepts(number):
        raise RejectedMessage(
            REASON_OUT_OF_RANGE,
            f"{name}={number:g} outside {metric.minimum:g}..{metric.maximum:g} {metric.unit}",
        )
    return number


@dataclass(frozen=True, slots=True)
class Measurement:
    ts: datetime
    seq: int | None
    metrics: dict[str, float]
    device_time: bool = True


def parse_payload(payload: bytes, domain: Domain, *, received_at: datetime) -> list[Measurement]:
    """Decode and validate a device payload against its domain; raises `RejectedMessage`."""
    body = _decode_json(payload)
    if isinstance(body, dict):
        return [_parse_object(body, domain, received_at)]
    if isinstance(body, list):
        return _parse_senml(body, domain, received_at)
    raise RejectedMessage(REASON_MALFORMED, "payload must be a JSON object or a SenML array")


def _parse_object(body: dict[str, Any], domain: Domain, received_at: datetime) -> Measurement:
    device_time = "ts" in body
    ts = parse_timestamp(body["ts"], now=received_at) if device_time else received_at
    seq = body.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63):
        raise RejectedMessage(REASON_MALFORMED, "seq must be a non-negative integer")
    metrics = {
        name: _metric_value(domain, name, value) for name, value in body.items() if name not in ("ts", "seq")
    }
    if not metrics:
        raise RejectedMessage(REASON_NO_METRICS, f"no {domain.name} metric in the payload")
    return Measurement(ts=ts, seq=seq, metrics=metrics, device_time=device_time)


def _parse_senml(pack: list[Any], domain: Domain, received_at: datetime) -> list[Measurement]:
    if not pack:
        raise RejectedMessage(REASON_NO_METRICS, "empty SenML pack")
    # By time, and whether that time is the device's own (absolute) or relative to the receipt.
    by_time: dict[tuple[datetime, bool], dict[str, float]] = {}
    base_name, base_time, base_unit, base_value = "", 0.0, "", 0.0
    for record in pack:
        if not isinstance(record, dict):
            raise RejectedMessage(REASON_MALFORMED, "SenML records must be JSON objects")
        # Base fields apply to this record and every later one, until a record sets them again.
        base_name = _senml_text(record, "bn", base_name)
        base_time = _senml_number(record, "bt", base_time)
        base_unit = _senml_text(record, "bu", base_unit)
        base_value = _senml_number(record, "bv", base_value)
        if "v" not in record:
            if "n" in record or any(k in record for k in ("vs", "vb", "vd")):
                raise RejectedMessage(REASON_MALFORMED, "SenML records need a numeric 'v'")
            continue
        full_name = base_name + _senml_text(record, "n", "")
        name = re.split(r"[:/]", full_name)[-1]
        time = base_time + _senml_number(record, "t", 0.0)
        ts, absolute = _senml_time(time, received_at)
        unit = _senml_text(record, "u", base_unit)
        by_time.setdefault((ts, absolute), {})[name] = _metric_value(
            domain, name, record["v"], unit, base_value
        )
    if not by_time:
        raise RejectedMessage(REASON_NO_METRICS, "SenML pack has no values")
    return [
        Measurement(ts=ts, seq=None, metrics=metrics, device_time=absolute)
        for (ts, absolute), metrics in sorted(by_time.items())
    ]


def _senml_text(record: dict[str, Any], key: str, default: str) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise RejectedMessage(REASON_MALFORMED, f"SenML {key!r} must be text")
    return value


def _senml_number(record: dict[str, Any], key: str, default: float) -> float:
    value = record.get(key, default)
    number = None if isinstance(value, bool) or not isinstance(value, int | float) else _finite_float(value)
    if number is None:
        raise RejectedMessage(REASON_MALFORMED, f"SenML {key!r} must be a finite number")
    return number


def _senml_time(value: float, received_at: datetime) -> tuple[datetime, bool]:
    """A record's time, and whether it is absolute (the device's clock) rather than relative to
    the receipt, which a redelivery changes."""
    if abs(value) < _SENML_RELATIVE_LIMIT:
        return check_time(received_at + timedelta(seconds=value), now=received_at), False
    return parse_timestamp(value, now=received_at), True


def utcnow() -> datetime:
    return datetime.now(tz=UTC)
