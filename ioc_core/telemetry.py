"""Telemetry as it travels: MQTT topics, device payloads (JSON object or SenML pack), and the
validated `Reading` that the gateway puts on the bus and the processors store.

Everything here is pure; the gateway supplies the receive time and the device registry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

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
REASON_BAD_TIMESTAMP = "bad_timestamp"
REASON_FUTURE_TIMESTAMP = "future_timestamp"
REASON_NO_METRICS = "no_metrics"
REASON_BAD_STATUS = "bad_status"

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

    `device_time` says whether `ts` came from the device; when it did not (no `ts` in the
    payload) `ts` is the receive time, which differs on every redelivery, so such readings are
    de-duplicated by `seq` instead.
    """

    device_id: str
    city: str
    domain: str
    ts: datetime
    seq: int | None
    metrics: dict[str, float]
    received_at: datetime
    device_time: bool = True

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
            },
            separators=(",", ":"),
        ).encode()


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
            metrics={str(k): float(v) for k, v in body["metrics"].items()},
            received_at=datetime.fromisoformat(body["received_at"]),
            device_time=bool(body.get("device_time", True)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RejectedMessage(REASON_MALFORMED, f"not a telemetry record: {exc}") from exc


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
        except (ValueError, KeyError, TypeError, AttributeError):
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
        if not math.isfinite(value):
            raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts is not finite")
        seconds = value / 1000 if abs(value) >= _EPOCH_MS_THRESHOLD else value
        try:
            ts = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value!r} is out of range") from exc
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value[:40]!r} is not RFC 3339") from exc
        if ts.tzinfo is None:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must carry a UTC offset (e.g. +07:00 or Z)")
        ts = ts.astimezone(UTC)
    else:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must be RFC 3339 text or an epoch number")
    return check_time(ts, now=now)


def check_time(ts: datetime, *, now: datetime) -> datetime:
    if ts > now + MAX_FUTURE_SKEW:
        raise RejectedMessage(REASON_FUTURE_TIMESTAMP, f"ts {ts.isoformat()} is more than 5 minutes ahead")
    if ts < _EARLIEST:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {ts.isoformat()} is before 2000")
    return ts


def _reject_constant(name: str) -> float:
    raise RejectedMessage(REASON_NOT_FINITE, f"{name} is not a finite number")


def _decode_json(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RejectedMessage(REASON_TOO_LARGE, f"{len(payload)} bytes, limit {MAX_PAYLOAD_BYTES}")
    try:
        return json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectedMessage(REASON_MALFORMED, f"not JSON: {exc}") from exc
    except RecursionError as exc:
        raise RejectedMessage(REASON_MALFORMED, "JSON nested too deeply") from exc


def _metric_value(domain: Domain, name: str, value: Any) -> float:
    metric = domain.metric(name)
    if metric is None:
        known = ", ".join(m.name for m in domain.metrics)
        raise RejectedMessage(REASON_UNKNOWN_METRIC, f"{name[:64]!r} is not a {domain.name} metric ({known})")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RejectedMessage(REASON_MALFORMED, f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise RejectedMessage(REASON_NOT_FINITE, f"{name} is not finite")
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
    by_time: dict[datetime, dict[str, float]] = {}
    base_name, base_time = "", 0.0
    for record in pack:
        if not isinstance(record, dict):
            raise RejectedMessage(REASON_MALFORMED, "SenML records must be JSON objects")
        base_name = _senml_text(record, "bn", base_name)
        base_time = _senml_number(record, "bt", base_time)
        if "v" not in record:
            if "n" in record or any(k in record for k in ("vs", "vb", "vd")):
                raise RejectedMessage(REASON_MALFORMED, "SenML records need a numeric 'v'")
            continue
        full_name = base_name + _senml_text(record, "n", "")
        name = re.split(r"[:/]", full_name)[-1]
        time = base_time + _senml_number(record, "t", 0.0)
        ts = _senml_time(time, received_at)
        by_time.setdefault(ts, {})[name] = _metric_value(domain, name, record["v"])
    if not by_time:
        raise RejectedMessage(REASON_NO_METRICS, "SenML pack has no values")
    return [
        Measurement(ts=ts, seq=None, metrics=metrics, device_time=ts != received_at)
        for ts, metrics in sorted(by_time.items())
    ]


def _senml_text(record: dict[str, Any], key: str, default: str) -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise RejectedMessage(REASON_MALFORMED, f"SenML {key!r} must be text")
    return value


def _senml_number(record: dict[str, Any], key: str, default: float) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RejectedMessage(REASON_MALFORMED, f"SenML {key!r} must be a finite number")
    return float(value)


def _senml_time(value: float, received_at: datetime) -> datetime:
    if value == 0:
        return received_at
    if abs(value) < _SENML_RELATIVE_LIMIT:
        return check_time(received_at + timedelta(seconds=value), now=received_at)
    return parse_timestamp(value, now=received_at)


def utcnow() -> datetime:
    return datetime.now(tz=UTC)
