"""The wire format of device telemetry, from MQTT to the bus.

- `topics`: topic names and their parts;
- `payload`: JSON object and SenML payloads, and status payloads, decoded and validated against
  the device's domain (which says what each metric accepts);
- `timestamps`: device times;
- `records`: the bus records (readings, status reports, dead letters), encoded and decoded;
- `reasons`: the reason codes of rejections;
- `accept`: the one entry point, `accept_message`, from a message to its records or its rejection.

Everything here is pure but `accept_message`'s registry lookup, which the caller supplies along
with the receive time.
"""

from __future__ import annotations

from ioc_core.telemetry.accept import Accepted, DeviceMessage, RouteLookup, accept_message, validate
from ioc_core.telemetry.payload import MAX_PAYLOAD_BYTES, Measurement, parse_payload, parse_status
from ioc_core.telemetry.reasons import (
    REASON_BAD_STATUS,
    REASON_BAD_TIMESTAMP,
    REASON_BAD_TOPIC,
    REASON_DEVICE_MISMATCH,
    REASON_FUTURE_TIMESTAMP,
    REASON_MALFORMED,
    REASON_NO_METRICS,
    REASON_NOT_FINITE,
    REASON_OUT_OF_RANGE,
    REASON_RETAINED,
    REASON_TOO_LARGE,
    REASON_UNIT_MISMATCH,
    REASON_UNKNOWN_DEVICE,
    REASON_UNKNOWN_METRIC,
    REASON_UNPROCESSABLE,
)
from ioc_core.telemetry.records import (
    DEADLETTER_PAYLOAD_LIMIT,
    DEVICE_STATUSES,
    BusTelemetry,
    DeadLetter,
    Reading,
    StatusReport,
    StoredDeadLetter,
    decode_record,
    utcnow,
)
from ioc_core.telemetry.timestamps import MAX_FUTURE_SKEW, check_time, parse_timestamp
from ioc_core.telemetry.topics import (
    CITY_PATTERN,
    DEVICE_ID_PATTERN,
    SYSTEM_CLIENT_PREFIX,
    TOPIC_ROOT,
    TopicAddress,
    parse_topic,
)

__all__ = [
    "CITY_PATTERN",
    "DEADLETTER_PAYLOAD_LIMIT",
    "DEVICE_ID_PATTERN",
    "DEVICE_STATUSES",
    "MAX_FUTURE_SKEW",
    "MAX_PAYLOAD_BYTES",
    "REASON_BAD_STATUS",
    "REASON_BAD_TIMESTAMP",
    "REASON_BAD_TOPIC",
    "REASON_DEVICE_MISMATCH",
    "REASON_FUTURE_TIMESTAMP",
    "REASON_MALFORMED",
    "REASON_NOT_FINITE",
    "REASON_NO_METRICS",
    "REASON_OUT_OF_RANGE",
    "REASON_RETAINED",
    "REASON_TOO_LARGE",
    "REASON_UNIT_MISMATCH",
    "REASON_UNKNOWN_DEVICE",
    "REASON_UNKNOWN_METRIC",
    "REASON_UNPROCESSABLE",
    "SYSTEM_CLIENT_PREFIX",
    "TOPIC_ROOT",
    "Accepted",
    "BusTelemetry",
    "DeadLetter",
    "DeviceMessage",
    "Measurement",
    "Reading",
    "RouteLookup",
    "StatusReport",
    "StoredDeadLetter",
    "TopicAddress",
    "accept_message",
    "check_time",
    "decode_record",
    "parse_payload",
    "parse_status",
    "parse_timestamp",
    "parse_topic",
    "utcnow",
    "validate",
]
