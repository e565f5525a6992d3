"""Parsing and validation of device payloads and topics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ioc_core.domains import DOMAINS
from ioc_core.errors import RejectedMessage
from ioc_core.telemetry import (
    MAX_PAYLOAD_BYTES,
    Reading,
    StatusReport,
    decode_record,
    parse_payload,
    parse_status,
    parse_timestamp,
    parse_topic,
)

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
FLOOD = DOMAINS["flood"]


def reason_of(payload: bytes | str, domain: str = "flood") -> str:
    raw = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(RejectedMessage) as caught:
        parse_payload(raw, DOMAINS[domain], received_at=NOW)
    return caught.value.reason


def test_topic_is_parsed() -> None:
    address = parse_topic("ioc/v1/ha-noi/flood/hn-fl.01_a/telemetry")
    assert (address.city, address.domain, address.device_id, address.kind) == (
        "ha-noi",
        "flood",
        "hn-fl.01_a",
        "telemetry",
    )


@pytest.mark.parametrize(
    "topic",
    [
        "ioc/v1/ha-noi/flood/x",
        "ioc/v2/ha-noi/flood/x/telemetry",
        "ioc/v1/Ha-Noi/flood/x/telemetry",
        "ioc/v1/ha-noi/weather/x/telemetry",
        "ioc/v1/ha-noi/flood/bad id/telemetry",
        "ioc/v1/ha-noi/flood/" + "x" * 65 + "/telemetry",
        "ioc/v1/ha-noi/flood/x/other",
    ],
)
def test_bad_topics_are_rejected(topic: str) -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_topic(topic)
    assert caught.value.reason == "bad_topic"


def test_json_object_with_rfc3339_ts_and_seq() -> None:
    [m] = parse_payload(
        b'{"ts": "2026-11-20T14:59:00+07:00", "seq": 42, "currentLevel": 2.5, "rainfall": 0}',
        FLOOD,
        received_at=NOW,
    )
    assert m.ts == datetime(2026, 11, 20, 7, 59, tzinfo=UTC)
    assert m.seq == 42
    assert m.metrics == {"currentLevel": 2.5, "rainfall": 0.0}


def test_missing_ts_means_receive_time() -> None:
    [m] = parse_payload(b'{"currentLevel": 1}', FLOOD, received_at=NOW)
    assert m.ts == NOW and m.seq is None


@pytest.mark.parametrize("epoch", [NOW.timestamp(), int(NOW.timestamp() * 1000)])
def test_epoch_seconds_and_milliseconds(epoch: float) -> None:
    assert parse_timestamp(epoch, now=NOW) == NOW


def test_senml_pack_groups_records_by_time() -> None:
    t = NOW.timestamp()
    pack = [
        {"bn": "urn:dev:hn-fl-1:", "bt": t - 60, "n": "currentLevel", "v": 2.0},
        {"n": "rainfall", "v": 12.5},
        {"n": "currentLevel", "t": 60, "v": 2.1},
    ]
    measurements = parse_payload(json.dumps(pack).encode(), FLOOD, received_at=NOW)
    assert [(m.ts, m.metrics) for m in measurements] == [
        (NOW - timedelta(seconds=60), {"currentLevel": 2.0, "rainfall": 12.5}),
        (NOW, {"currentLevel": 2.1}),
    ]


def test_senml_relative_time_is_relative_to_now() -> None:
    [m] = parse_payload(b'[{"n": "currentLevel", "v": 1, "t": -30}]', FLOOD, received_at=NOW)
    assert m.ts == NOW - timedelta(seconds=30)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * (MAX_PAYLOAD_BYTES + 1), "payload_too_large"),
        ("not json", "malformed_payload"),
        (b"\xff\xfe", "malformed_payload"),
        ("42", "malformed_payload"),
        ('"text"', "malformed_payload"),
        ("[1, 2]", "malformed_payload"),
        ('{"currentLevel": "high"}', "malformed_payload"),
        ('{"currentLevel": true}', "malformed_payload"),
        ('{"currentLevel": 1, "seq": -1}', "malformed_payload"),
        ('{"currentLevel": 1, "seq": 1.5}', "malformed_payload"),
        ('{"currentLevel": NaN}', "not_finite"),
        ('{"currentLevel": Infinity}', "not_finite"),
        ('{"currentLevel": 1e400}', "not_finite"),
        ('{"currentLevel": 101}', "out_of_range"),
        ('{"rainfall": -1}', "out_of_range"),
        ('{"voltage": 230}', "unknown_metric"),
        ("{}", "no_metrics"),
        ('{"ts": "2026-11-20T08:00:00"}', "bad_timestamp"),
        ('{"currentLevel": 1, "ts": "yesterday"}', "bad_timestamp"),
        ('{"currentLevel": 1, "ts": true}', "bad_timestamp"),
        ('{"currentLevel": 1, "ts": "1999-12-31T00:00:00Z"}', "bad_timestamp"),
        ('{"currentLevel": 1, "ts": "2026-11-20T08:05:01Z"}', "future_timestamp"),
        ("[]", "no_metrics"),
        ('[{"n": "currentLevel", "vs": "x"}]', "malformed_payload"),
        ('[{"n": "currentLevel", "v": 1, "t": 1e300}]', "bad_timestamp"),
        ("[" * 60_000, "malformed_payload"),
    ],
)
def test_every_rejection_has_its_reason(payload: bytes | str, reason: str) -> None:
    assert reason_of(payload) == reason


def test_four_minutes_ahead_is_accepted() -> None:
    [m] = parse_payload(b'{"currentLevel": 1, "ts": "2026-11-20T08:04:00Z"}', FLOOD, received_at=NOW)
    assert m.ts == NOW + timedelta(minutes=4)


def test_bus_records_round_trip() -> None:
    reading = Reading("d1", "ha-noi", "flood", NOW, 7, {"currentLevel": 2.5}, NOW, device_time=False)
    assert decode_record(reading.to_bytes()) == reading
    status = StatusReport("d1", "ha-noi", "flood", "offline", NOW)
    assert decode_record(status.to_bytes()) == status


@pytest.mark.parametrize(
    "raw", [b'{"device_id": "x"}', b"[]", b"nope", b'{"kind": "other"}', b'{"kind": "status", "status": "x"}']
)
def test_garbage_on_the_bus_is_a_rejection(raw: bytes) -> None:
    with pytest.raises(RejectedMessage):
        decode_record(raw)


def test_device_time_is_remembered() -> None:
    [with_ts] = parse_payload(b'{"currentLevel": 1, "ts": 1763625600}', FLOOD, received_at=NOW)
    [without] = parse_payload(b'{"currentLevel": 1}', FLOOD, received_at=NOW)
    assert with_ts.device_time and not without.device_time


@pytest.mark.parametrize(
    ("payload", "status"), [(b"online", "online"), (b"offline\n", "offline"), (b"ONLINE", "online")]
)
def test_status_payloads(payload: bytes, status: str) -> None:
    assert parse_status(payload) == status


@pytest.mark.parametrize("payload", [b"", b"up", b"online" * 10, b"\xff"])
def test_bad_status_payloads(payload: bytes) -> None:
    with pytest.raises(RejectedMessage) as caught:
        parse_status(payload)
    assert caught.value.reason == "bad_status"
