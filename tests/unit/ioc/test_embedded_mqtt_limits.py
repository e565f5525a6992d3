"""The embedded broker's answers to hostile clients: a payload over the limit is refused and the
connection stays, a protected client id cannot be taken without its password (nor its holder
disconnected), and telemetry is never kept as retained."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.unit.ioc.test_embedded_mqtt import PROTOCOLS, V5, V311, Client, RunningBroker

IMPLEMENTATION_SPECIFIC = 0x83
NOT_AUTHORIZED = 0x87
GATEWAY_ID, GATEWAY_PASSWORD = "ioc-gateway-test", "gateway-secret"


def publish_codes(client: Client, messages: list[tuple[str, bytes, int]]) -> list[int | None]:
    """Publish and wait for each acknowledgement; the PUBACK reason code of each (MQTT 5), None
    for QoS 0 and for MQTT 3.1.1, whose acknowledgements carry none."""
    codes: dict[int, int] = {}
    done = threading.Condition()

    def on_publish(paho: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        with done:
            codes[mid] = reason.value
            done.notify_all()

    client.paho.on_publish = on_publish
    infos = [client.paho.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
    with done:
        assert done.wait_for(lambda: all(info.mid in codes for info in infos), timeout=5)
    return [
        codes[info.mid] if qos and client.protocol == V5 else None
        for info, (_, _, qos) in zip(infos, messages, strict=True)
    ]


@PROTOCOLS
def test_a_payload_over_the_limit_is_refused_and_the_connection_stays(protocol: MQTTProtocolVersion) -> None:
    with RunningBroker(max_payload_size=1024) as running:
        subscriber = Client(running, protocol=V5).connect()
        assert subscriber.subscribe("size/#") == [1]
        publisher = Client(running, protocol=protocol).connect()
        codes = publish_codes(
            publisher,
            [("size/big", b"x" * 1025, 1), ("size/big0", b"x" * 5000, 0), ("size/fits", b"x" * 1024, 1)],
        )
        expected_big = IMPLEMENTATION_SPECIFIC if protocol == V5 else None
        assert codes == [expected_big, None, 0 if protocol == V5 else None]
        [received] = subscriber.wait_for_messages(1)
        assert (received.topic, len(received.payload)) == ("size/fits", 1024)
        assert not publisher.disconnected.is_set()
        assert running.call(lambda: running.broker.stats.dropped["payload_too_large"]) == 2
        publisher.disconnect()
        subscriber.disconnect()


@pytest.mark.parametrize("password", [None, "wrong"], ids=["no-password", "wrong-password"])
@PROTOCOLS
def test_a_protected_client_id_is_refused_without_its_password(
    protocol: MQTTProtocolVersion, password: str | None
) -> None:
    with RunningBroker(protected_clients={GATEWAY_ID: GATEWAY_PASSWORD}) as running:
        gateway = Client(running, protocol=V5, client_id=GATEWAY_ID, clean=False, session_expiry=300)
        gateway.paho.username_pw_set("ioc", GATEWAY_PASSWORD)
        assert gateway.connect().subscribe("ioc/#") == [1]
        intruder = Client(running, protocol=protocol, client_id=GATEWAY_ID, clean=False)
        if password is not None:
            intruder.paho.username_pw_set("ioc", password)
        refusals: list[int] = []
        intruder.paho.on_connect = lambda c, u, f, reason, p: refusals.append(reason.value)
        intruder.paho.connect("127.0.0.1", running.port, 30)
        intruder.paho.loop_start()
        try:
            assert intruder.disconnected.wait(5), "the intruder was not disconnected"
        finally:
            intruder.paho.loop_stop()
        # paho reads the 3.1.1 return code 5 as reason 0x87 as well.
        assert refusals == [NOT_AUTHORIZED]
        # The gateway kept its connection and its session.
        assert not gateway.disconnected.is_set()
        publisher = Client(running).connect()
        publisher.publish("ioc/v1/x", b"still here")
        assert [m.payload for m in gateway.wait_for_messages(1)] == [b"still here"]
        assert running.call(lambda: dict(running.broker.stats.connections_refused)) == {
            "client_id_protected": 1
        }
        publisher.disconnect()
        gateway.disconnect()


def test_the_protected_id_with_its_password_takes_its_session_back() -> None:
    with RunningBroker(protected_clients={GATEWAY_ID: GATEWAY_PASSWORD}) as running:
        first = Client(running, protocol=V5, client_id=GATEWAY_ID, clean=False, session_expiry=300)
        first.paho.username_pw_set("ioc", GATEWAY_PASSWORD)
        first.connect().subscribe("ioc/#")
        first.kill()
        second = Client(running, protocol=V5, client_id=GATEWAY_ID, clean=False, session_expiry=300)
        second.paho.username_pw_set("ioc", GATEWAY_PASSWORD)
        assert second.connect().session_present
        second.disconnect()


def test_telemetry_is_never_kept_as_retained() -> None:
    telemetry, status = "ioc/v1/ha-noi/flood/d1/telemetry", "ioc/v1/ha-noi/flood/d1/status"
    with RunningBroker(unretained=["ioc/v1/+/+/+/telemetry"]) as running:
        device = Client(running, protocol=V311).connect()
        device.publish(telemetry, b'{"currentLevel": 1}', retain=True)
        device.publish(status, b"online", retain=True)
        later = Client(running, protocol=V5).connect()
        later.subscribe("ioc/#")
        [kept] = later.wait_for_messages(1)
        assert (kept.topic, kept.payload, kept.retain) == (status, b"online", True)
        assert running.call(lambda: sorted(running.broker.retained)) == [status]
        device.disconnect()
        later.disconnect()
