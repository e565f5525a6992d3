"""Brokers of a test's own: a private Mosquitto that can be restarted on its port and data
directory, a TCP proxy in front of it that can cut every connection and checks the MQTT packets
it carries, and a publisher that counts what the broker acknowledged."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.conftest import free_port
from tests.integration.harness import stop_process, unique

# The project's broker configuration: the private broker gets the same queue and inflight limits,
# without which Mosquitto drops QoS 1 messages of a slow subscriber silently.
PROJECT_CONF = Path(__file__).resolve().parents[2] / "services" / "mosquitto" / "mosquitto.conf"
_LISTENER = re.compile(r"^listener\s+1883\s+127\.0\.0\.1\s*$", re.MULTILINE)

PUBLISH, PUBACK = 3, 4
# A PUBACK reason code below 0x80 is a success; 0x10 says no one subscribed, the message is gone.
NO_MATCHING_SUBSCRIBERS = 0x10


def mosquitto_binary() -> str:
    # As services.sh finds it: distributions put the broker in sbin, which may not be on PATH.
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if found is None:
        raise AssertionError("no mosquitto binary; install it with `make services`")
    return found


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


class PrivateMosquitto:
    """A Mosquitto on a loopback port of its own, with its persistence in `directory`. Stopped
    with SIGTERM it writes its sessions and queued messages there, and started again it reads
    them back."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.data_dir = directory / "data"
        self.log_path = directory / "mosquitto.log"
        self.conf_path = directory / "mosquitto.conf"
        self._output_path = directory / "mosquitto.out"
        self._process: subprocess.Popen[bytes] | None = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        template = PROJECT_CONF.read_text()
        conf, listeners = _LISTENER.subn(f"listener {self.port} 127.0.0.1", template)
        assert listeners == 1, f"{PROJECT_CONF} no longer has the listener line this broker replaces"
        for placeholder, value in {
            "@PID_FILE@": directory / "mosquitto.pid",
            "@DATA_DIR@": f"{self.data_dir}/",
            "@LOG_FILE@": self.log_path,
        }.items():
            conf = conf.replace(placeholder, str(value))
        assert not re.search(r"@[A-Z_]+@", conf), (
            f"{PROJECT_CONF} has a placeholder this broker does not fill in"
        )
        self.conf_path.write_text(conf)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15) -> None:
        assert not self.running, "the private broker is already running"
        with self._output_path.open("ab") as output:
            # Configuration errors go to stderr before the log file is open.
            self._process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.conf_path)], stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self._process.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self._process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mosquitto not listening on {self.port} within {timeout}s:\n{self.tail()}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Stop the broker; on SIGTERM it saves its persistence file before it exits."""
        code = stop_process(self._process, sig, timeout)
        self._process = None
        return code

    def restart(self) -> None:
        code = self.stop()
        assert code == 0, f"mosquitto exited with {code} on SIGTERM:\n{self.tail()}"
        assert (self.data_dir / "mosquitto.db").exists(), "mosquitto saved no persistence file"
        self.start()

    def tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self._output_path, self.log_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


# -- MQTT packets on the wire --------------------------------------------------------------------


class PacketReader:
    """Splits one direction of an MQTT byte stream into (type, flags, body), however the bytes
    arrive: a packet may span reads, and one read may hold many packets."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        packets = []
        while True:
            parsed = self._next()
            if parsed is None:
                return packets
            packets.append(parsed)

    def _next(self) -> tuple[int, int, bytes] | None:
        buffer = self._buffer
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if index > 4:
                raise ValueError("malformed MQTT remaining length")
        if len(buffer) < index + length:
            return None
        header = buffer[0]
        body = bytes(buffer[index : index + length])
        del buffer[: index + length]
        return header >> 4, header & 0x0F, body


def publish_packet_id(flags: int, body: bytes) -> int | None:
    """The packet id of a PUBLISH, None at QoS 0 (which has none)."""
    if not (flags >> 1) & 0x03:
        return None
    topic_length = int.from_bytes(body[0:2], "big")
    return int.from_bytes(body[2 + topic_length : 4 + topic_length], "big")


