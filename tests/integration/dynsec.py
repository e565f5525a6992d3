"""A Mosquitto of a test's own with the dynamic-security plugin, configured as the compose
deployment's broker (deploy/mosquitto/mosquitto.conf, with this machine's paths and a free
loopback port), and MQTT v5 sessions that record what the broker answers."""

from __future__ import annotations

import getpass
import glob
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.brokers import PacketReader
from tests.integration.conftest import free_port
from tests.integration.harness import unique

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
NOT_AUTHORIZED = 135
# PUBACK reason codes of an accepted message: "success", "no matching subscribers".
ACCEPTED = {0, 16}
# Refusals of a CONNECT for bad credentials: "bad user name or password" or "not authorized".
REFUSED_AT_CONNECT = {134, 135}
ADMINISTRATIVE_ACTION = 152


def _plugin() -> str:
    candidates = [*sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))]
    candidates.append("/usr/lib/mosquitto_dynamic_security.so")
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    pytest.fail("Mosquitto's dynamic-security plugin is not installed (`make services` installs it)")


def _program(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if found is None:
        pytest.fail(f"{name} is not installed (`make services` installs it)")
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the broker exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the broker did not listen on {port} within {timeout}s:\n{log.read_text()}")


def shipped_config(port: int, dynsec: Path, data_dir: Path) -> str:
    """The compose broker's configuration with this machine's paths, listening on `port` of the
    loopback interface only, without the devices' TLS listener. `user`: run as whoever runs the
    tests; as root the broker would otherwise switch to the mosquitto user, which may not rewrite
    the plugin's file."""
    replacements = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^plugin /\S+$": f"plugin {_plugin()}",
        r"^plugin_opt_config_file /\S+$": f"plugin_opt_config_file {dynsec}",
        r"^persistence_location /\S+$": f"persistence_location {data_dir}/",
    }
    config = SHIPPED_CONF.read_text()
    # The devices' TLS listener needs the deployment's certificates; test_secrets runs it.
    config, found = re.subn(
        r"^listener 8883\n(?:(?:certfile|keyfile|tls_version|max_qos) .*\n)*", "", config, flags=re.MULTILINE
    )
    assert found == 1, f"{SHIPPED_CONF} no longer has its TLS listener"
    for pattern, line in replacements.items():
        config, found = re.subn(pattern, line, config, flags=re.MULTILINE)
        assert found == 1, f"{SHIPPED_CONF} no longer has one line matching {pattern}"
    assert "/mosquitto/" not in config, f"{SHIPPED_CONF} has a path this test does not replace"
    return config + f"\nuser {getpass.getuser()}\n"


