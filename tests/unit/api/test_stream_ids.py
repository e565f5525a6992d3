"""The live stream's event ids (position vectors), event kinds and filters."""

from __future__ import annotations

import base64
import json
import random

import pytest
from fastapi import HTTPException

from api.auth import Principal
from api.routes.stream import stream_kinds
from api.stream.hub import StreamFilter, kind_of, parse_event
from api.stream.positions import decode_position, encode_position

TOPIC = "ioc.events"


def _raw_id(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "offsets",
    [
        (0,),
        (0, 0, 0, 0, 0, 0),
        (1, 127, 128, 16_383, 16_384, 2**31),
        (2**63 - 1, 0, 5),
        tuple(range(0, 100_000, 997)),
    ],
)
def test_a_position_round_trips(offsets: tuple[int, ...]) -> None:
    text = encode_position(offsets, topic=TOPIC)
    assert decode_position(text, topic=TOPIC) == offsets
    assert all(c.isalnum() or c in "-_" for c in text)


def test_ids_are_compact_and_distinct() -> None:
    rng = random.Random(7)
    seen = set()
    for _ in range(2000):
        offsets = tuple(rng.randrange(0, 2_000_000) for _ in range(6))
        text = encode_position(offsets, topic=TOPIC)
        assert len(text) <= 30
        seen.add(text)
        assert decode_position(text, topic=TOPIC) == offsets
    assert len(seen) == 2000


def test_an_id_of_another_topic_is_not_taken() -> None:
    text = encode_position((1, 2, 3), topic="other.ioc.events")
    assert decode_position(text, topic=TOPIC) is None


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "abc",
        "!!!!",
        "a b c",
        "0123456789",
        "x" * 5000,
        "8f2d6c1e-4a0b-4a53-9a25-3c0f5d7e9b11",  # a CloudEvent UUID, not a position
    ],
)
def test_garbled_ids_are_not_taken(text: str | None) -> None:
    assert decode_position(text, topic=TOPIC) is None


def test_damaged_ids_are_not_taken() -> None:
    good = encode_position((10, 20, 300), topic=TOPIC)
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    tag = raw[1:3]
    damaged = [
        good[:-1],  # truncated
        good + "=",  # padded
        good + "A",  # trailing data
        _raw_id(bytes([2]) + raw[1:]),  # another version
        _raw_id(bytes([1]) + tag + bytes([0])),  # no partitions
        _raw_id(bytes([1]) + tag + bytes([3, 10, 20])),  # fewer offsets than partitions
        _raw_id(bytes([1]) + tag + bytes([2, 10, 20, 30])),  # more offsets than partitions
        _raw_id(bytes([1]) + tag + bytes([1, 0x8A, 0x00])),  # an offset spelled the long way
        _raw_id(bytes([1]) + tag + bytes([1]) + bytes([0xFF] * 9) + bytes([0x01])),  # beyond 2**63 - 1
        _raw_id(bytes([1]) + tag + bytes([1, 0x80])),  # cut inside a varint
    ]
    for text in damaged:
        assert decode_position(text, topic=TOPIC) is None, text


def test_negative_offsets_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_position((1, -1), topic=TOPIC)


def test_event_kinds() -> None:
    assert kind_of("alarm.raised") == kind_of("alarm.resolved") == "alarm"
    assert kind_of("device.online") == kind_of("device.offline") == "status"
    assert kind_of("state.changed") == "state"
    assert kind_of("audit.recorded") == "audit"
    assert kind_of("device.registered") is None
    assert kind_of(None) is None


def test_records_become_one_line_events() -> None:
    value = (
        b'{\n "type": "alarm.raised",\n "data": {"city": "ha-noi", "domain": "flood", "message": "a\\nb"}\n}'
    )
    parsed = parse_event(value)
    assert parsed is not None
    assert (parsed.kind, parsed.city, parsed.domain) == ("alarm", "ha-noi", "flood")
    assert "\n" not in parsed.data and "\r" not in parsed.data
    for value in [b"", b"not json", b"[1, 2]", b'{"type": "alarm.raised"}', b'{"type": "x.y", "data": {}}']:
        assert parse_event(value) is None
    assert parse_event(b'{"type": "alarm.raised", "data": {"city": "ha-noi"}}') is None