@dataclass
class Link:
    """One client connection through the proxy, numbered in the order they were accepted."""

    number: int
    # Packet ids of QoS 1 messages the broker sent on this connection and the client has not
    # acknowledged on it yet.
    outstanding: set[int] = field(default_factory=set)
    publishes: int = 0
    redelivered: int = 0
    acks: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class MqttProxy:
    """A TCP proxy between one MQTT client and a broker, running in a thread of its own so the
    client's traffic flows whatever the test's event loop is doing.

    `cut()` aborts every current connection (the client sees its connection reset, the broker
    sees the client gone) and the proxy keeps accepting new ones. Every PUBACK the client sends
    is checked against the PUBLISHes the broker sent on the same connection: one naming a packet
    id that has no message awaiting its PUBACK there (never sent on that connection, or already
    acknowledged) is recorded in `violations`. An acknowledgement carried over from an earlier
    connection shows up so, at the latest when the message that took over its id is acknowledged
    a second time."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.links: list[Link] = []
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mqtt-proxy", daemon=True)

    def __enter__(self) -> MqttProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def cut(self, *, mid_delivery: bool = False, timeout: float = 10) -> int:
        """Abort every open connection; returns how many messages the broker had sent on them
        that the client had not acknowledged. With `mid_delivery` the cut waits for a moment
        when there are some, so that it always strands messages in flight."""
        future = asyncio.run_coroutine_threadsafe(self._cut(mid_delivery, timeout), self._loop)
        return future.result(timeout + 5)

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {
                "connections": len(self.links),
                "publishes": sum(link.publishes for link in self.links),
                "redelivered": sum(link.redelivered for link in self.links),
                "acks": sum(link.acks for link in self.links),
                "violations": len(self.violations),
            }

    def current(self) -> Link | None:
        """The newest connection while it is open."""
        with self._lock:
            if self.links and self.links[-1].writers and not self.links[-1].writers[0].is_closing():
                return self.links[-1]
        return None

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        # Each connection's handler ends once both its directions have seen the abort.
        await asyncio.wait_for(asyncio.gather(*self._handlers, return_exceptions=True), 10)

    async def _cut(self, mid_delivery: bool = False, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        # Checked and cut with no await in between: no packet moves in the meantime.
        while mid_delivery and not any(link.outstanding for link in self._open_links()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no message in flight through the proxy within {timeout}s")
            await asyncio.sleep(0.001)
        links = self._open_links()
        with self._lock:
            stranded = sum(len(link.outstanding) for link in links)
        for link in links:
            for writer in link.writers:
                # abort, not close: nothing buffered gets through, as when a network path fails.
                writer.transport.abort()
        return stranded

    def _open_links(self) -> list[Link]:
        with self._lock:
            return [link for link in self.links if any(not w.is_closing() for w in link.writers)]

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        with self._lock:
            link = Link(number=len(self.links) + 1, writers=[client_writer, broker_writer])
            self.links.append(link)
        await asyncio.gather(
            self._pump(link, broker_reader, client_writer, self._from_broker),
            self._pump(link, client_reader, broker_writer, self._from_client),
        )

    async def _pump(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        inspect: Callable[[Link, int, int, bytes], None],
    ) -> None:
        packets = PacketReader()
        try:
            while data := await reader.read(65536):
                # Inspected before it is passed on, so a PUBLISH is on record before its PUBACK.
                for packet in packets.feed(data):
                    inspect(link, *packet)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except ValueError as exc:
            with self._lock:
                self.violations.append(f"connection {link.number}: {exc}")
        finally:
            for other in link.writers:
                other.transport.abort()

    def _from_broker(self, link: Link, kind: int, flags: int, body: bytes) -> None:
        if kind != PUBLISH:
            return
        packet_id = publish_packet_id(flags, body)
        with self._lock:
            link.publishes += 1
            if flags & 0x08:
                link.redelivered += 1
            if packet_id is not None:
                link.outstanding.add(packet_id)

    def _from_client(self, link: Link, kind: int, flags: int, body: bytes) -> None:
        if kind != PUBACK:
            return
        packet_id = int.from_bytes(body[0:2], "big")
        with self._lock:
            link.acks += 1
            if packet_id in link.outstanding:
                link.outstanding.discard(packet_id)
            else:
                self.violations.append(
                    f"PUBACK of packet id {packet_id} on connection {link.number}, where no message"
                    " of that id was awaiting one (never sent on it, or acknowledged already)"
                )


# -- publishing ----------------------------------------------------------------------------------


@dataclass
class Delivery:
    """What the broker answered to each message of a publish run, by the message's index."""

    acked: set[int]
    refused: dict[int, int]
    no_subscribers: set[int]

    def __str__(self) -> str:
        return (
            f"{len(self.acked)} PUBACKed ({len(self.no_subscribers)} of them to no subscriber),"
            f" {len(self.refused)} refused"
        )


def publish_counted(
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    rate: float | None = None,
    timeout: float = 60,
) -> Delivery:
    """Publish QoS 1 messages on one MQTT 5 connection, at about `rate` a second if given, and
    return which the broker acknowledged, by their PUBACK reason codes."""
    lock = threading.Lock()
    codes: dict[int, int] = {}

    def on_publish(
        client: mqtt.Client, userdata: object, mid: int, reason: ReasonCode, props: object
    ) -> None:
        with lock:
            codes[mid] = reason.value

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("test-count"), protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 30)
    client.loop_start()
    infos: list[mqtt.MQTTMessageInfo] = []
    try:
        listed = list(messages)
        assert len(listed) < 65535, "packet ids would repeat within one run"
        step = max(1, int(rate / 20)) if rate else len(listed)
        started = time.monotonic()
        for first in range(0, len(listed), step):
            infos.extend(
                client.publish(topic, payload, qos=1) for topic, payload in listed[first : first + step]
            )
            if rate:
                ahead = started + (first + step) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        answered = {index: codes.get(info.mid) for index, info in enumerate(infos) if info.is_published()}
    return Delivery(
        acked={index for index, code in answered.items() if code is not None and code < 0x80},
        refused={index: code for index, code in answered.items() if code is not None and code >= 0x80},
        no_subscribers={index for index, code in answered.items() if code == NO_MATCHING_SUBSCRIBERS},
    )
