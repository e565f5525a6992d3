"""Device payloads: a JSON object or a SenML pack (RFC 8428) on a telemetry topic, `online` or
`offline` on a status topic, decoded and validated into measurements. What a metric accepts (its
range, its units) is the domain's to say: see `ioc_core.domains.base.Metric`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ioc_core.domains import Domain
from ioc_core.errors import RejectedMessage
from ioc_core.telemetry.reasons import (
    REASON_BAD_STATUS,
    REASON_MALFORMED,
    REASON_NO_METRICS,
    REASON_NOT_FINITE,
    REASON_OUT_OF_RANGE,
    REASON_TOO_LARGE,
    REASON_UNIT_MISMATCH,
    REASON_UNKNOWN_METRIC,
)
from ioc_core.telemetry.records import DEVICE_STATUSES
from ioc_core.telemetry.timestamps import check_time, parse_timestamp
from ioc_core.telemetry.values import excerpt, finite_float

MAX_PAYLOAD_BYTES = 64 * 1024
# SenML (RFC 8428 §4.5.3): times below 2**28 are relative to now.
_SENML_RELATIVE_LIMIT = 2**28


def parse_status(payload: bytes) -> str:
    """The payload of a status topic: `online` or `offline`."""
    text = payload[:16].decode("ascii", errors="replace").strip().lower()
    if len(payload) > 16 or text not in DEVICE_STATUSES:
        raise RejectedMessage(REASON_BAD_STATUS, "status payload must be 'online' or 'offline'")
    return text


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
    metric's unit), converted, then checked against the metric's range. The domain says which
    metrics, units and ranges there are; this only words its answers as rejections."""
    metric = domain.metric(name)
    if metric is None:
        known = ", ".join(m.name for m in domain.metrics)
        raise RejectedMessage(REASON_UNKNOWN_METRIC, f"{name[:64]!r} is not a {domain.name} metric ({known})")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RejectedMessage(REASON_MALFORMED, f"{name} must be a number")
    number = finite_float(value)
    if number is None:
        raise RejectedMessage(REASON_NOT_FINITE, f"{name} is not a finite number")
    number += base
    if unit:
        converted = metric.in_own_unit(number, unit)
        if converted is None:
            accepted = ", ".join(metric.accepted_units())
            raise RejectedMessage(
                REASON_UNIT_MISMATCH,
                f"{name} in {excerpt(unit)} cannot be stored in {metric.unit or 'its unit'}"
                f" (accepted: {accepted})",
            )
        number = converted
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
    number = None if isinstance(value, bool) or not isinstance(value, int | float) else finite_float(value)
    if number is None:
        raise RejectedMessage(REASON_MALFORMED, f"SenML {key!r} must be a finite number")
    return number


def _senml_time(value: float, received_at: datetime) -> tuple[datetime, bool]:
    """A record's time, and whether it is absolute (the device's clock) rather than relative to
    the receipt, which a redelivery changes."""
    if abs(value) < _SENML_RELATIVE_LIMIT:
        return check_time(received_at + timedelta(seconds=value), now=received_at), False
    return parse_timestamp(value, now=received_at), True