class Broker:
    """A Mosquitto of our own with the dynamic-security plugin; restartable, state kept."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(18)
        self.directory = directory
        self.log = directory / "broker.log"
        self._config = directory / "mosquitto.conf"
        dynsec = directory / "dynamic-security.json"
        data_dir = directory / "data"
        data_dir.mkdir()
        initialised = subprocess.run(
            [_program("mosquitto_ctrl"), "dynsec", "init", str(dynsec), "admin", self.admin_password],
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = initialised.stdout + initialised.stderr
        assert dynsec.exists(), f"mosquitto_ctrl dynsec init failed:\n{output}"
        self._config.write_text(shipped_config(self.port, dynsec, data_dir))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"mqtt://admin:{self.admin_password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [_program("mosquitto"), "-c", str(self._config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, self._process, self.log)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=20)
            self._process = None


class Session:
    """One MQTT v5 connection: its CONNACK, the broker's PUBACK reason codes, what it receives."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        *,
        will: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.port = port
        # A device's account is bound to its id as client id: by default, the username.
        self.client_id = client_id or username or unique("anonymous")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will, b"offline", qos=1, retain=True)
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self._pubacks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self.client.on_connect = lambda c, u, f, code, p: self.connacks.put(code)
        self.client.on_disconnect = lambda c, u, f, code, p: self.disconnects.put(code)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._subacks.put(list(codes))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, code: ReasonCode, props: Any) -> None:
        with self._acked:
            self._pubacks[mid] = code
            self._acked.notify_all()

    def open(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        code = self.connacks.get(timeout=10)
        if code.is_failure:
            self.close()
        return code

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """The broker's PUBACK reason code for one QoS-1 message."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            acked = self._acked.wait_for(lambda: info.mid in self._pubacks, timeout=10)
            assert acked, f"no PUBACK on {topic}"
            return int(self._pubacks.pop(info.mid).value)

    def subscribe(self, *filters: str) -> list[int]:
        self.client.subscribe([(f, 1) for f in filters])
        return [int(code.value) for code in self._subacks.get(timeout=10)]

    def receive_until(self, topic: str, payload: bytes, timeout: float = 10) -> list[tuple[str, bytes]]:
        """Everything received up to and including `payload` on `topic`."""
        received = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            received.append(item)
            if item == (topic, payload):
                return received


@contextmanager
def connected(port: int, username: str | None, password: str | None, **kwargs: Any) -> Iterator[Session]:
    session = Session(port, username, password, **kwargs)
    code = session.open()
    assert not code.is_failure, f"{username} could not connect: {code}"
    try:
        yield session
    finally:
        session.close()


def connack(port: int, username: str | None, password: str | None, *, client_id: str | None = None) -> int:
    session = Session(port, username, password, client_id=client_id)
    code = session.open()
    if not code.is_failure:
        session.close()
    return int(code.value)


# -- raw MQTT, for what paho will not send or cannot report -----------------------------------

CONNACK, PUBLISH, PUBACK, SUBACK, DISCONNECT = 2, 3, 4, 9, 14


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes((first,)) + bytes(encoded) + body


class RawMqtt:
    """One MQTT connection spoken byte by byte (`level` 5 or 4, that is 3.1.1), that reports the
    broker's answers exactly: the reason codes paho hides or takes for protocol errors."""

    def __init__(self, port: int, *, level: int = 5) -> None:
        self.level = level
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._reader = PacketReader()
        self._packets: list[tuple[int, int, bytes]] = []
        self._next_id = 0
        self.session_present = False

    def close(self) -> None:
        self.sock.close()

    def connect(
        self,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        *,
        clean: bool = True,
        session_expiry_s: int = 0,
    ) -> int:
        """The CONNACK's reason code (3.1.1: its return code)."""
        flags = (0x80 if username else 0) | (0x40 if password else 0) | (0x02 if clean else 0)
        head = _field(b"MQTT") + bytes((self.level, flags)) + (30).to_bytes(2, "big")
        if self.level == 5:
            properties = b"\x11" + session_expiry_s.to_bytes(4, "big") if session_expiry_s else b""
            head += bytes((len(properties),)) + properties
        body = head + _field(client_id.encode())
        body += _field(username.encode()) if username else b""
        body += _field(password.encode()) if password else b""
        self.sock.sendall(_packet(0x10, body))
        kind, _, answer = self.next_packet()
        assert kind == CONNACK, f"expected a CONNACK, got packet type {kind}"
        self.session_present = bool(answer[0] & 0x01)
        return answer[1]

    def subscribe(self, topic_filter: str, options: int = 1) -> int:
        """One SUBSCRIBE (`options`: QoS and, for MQTT 5, the other option bits); its SUBACK code."""
        self._next_id += 1
        body = self._next_id.to_bytes(2, "big") + (b"\x00" if self.level == 5 else b"")
        self.sock.sendall(_packet(0x82, body + _field(topic_filter.encode()) + bytes((options,))))
        kind, _, answer = self.next_packet()
        assert kind == SUBACK, f"expected a SUBACK, got packet type {kind}"
        return answer[-1]

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, send: int | None = None
    ) -> bytes:
        """A PUBLISH (QoS 1 or 2); only its first `send` bytes go out when given (the rest never)."""
        self._next_id += 1
        body = _field(topic.encode()) + self._next_id.to_bytes(2, "big")
        body += (b"\x00" if self.level == 5 else b"") + payload
        packet = _packet(0x30 | qos << 1 | int(retain), body)
        self.sock.sendall(packet if send is None else packet[:send])
        return packet

    def next_packet(self, timeout: float = 10) -> tuple[int, int, bytes]:
        """The next packet from the broker; (0, 0, b"") once it has closed the connection."""
        self.sock.settimeout(timeout)
        while not self._packets:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return 0, 0, b""
            self._packets.extend(self._reader.feed(data))
        return self._packets.pop(0)

    def answer(self) -> tuple[str, int | None]:
        """What the broker said to the last PUBLISH: ("puback", reason), ("disconnect", reason)
        or ("closed", None). A PUBACK without a reason code (3.1.1, or MQTT 5 success) is 0."""
        kind, _, body = self.next_packet()
        if kind == PUBACK:
            return "puback", body[2] if len(body) > 2 else 0
        if kind == DISCONNECT:
            return "disconnect", body[0] if body else 0
        return ("closed", None) if kind == 0 else (f"packet type {kind}", None)