def test_filters_keep_to_the_callers_scope() -> None:
    everyone = Principal(name="admin", role="admin")
    hanoi_flood = Principal(
        name="k", role="viewer", cities=frozenset({"ha-noi"}), domains=frozenset({"flood"})
    )
    all_kinds = frozenset({"alarm", "status", "state"})
    assert StreamFilter(all_kinds, None, None, everyone).matches("state", "can-tho", "grid")
    assert StreamFilter(all_kinds, None, None, hanoi_flood).matches("alarm", "ha-noi", "flood")
    assert not StreamFilter(all_kinds, None, None, hanoi_flood).matches("alarm", "ha-noi", "grid")
    assert not StreamFilter(all_kinds, None, None, hanoi_flood).matches("alarm", "hai-phong", "flood")
    # A filter cannot widen the scope.
    assert not StreamFilter(all_kinds, "hai-phong", None, hanoi_flood).matches("alarm", "hai-phong", "flood")
    assert not StreamFilter(frozenset({"status"}), None, None, everyone).matches("alarm", "ha-noi", "flood")
    assert not StreamFilter(all_kinds, "ha-noi", "water", everyone).matches("state", "ha-noi", "flood")


def test_an_area_filter_keeps_the_alarms_of_its_devices() -> None:
    everyone = Principal(name="admin", role="admin")
    kinds = frozenset({"alarm", "status", "state"})
    ward = StreamFilter(kinds, None, None, everyone, frozenset({"hp.ward.le-chan"}))
    in_ward = parse_event(
        b'{"type": "alarm.raised", "data": {"city": "hai-phong", "domain": "flood",'
        b' "areas": ["hp.catchment.tam-bac", "hp.ward.le-chan"]}}'
    )
    elsewhere = parse_event(
        b'{"type": "alarm.raised", "data": {"city": "hai-phong", "domain": "flood", "areas": ["hp.ward.x"]}}'
    )
    status = parse_event(b'{"type": "device.offline", "data": {"city": "hai-phong", "domain": "flood"}}')
    assert in_ward is not None and elsewhere is not None and status is not None
    assert in_ward.areas == {"hp.catchment.tam-bac", "hp.ward.le-chan"}
    assert ward.admits(in_ward) and not ward.admits(elsewhere) and not ward.admits(status)
    assert StreamFilter(kinds, None, None, everyone).admits(status)
    offline_here = parse_event(
        b'{"type": "device.offline", "data": {"city": "hai-phong", "domain": "flood",'
        b' "areas": ["hp.ward.le-chan"]}}'
    )
    assert offline_here is not None and ward.admits(offline_here)


def test_types_parameter() -> None:
    assert stream_kinds(None) == {"alarm", "status", "state"}
    assert stream_kinds("alarm, state") == {"alarm", "state"}
    for bad in ["", ",", "alarms", "alarm,telemetry"]:
        with pytest.raises(HTTPException) as raised:
            stream_kinds(bad)
        assert raised.value.status_code == 400
    assert stream_kinds("audit") == {"audit"}
    assert "audit" not in stream_kinds(None)


def _audit_record(cities: list[str] | None, domains: list[str] | None) -> bytes:
    data = {"action": "device.create", "object": {"type": "device", "id": "d1"}, "cities": cities}
    return json.dumps({"type": "audit.recorded", "data": {**data, "domains": domains}}).encode()


def test_audit_entries_go_to_admins_that_ask_within_their_scope() -> None:
    parsed = parse_event(_audit_record(["ha-noi"], ["flood"]))
    assert parsed is not None and parsed.kind == "audit"
    assert (parsed.cities, parsed.domains) == ({"ha-noi"}, {"flood"})
    every_city = parse_event(_audit_record(None, None))
    assert every_city is not None and every_city.cities is None
    audit = frozenset({"audit"})
    everyone = Principal(name="admin", role="admin")
    hanoi_admin = Principal(name="a", role="admin", cities=frozenset({"ha-noi"}))
    hanoi_viewer = Principal(name="v", role="viewer", cities=frozenset({"ha-noi"}))
    assert StreamFilter(audit, None, None, everyone).admits(parsed)
    assert StreamFilter(audit, None, None, everyone).admits(every_city)
    assert StreamFilter(audit, None, None, hanoi_admin).admits(parsed)
    # An entry about an object of every city is beyond a scoped admin, as in `GET /v1/audit`.
    assert not StreamFilter(audit, None, None, hanoi_admin).admits(every_city)
    assert not StreamFilter(audit, None, None, hanoi_viewer).admits(parsed)
    assert not StreamFilter(frozenset({"alarm", "status", "state"}), None, None, everyone).admits(parsed)
    assert StreamFilter(audit, "ha-noi", "flood", everyone).admits(parsed)
    assert not StreamFilter(audit, "hai-phong", None, everyone).admits(parsed)
    assert not StreamFilter(audit, None, "water", everyone).admits(parsed)
    assert not StreamFilter(audit, "ha-noi", None, everyone).admits(every_city)
