"""The gateway's dead letter keeps what a replay needs: the payload byte for byte, the device the
topic names, and how the broker delivered the message."""

from __future__ import annotations

import base64
import json

from ioc_core.telemetry import StoredDeadLetter
from tests.unit.ingest.test_gateway import Rig, rig, until

__all__ = ["rig"]  # the fixture, shared with the gateway's other tests

UNKNOWN = "ioc/v1/ha-noi/flood/hn-flood-999/telemetry"


async def test_a_dead_letter_carries_the_raw_payload_and_the_delivery_flags(rig: Rig) -> None:
    payload = b'{"currentLevel": 1.25}\xff\x00'
    rig.mqtt.publish(UNKNOWN, payload, mid=31, qos=1, dup=True)
    rig.mqtt.publish(UNKNOWN.replace("hn-flood-999", "hn-flood-001"), b"{}", mid=32, retain=True)
    await until(lambda: len(rig.producer.sent) == 2)
    (topic, value, key), (_, retained, _) = rig.producer.sent
    assert (topic, key) == (rig.settings.topics.deadletter, None)
    record = json.loads(value)
    assert record["reason"] == "unknown_device" and record["device_id"] == "hn-flood-999"
    assert base64.b64decode(record["payload_base64"]) == payload
    assert record["mqtt"] == {"qos": 1, "retain": False, "dup": True, "packet_id": 31}
    assert json.loads(retained)["mqtt"]["retain"] is True
    letter = StoredDeadLetter.from_bytes(value, source="s")
    assert letter.raw == payload and letter.device_id == "hn-flood-999"
    rig.producer.acknowledge_all()
    await until(lambda: sorted(rig.mqtt.acks) == [(31, 1), (32, 1)])


async def test_a_qos_0_dead_letter_has_no_packet_id(rig: Rig) -> None:
    rig.mqtt.publish(UNKNOWN, b"{", mid=0, qos=0)
    await until(lambda: len(rig.producer.sent) == 1)
    record = json.loads(rig.producer.sent[0][1])
    assert record["mqtt"] == {"qos": 0, "retain": False, "dup": False, "packet_id": None}
    assert record["reason"] == "unknown_device"
    rig.producer.acknowledge_all()
    await until(lambda: rig.gateway.backlog == 0)
