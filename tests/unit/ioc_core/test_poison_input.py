"""Property-based tests: whatever a stranger publishes, the gateway's parsing path either accepts
it or raises the documented `RejectedMessage`, and whatever it accepts, the processor can read.

Each test runs `EXAMPLES` generated inputs (plus hypothesis' own explicit edge cases).
"""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingest.gateway import InboundMessage
from ioc_core.domains import DOMAINS
from ioc_core.errors import RejectedMessage
from ioc_core.models import DeviceRoute
from ioc_core.telemetry import (
    MAX_PAYLOAD_BYTES,
    Reading,
    StoredDeadLetter,
    decode_record,
    parse_topic,
    validate,
)

EXAMPLES = 1500
RECEIVED_AT = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Every metric name any domain knows, so that generated objects often reach the value checks.
METRIC_NAMES = sorted({metric.name for domain in DOMAINS.values() for metric in domain.metrics})
SENML_KEYS = ["bn", "bt", "bu", "bv", "n", "t", "u", "v", "vs", "vb", "vd", "s", "ut", "ver"]

huge_integers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**600), max_value=10**600),
    st.sampled_from([2**63, -(2**63), 2**64, 10**308, 10**309, -(10**309), 2**1024]),
)
odd_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 2.0**28, -(2.0**28), 1e11, -1e11, 1e20]),
)
odd_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=300),
    st.sampled_from(
        [
            "",
            "NaN",
            "Infinity",
            "-Infinity",
            "2026-06-01T08:00:00+07:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01",
            "\x00",
        ]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), huge_integers, odd_floats, odd_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(
            st.one_of(st.sampled_from([*METRIC_NAMES, "ts", "seq", *SENML_KEYS]), st.text(max_size=12)),
            children,
            max_size=6,
        ),
    ),
    max_leaves=30,
)
device_objects = st.dictionaries(
    st.sampled_from([*METRIC_NAMES, "ts", "seq", "extra"]), st.one_of(scalars, json_values), max_size=8
)
senml_records = st.dictionaries(st.sampled_from(SENML_KEYS + METRIC_NAMES[:3]), scalars, max_size=7)
senml_packs = st.lists(
    st.one_of(
        senml_records,
        st.fixed_dictionaries(
            {"n": st.sampled_from(METRIC_NAMES), "v": st.one_of(huge_integers, odd_floats)},
            optional={
                "t": st.one_of(huge_integers, odd_floats),
                "bt": st.one_of(huge_integers, odd_floats),
                "u": odd_text,
            },
        ),
        json_values,
    ),
    max_size=8,
)


def _dumps(value: Any) -> bytes:
    # json.dumps writes NaN/Infinity spellings for non-finite floats, as a careless device would;
    # integers beyond Python's digit limit are written by hand.
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    except ValueError:
        return b'{"intensity": ' + b"9" * 5000 + b"}"


def _message(payload: bytes, domain: str = "flood", kind: str = "telemetry") -> tuple[InboundMessage, Any]:
    topic = f"ioc/v1/ha-noi/{domain}/dev-1/{kind}"
    message = InboundMessage(topic=topic, payload=payload, mid=1, qos=1, received_at=RECEIVED_AT)
    return message, parse_topic(topic)


def _route(domain: str) -> DeviceRoute:
    return DeviceRoute(id="dev-1", city="ha-noi", domain=domain)


def _check(payload: bytes, domain: str, kind: str = "telemetry") -> None:
    """The property itself: acceptance or `RejectedMessage`, and accepted records round-trip."""
    message, address = _message(payload, domain, kind)
    try:
        records = validate(message, address, _route(domain))
    except RejectedMessage as rejection:
        assert rejection.reason
        assert len(rejection.detail) < 2000
        return
    for record in records:
        decoded = decode_record(record.to_bytes())
        assert decoded == record
        if isinstance(record, Reading):
            assert record.metrics
            assert all(math.isfinite(v) for v in record.metrics.values())
            metrics = {m.name: m for m in DOMAINS[domain].metrics}
            assert all(metrics[name].accepts(v) for name, v in record.metrics.items())


