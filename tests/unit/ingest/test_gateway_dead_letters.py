"""The gateway's dead letter keeps what a replay needs: the payload byte for byte, the device the
topic names, and how the broker delivered the message."""

from __future__ import annotations

import base64
import json

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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


async def test_a_dead_letter_keeps_the_publishers_mqtt_5_properties(rig: Rig) -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ContentType = "application/senml+json"
    properties.UserProperty = [("firmware", "2.4.1")]
    rig.mqtt.publish(UNKNOWN, b"[]", mid=40, properties=properties.pack())  # type: ignore[no-untyped-call]
    await until(lambda: len(rig.producer.sent) == 1)
    letter = StoredDeadLetter.from_bytes(rig.producer.sent[0][1], source="s")
    assert letter.mqtt is not None and letter.mqtt["properties"] == {
        "content_type": "application/senml+json",
        "user_properties": [["firmware", "2.4.1"]],
    }
    rig.producer.acknowledge_all()
    await until(lambda: rig.gateway.backlog == 0)


async def test_what_paho_parses_keeps_its_properties_too(rig: Rig) -> None:
    # QoS 2 and topic aliases are left to paho, whose message carries decoded properties.
    message = MQTTMessage(mid=41, topic=UNKNOWN.encode())
    message.payload, message.qos = b"[]", 2
    message.properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    message.properties.ContentType = "text/plain"
    rig.mqtt._on_message(rig.mqtt.client, None, message)  # type: ignore[arg-type]
    plain = MQTTMessage(mid=42, topic=UNKNOWN.encode())
    plain.qos, plain.properties = 2, Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    rig.mqtt._on_message(rig.mqtt.client, None, plain)  # type: ignore[arg-type]
    await until(lambda: len(rig.producer.sent) == 2)
    flags = [StoredDeadLetter.from_bytes(value, source="s").mqtt for _, value, _ in rig.producer.sent]
    assert [(f or {}).get("properties") for f in flags] == [{"content_type": "text/plain"}, None]
    rig.producer.acknowledge_all()
    await until(lambda: rig.gateway.backlog == 0)
