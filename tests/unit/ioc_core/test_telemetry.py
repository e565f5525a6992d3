"""Parsing and validation of device payloads and topics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ingest.gateway import InboundMessage
from ioc_core.domains import DOMAINS, units
from ioc_core.errors import RejectedMessage
from ioc_core.models import DeviceRoute
from ioc_core.telemetry import (
    MAX_PAYLOAD_BYTES,
    REASON_RETAINED,
    REASON_UNIT_MISMATCH,
    Measurement,
    Reading,
    StatusReport,
    decode_record,
    parse_payload,
    parse_status,
    parse_timestamp,
    parse_topic,
    validate,
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


def senml(*records: dict[str, object], domain: str = "flood") -> list[Measurement]:
    return parse_payload(json.dumps(list(records)).encode(), DOMAINS[domain], received_at=NOW)


@pytest.mark.parametrize(
    ("domain", "name", "unit", "value", "stored"),
    [
        ("flood", "currentLevel", "m", 2.5, 2.5),
        ("flood", "currentLevel", "cm", 45, 0.45),
        ("flood", "currentLevel", "mm", 1250, 1.25),
        ("flood", "currentLevel", "km", 0.05, 50.0),
        ("flood", "rainfall", "mm/h", 12.5, 12.5),
        ("flood", "rainfall", "m/h", 0.0125, 12.5),
        ("water", "pressure", "bar", 3.2, 3.2),
        ("water", "pressure", "Pa", 320_000, 3.2),
        ("water", "pressure", "hPa", 3200, 3.2),
        ("water", "pressure", "kPa", 320, 3.2),
        ("water", "pressure", "MPa", 0.32, 3.2),
        ("water", "pressure", "psi", 50, 3.447378646584),
        ("water", "flow", "m3/h", 360, 360.0),
        ("water", "flow", "m3/s", 0.1, 360.0),
        ("water", "flow", "l/s", 100, 360.0),
        ("water", "turbidity", "NTU", 4, 4.0),
        ("water", "pH", "pH", 7.2, 7.2),
        ("waste", "temperature", "Cel", 31.5, 31.5),
        ("waste", "temperature", "K", 300, 26.85),
        ("waste", "temperature", "degF", 212, 100.0),
        ("waste", "fillingLevel", "/", 0.4, 0.4),
        ("waste", "fillingLevel", "%", 40, 0.4),
        ("waste", "fillingLevel", "/100", 40, 0.4),
        ("waste", "batteryLevel", "%EL", 85, 0.85),
        ("grid", "activePower", "kW", 1500, 1500.0),
        ("grid", "activePower", "W", -1500, -1.5),
        ("grid", "activePower", "MW", 1.5, 1500.0),
        ("grid", "voltage", "V", 230, 230.0),
        ("grid", "voltage", "kV", 0.4, 400.0),
        ("grid", "voltage", "mV", 230_000, 230.0),
        ("grid", "frequency", "Hz", 50.02, 50.02),
        ("traffic", "averageVehicleSpeed", "km/h", 54, 54.0),
        ("traffic", "averageVehicleSpeed", "m/s", 15, 54.0),
        ("traffic", "intensity", "1/min", 30, 30.0),
        ("traffic", "intensity", "1/s", 0.5, 30.0),
        ("traffic", "occupancy", "%", 12.5, 0.125),
    ],
)
def test_senml_units_are_converted_to_the_metrics_unit(
    domain: str, name: str, unit: str, value: float, stored: float
) -> None:
    [m] = senml({"n": name, "u": unit, "v": value}, domain=domain)
    assert m.metrics[name] == pytest.approx(stored, rel=1e-12)


def test_conversions_leave_no_binary_noise() -> None:
    [m] = senml(
        {"n": "temperature", "u": "K", "v": 300}, {"n": "fillingLevel", "u": "%", "v": 45}, domain="waste"
    )
    assert m.metrics == {"temperature": 26.85, "fillingLevel": 0.45}


def test_senml_base_unit_applies_until_a_record_names_its_own() -> None:
    [m] = senml(
        {"bu": "cm", "n": "currentLevel", "v": 45},
        {"n": "rainfall", "u": "mm/h", "v": 3},
        {"n": "batteryLevel", "u": "%", "v": 80},
    )
    assert m.metrics == {"currentLevel": 0.45, "rainfall": 3.0, "batteryLevel": 0.8}


def test_senml_base_value_is_added_before_the_unit_is_converted() -> None:
    [m] = senml({"bv": 100, "bu": "cm", "n": "currentLevel", "v": 45})
    assert m.metrics == {"currentLevel": 1.45}


@pytest.mark.parametrize(
    ("records", "reason"),
    [
        ([{"n": "currentLevel", "u": "V", "v": 1}], "unit_mismatch"),
        ([{"n": "currentLevel", "u": "furlong", "v": 1}], "unit_mismatch"),
        ([{"n": "currentLevel", "u": "M", "v": 1}], "unit_mismatch"),
        ([{"bu": "mm/h", "n": "currentLevel", "v": 1}], "unit_mismatch"),
        ([{"n": "batteryLevel", "u": "%RH", "v": 50}], "unit_mismatch"),
        ([{"n": "currentLevel", "u": 7, "v": 1}], "malformed_payload"),
        # Ranges apply to the converted value: 2 km of water is out of range, 5000 cm is not.
        ([{"n": "currentLevel", "u": "km", "v": 2}], "out_of_range"),
        ([{"n": "rainfall", "u": "m/s", "v": 1}], "out_of_range"),
        ([{"n": "currentLevel", "u": "km", "v": 1e308}], "out_of_range"),
    ],
)
def test_unit_rejections(records: list[dict[str, object]], reason: str) -> None:
    assert reason_of(json.dumps(records)) == reason


def test_unit_mismatch_says_which_units_fit() -> None:
    with pytest.raises(RejectedMessage) as caught:
        senml({"n": "currentLevel", "u": "V", "v": 1})
    assert caught.value.reason == REASON_UNIT_MISMATCH
    assert "'V'" in caught.value.detail and "cm" in caught.value.detail


def test_every_metric_unit_has_its_conversions() -> None:
    for domain in DOMAINS.values():
        for metric in domain.metrics:
            assert units.accepted_units(metric), f"{domain.name}.{metric.name} in {metric.unit!r}"
            for unit in units.accepted_units(metric):
                assert units.conversion(metric, unit) is not None


def test_senml_in_cm_within_range_after_conversion() -> None:
    [m] = senml({"n": "currentLevel", "u": "cm", "v": 5000})
    assert m.metrics == {"currentLevel": 50.0}


def test_senml_relative_and_absent_times_are_not_device_time() -> None:
    t = NOW.timestamp()
    measurements = senml(
        {"n": "currentLevel", "v": 1.0},
        {"n": "currentLevel", "t": -60, "v": 0.9},
        {"bt": t - 120, "n": "currentLevel", "v": 0.8},
        {"n": "currentLevel", "t": 120, "v": 1.1},
    )
    assert [(m.ts, m.device_time) for m in measurements] == [
        (NOW - timedelta(seconds=120), True),
        (NOW - timedelta(seconds=60), False),
        (NOW, False),
        (NOW, True),
    ]


def reading_of(
    measurement: Measurement, received_at: datetime = NOW, *, redelivered: bool = False, packet_id: int = 9
) -> Reading:
    """The reading a gateway makes of `measurement` received at `received_at` (parsed at NOW)."""
    return Reading(
        "d1",
        "ha-noi",
        "flood",
        measurement.ts + (received_at - NOW),
        measurement.seq,
        measurement.metrics,
        received_at,
        device_time=measurement.device_time,
        redelivered=redelivered,
        packet_id=packet_id,
    )


def test_content_digest_tells_copies_from_new_readings() -> None:
    pack = [{"n": "fillingLevel", "t": -60, "v": 0.5}, {"n": "fillingLevel", "v": 0.5}]
    first = [reading_of(m) for m in senml(*pack, domain="waste")]
    later = NOW + timedelta(seconds=45)
    copy = [reading_of(m, later, redelivered=True, packet_id=9) for m in senml(*pack, domain="waste")]
    # A copy received later says the same; two records of a pack with one value, a minute apart, do not.
    assert [r.content_digest() for r in first] == [r.content_digest() for r in copy]
    assert first[0].content_digest() != first[1].content_digest()
    other = reading_of(senml({"n": "fillingLevel", "v": 0.55}, domain="waste")[0])
    assert other.content_digest() != first[1].content_digest()
    # Survives the bus, whatever the order of the metrics.
    [a] = parse_payload(b'{"seq": 3, "currentLevel": 1, "rainfall": 2}', FLOOD, received_at=NOW)
    [b] = parse_payload(b'{"rainfall": 2.0, "currentLevel": 1.0, "seq": 3}', FLOOD, received_at=NOW)
    decoded = decode_record(reading_of(a).to_bytes())
    assert isinstance(decoded, Reading)
    assert decoded.content_digest() == reading_of(b).content_digest() != 0
    assert 0 < decoded.content_digest() < 2**63


def test_bus_records_carry_the_delivery() -> None:
    reading = Reading(
        "d1", "ha-noi", "flood", NOW, None, {"currentLevel": 2.5}, NOW, False, redelivered=True, packet_id=17
    )
    assert decode_record(reading.to_bytes()) == reading
    # Records written before the delivery was carried read as first deliveries.
    body = json.loads(reading.to_bytes())
    del body["redelivered"], body["packet_id"]
    old = decode_record(json.dumps(body).encode())
    assert isinstance(old, Reading) and not old.redelivered and old.packet_id is None


@pytest.mark.parametrize(("qos", "dup", "packet_id"), [(1, True, 41), (1, False, 41), (0, False, None)])
def test_gateway_readings_carry_the_mqtt_delivery(qos: int, dup: bool, packet_id: int | None) -> None:
    address = parse_topic("ioc/v1/ha-noi/flood/d1/telemetry")
    message = InboundMessage(
        topic="ioc/v1/ha-noi/flood/d1/telemetry",
        payload=b'[{"n": "currentLevel", "u": "cm", "v": 45}]',
        mid=41,
        qos=qos,
        received_at=NOW,
        dup=dup,
    )
    [reading] = validate(message, address, DeviceRoute(id="d1", city="ha-noi", domain="flood"))
    assert isinstance(reading, Reading)
    assert (reading.redelivered, reading.packet_id) == (dup, packet_id)
    assert reading.metrics == {"currentLevel": 0.45} and not reading.device_time


@pytest.mark.parametrize(("kind", "retain"), [("telemetry", True), ("telemetry", False), ("status", True)])
def test_only_status_may_be_retained(kind: str, retain: bool) -> None:
    topic = f"ioc/v1/ha-noi/flood/d1/{kind}"
    payload = b"online" if kind == "status" else b'{"currentLevel": 1.5}'
    message = InboundMessage(topic=topic, payload=payload, mid=3, qos=1, received_at=NOW, retain=retain)
    route = DeviceRoute(id="d1", city="ha-noi", domain="flood")
    if kind == "telemetry" and retain:
        with pytest.raises(RejectedMessage) as rejected:
            validate(message, parse_topic(topic), route)
        assert rejected.value.reason == REASON_RETAINED
        # Judged before the registry: a stranger's retained reading is refused for what it is.
        with pytest.raises(RejectedMessage, match=REASON_RETAINED):
            validate(message, parse_topic(topic), None)
    else:
        assert len(validate(message, parse_topic(topic), route)) == 1


@pytest.mark.parametrize("packet_id", [0, 65536, -1, 1.5, "7", True, 10**30])
def test_a_bus_record_with_a_bad_packet_id_is_a_rejection(packet_id: object) -> None:
    reading = Reading("d1", "ha-noi", "flood", NOW, None, {"currentLevel": 2.5}, NOW, False, packet_id=1)
    body = json.loads(reading.to_bytes())
    body["packet_id"] = packet_id
    with pytest.raises(RejectedMessage) as caught:
        decode_record(json.dumps(body).encode())
    assert caught.value.reason == "malformed_payload"