domains = st.sampled_from(sorted(DOMAINS))


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=512), domain=domains)
@example(payload=b'{"currentLevel": 1' + b"0" * 400 + b"}", domain="flood")
@example(payload=b'{"currentLevel": 1' + b"0" * 5000 + b"}", domain="flood")
@example(payload=b"[" * 100_000 + b"]" * 100_000, domain="flood")
@example(payload=b"[" * 30_000, domain="flood")
@example(payload=b'{"a":' * 20_000, domain="flood")
@example(payload=b"\xff\xfe{}", domain="flood")
@example(payload=b'{"currentLevel": NaN}', domain="flood")
@example(payload=b'{"currentLevel": -Infinity}', domain="flood")
@example(payload=b'{"currentLevel": 1e999}', domain="flood")
@example(payload=b"x" * (MAX_PAYLOAD_BYTES + 1), domain="flood")
def test_arbitrary_bytes_are_accepted_or_rejected(payload: bytes, domain: str) -> None:
    _check(payload, domain)


@PROPERTY_SETTINGS
@given(body=json_values, domain=domains)
def test_arbitrary_json_is_accepted_or_rejected(body: Any, domain: str) -> None:
    _check(_dumps(body), domain)


@PROPERTY_SETTINGS
@given(body=device_objects, domain=domains)
@example(body={"currentLevel": 10**400}, domain="flood")
@example(body={"currentLevel": 1.5, "ts": 10**400}, domain="flood")
@example(body={"currentLevel": 1.5, "ts": -(10**30)}, domain="flood")
@example(body={"currentLevel": 1.5, "seq": 10**400}, domain="flood")
@example(body={"currentLevel": 1.5, "ts": "9999-12-31T23:59:59-01:00"}, domain="flood")
@example(body={"currentLevel": 1.5, "ts": "0001-01-01T00:00:00+14:00"}, domain="flood")
@example(body={"currentLevel": [1]}, domain="flood")
@example(body={"currentLevel": {"v": 1}}, domain="flood")
def test_device_objects_with_wrong_types_are_accepted_or_rejected(body: dict[str, Any], domain: str) -> None:
    _check(_dumps(body), domain)


@PROPERTY_SETTINGS
@given(pack=senml_packs, domain=domains)
@example(pack=[{"n": "currentLevel", "v": 1.0, "t": 10**400}], domain="flood")
@example(pack=[{"bt": -(10**20), "n": "currentLevel", "v": 1.0}], domain="flood")
@example(pack=[{"bt": 2**28 - 1, "n": "currentLevel", "v": 1.0, "t": 2**28 - 1}], domain="flood")
@example(pack=[{"bt": 1e308, "n": "currentLevel", "v": 1.0, "t": 1e308}], domain="flood")
@example(pack=[{"n": "currentLevel", "v": 1.0, "t": -(2**27)}], domain="flood")
@example(pack=[{"n": "currentLevel", "u": "cm", "v": 45}], domain="flood")
def test_senml_packs_are_accepted_or_rejected(pack: list[Any], domain: str) -> None:
    _check(_dumps(pack), domain)


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=64), domain=domains)
def test_status_payloads_are_accepted_or_rejected(payload: bytes, domain: str) -> None:
    _check(payload, domain, kind="status")


@PROPERTY_SETTINGS
@given(topic=st.one_of(st.text(max_size=200), st.builds("/".join, st.lists(odd_text, max_size=8))))
def test_topics_are_parsed_or_rejected(topic: str) -> None:
    try:
        parse_topic(topic)
    except RejectedMessage as rejection:
        assert rejection.reason == "bad_topic"


@PROPERTY_SETTINGS
@given(raw=st.one_of(st.binary(max_size=256), json_values.map(_dumps)))
@example(
    raw=b'{"kind":"reading","device_id":"d","city":"c","domain":"flood","ts":"2026-01-01T00:00:00+00:00",'
    b'"metrics":{"currentLevel":1' + b"0" * 400 + b'},"received_at":"2026-01-01T00:00:00+00:00"}'
)
def test_bus_records_decode_or_become_dead_letters(raw: bytes) -> None:
    """What a stranger with access to Kafka could write: never more than a dead letter."""
    with contextlib.suppress(RejectedMessage):
        decode_record(raw)
    letter = StoredDeadLetter.from_bytes(raw, source="t/0@1")
    assert letter.reason
