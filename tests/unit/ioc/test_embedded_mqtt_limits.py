"""The embedded broker's answers to hostile clients, as `ioc up` sets it up: a packet over 128 KiB
closes its connection, a protected client id cannot be taken without its password (nor its holder
disconnected), and telemetry is never kept as retained."""

from __future__ import annotations

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from ioc.up import MAX_PACKET_BYTES
from tests.unit.ioc.test_embedded_mqtt import PROTOCOLS, V5, V311, Client, RunningBroker

PACKET_TOO_LARGE = 0x95
NOT_AUTHORIZED = 0x87
GATEWAY_ID, GATEWAY_PASSWORD = "ioc-gateway-test", "gateway-secret"


@PROTOCOLS
def test_the_packet_limit_of_ioc_up_passes_a_payload_a_little_over_64_kib(
    protocol: MQTTProtocolVersion,
) -> None:
    """Up to 128 KiB a packet reaches the subscriber (the gateway, which dead-letters a payload over
    64 KiB); a megabyte closes the publisher's connection as soon as its length is read."""
    with RunningBroker(max_packet_size=MAX_PACKET_BYTES) as running:
        subscriber = Client(running, protocol=V5).connect()
        assert subscriber.subscribe("size/#") == [1]
        publisher = Client(running, protocol=protocol).connect()
        publisher.publish("size/over-64k", b"x" * 100_000)
        [received] = subscriber.wait_for_messages(1)
        assert (received.topic, len(received.payload)) == ("size/over-64k", 100_000)
        publisher.paho.publish("size/huge", b"x" * 1_048_576, qos=1)
        assert publisher.disconnected.wait(5), "the connection stayed open"
        if protocol == V5:
            assert publisher.disconnect_reason is not None
            assert publisher.disconnect_reason.value == PACKET_TOO_LARGE
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
