"""The dead-letter record on the bus, in both formats: the current one keeps the payload byte for
byte (base64) with the delivery flags and the device the topic names; the first one, which may
still be on the bus, kept a UTF-8 excerpt only, and its payload is known exactly only when the
excerpt is the whole payload."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from ioc_core.telemetry import MAX_PAYLOAD_BYTES, REASON_MALFORMED, DeadLetter, StoredDeadLetter
from ioc_core.telemetry.records import DEADLETTER_RAW_LIMIT, device_named_by, exact_payload

AT = datetime(2026, 12, 7, 8, 30, tzinfo=UTC)
TOPIC = "ioc/v1/ha-noi/flood/hn-flood-404/telemetry"


def stored(letter: DeadLetter) -> StoredDeadLetter:
    return StoredDeadLetter.from_bytes(letter.to_bytes(), source="ioc.deadletter/0@1")


def test_the_payload_round_trips_byte_for_byte_with_the_delivery_flags() -> None:
    payload = b'\xff\xfe{"currentLevel": 1}\x00\x80\xc3'
    letter = DeadLetter("unknown_device", "not registered", TOPIC, AT, payload, 1, False, True, 42)
    record = json.loads(letter.to_bytes())
    assert record["format"] == 2 and record["device_id"] == "hn-flood-404"
    # The text excerpt stays, for readers of the first format.
    assert record["payload"] == payload.decode("utf-8", errors="replace")
    back = stored(letter)
    assert back.raw == payload and back.payload_size == len(payload)
    assert back.device_id == "hn-flood-404" and back.topic == TOPIC and back.received_at == AT
    assert back.mqtt == {"qos": 1, "retain": False, "dup": True, "packet_id": 42}
    assert (back.reason, back.detail) == ("unknown_device", "not registered")


def test_a_payload_over_the_limit_keeps_its_first_64_kib_and_its_size() -> None:
    payload = bytes(range(256)) * 300  # 76,800 bytes
    back = stored(DeadLetter("payload_too_large", "too big", TOPIC, AT, payload))
    assert DEADLETTER_RAW_LIMIT == MAX_PAYLOAD_BYTES
    assert back.raw == payload[:MAX_PAYLOAD_BYTES] and back.payload_size == len(payload)
    assert len(back.payload) <= 4096


def first_format(payload: bytes, topic: str = TOPIC) -> bytes:
    """A record as gateways wrote it before payloads were kept whole."""
    return json.dumps(
        {
            "reason": "unknown_device",
            "detail": "d",
            "topic": topic,
            "received_at": AT.isoformat(),
            "payload_size": len(payload),
            "payload": payload[:4096].decode("utf-8", errors="replace"),
        },
        ensure_ascii=False,
    ).encode()


@pytest.mark.parametrize(
    ("payload", "exact"),
    [
        (b'{"currentLevel": 1.5, "ghi_ch\xc3\xba": "m\xc6\xb0a"}', True),  # UTF-8 (Vietnamese): exact
        (b'{"currentLevel": \xff}', False),  # not UTF-8: the text has a replacement character
        (b"\xf0\x9f\x98", False),  # a cut 4-byte character: as long as its replacement, still refused
        (b'{"pad": "' + b"x" * 5000 + b'"}', False),  # longer than the excerpt
    ],
)
def test_a_first_format_record_is_read_and_its_payload_known_when_exact(payload: bytes, exact: bool) -> None:
    back = StoredDeadLetter.from_bytes(first_format(payload), source="s")
    assert back.reason == "unknown_device" and back.device_id == "hn-flood-404" and back.mqtt is None
    assert back.raw == (payload if exact else None)
    assert back.payload_size == len(payload)


def test_exact_payload_refuses_text_that_was_never_decoded_utf_8() -> None:
    assert exact_payload("\ud800", 3) is None
    assert exact_payload("ok", 2) == b"ok"
    assert exact_payload("ok", 3) is None


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        (TOPIC, "hn-flood-404"),
        ("ioc/v1/ha-noi/flood/hn-flood-404/status", "hn-flood-404"),
        # A wrong city or domain still names the device, so its letters can be found.
        ("ioc/v1/HA NOI/rivers/hn-flood-404/telemetry", "hn-flood-404"),
        ("ioc/v1/ha-noi/flood/bad id/telemetry", None),
        ("ioc/v1/ha-noi/flood/hn-flood-404/config", None),
        ("elsewhere/v1/ha-noi/flood/hn-flood-404/telemetry", None),
        ("ioc.telemetry.flood/0@7", None),
    ],
)
def test_the_device_a_topic_names(topic: str, device: str | None) -> None:
    assert device_named_by(topic) == device


def test_a_record_with_a_damaged_payload_or_flags_is_kept_without_them() -> None:
    record = json.loads(DeadLetter("out_of_range", "d", TOPIC, AT, b"{}", 1, False, False, 9).to_bytes())
    record["payload_base64"] = "not base64!"
    record["mqtt"] = {"qos": 7, "retain": "yes"}
    back = StoredDeadLetter.from_bytes(json.dumps(record).encode(), source="s")
    assert back.reason == "out_of_range" and back.raw is None and back.mqtt is None
    record["mqtt"] = {"qos": 1, "retain": False, "dup": False, "packet_id": 70_000}
    assert StoredDeadLetter.from_bytes(json.dumps(record).encode(), source="s").mqtt is None


def test_a_record_that_is_not_a_dead_letter_is_kept_as_its_bytes_without_a_payload_to_replay() -> None:
    back = StoredDeadLetter.from_bytes(b"\x00not json", source="ioc.deadletter/0@5")
    assert back.reason == REASON_MALFORMED and back.raw is None and back.device_id is None
    assert back.topic == "ioc.deadletter/0@5"


def test_the_raw_field_is_plain_base64_of_the_payload() -> None:
    payload = b"\x00\x01\x02"
    record = json.loads(DeadLetter("malformed_payload", "d", TOPIC, AT, payload).to_bytes())
    assert base64.b64decode(record["payload_base64"]) == payload
    assert record["mqtt"] == {"qos": 0, "retain": False, "dup": False, "packet_id": None}


def test_mqtt_5_properties_round_trip_and_what_a_gateway_does_not_write_is_dropped() -> None:
    properties = {
        "content_type": "application/senml+json",
        "user_properties": [["firmware", "2.4.1"]],
        "payload_format_indicator": 1,
    }
    letter = DeadLetter("unknown_device", "d", TOPIC, AT, b"{}", 1, False, False, 9, properties)
    assert stored(letter).mqtt == {
        "qos": 1,
        "retain": False,
        "dup": False,
        "packet_id": 9,
        "properties": properties,
    }
    record = json.loads(letter.to_bytes())
    record["mqtt"]["properties"] = {
        "content_type": 5,
        "user_properties": [["only one"]],
        "payload_format_indicator": 3,
        "message_expiry_interval": 60,
        "invented": "x",
    }
    back = StoredDeadLetter.from_bytes(json.dumps(record).encode(), source="t")
    assert back.mqtt is not None and back.mqtt["properties"] == {"message_expiry_interval": 60}
    assert "properties" not in stored(DeadLetter("unknown_device", "d", TOPIC, AT, b"{}")).mqtt  # type: ignore[operator]
