"""Helpers for tests that drive the real services: processes, MQTT publishing, bounded waits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

T = TypeVar("T")

MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883


class ComponentProcess:
    """One `ioc <command>` process with its log in a file, stopped with SIGTERM."""

    def __init__(self, command: str, env: dict[str, str], log_dir: Path, name: str | None = None) -> None:
        self.command = command
        self.name = name or command
        self.log_path = log_dir / f"{self.name}.log"
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self._env['IOC_GATEWAY_HEALTH_PORT']}"

    @property
    def pid(self) -> int:
        assert self._process is not None, f"ioc {self.command} is not running"
        return self._process.pid

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "ioc.cli", self.command],
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self._process is not None and self._process.poll() is not None:
                raise AssertionError(
                    f"ioc {self.command} exited with {self._process.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ioc {self.command} did not log {text!r} within {timeout}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        code = stop_process(self._process, sig, timeout)
        self._process = None
        return code


def stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> int | None:
    """Send `sig`, wait up to `timeout`, then kill; the exit code (None if there was no process)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


_UNLIMITED = json.dumps({"rate": 1_000_000, "burst": 1_000_000})
UNLIMITED_API_RATES = {
    f"IOC_API_RATE_LIMIT_{who}": _UNLIMITED for who in ("VIEWER", "OPERATOR", "ADMIN", "ANONYMOUS")
}
# The key webhook signing secrets are sealed with in tests.
SECRETS_KEY = "vt5plXO1nnAf8gkxxHoVhJ7j0KXWn2kl_oA8PubrtSg="


def test_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
    # Several processors run side by side in tests; those that read /ready or /metrics set a port.
    env["IOC_PROCESSOR_HEALTH_PORT"] = "0"
    # Tests of other things fire requests far faster than any screen (schemathesis, page tests,
    # polling waits, one admin key and one address for everything); test_rate_limits sets its own.
    env.update(UNLIMITED_API_RATES)
    # The API and the webhook workers refuse to start without it.
    env["IOC_SECRETS_KEY"] = SECRETS_KEY
    env.update(overrides)
    return env


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def publish(
    topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, properties: Properties | None = None
) -> None:
    """Publish one message and wait until the broker has acknowledged it; with `properties`, over
    MQTT 5."""
    protocol = mqtt.MQTTv5 if properties is not None else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("test-pub"), protocol=protocol)
    client.connect(MQTT_HOST, MQTT_PORT, 30)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"broker did not acknowledge the message on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


async def wait_until(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns something other than None; fail clearly after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = await probe()
        except Exception as exc:
            last_error = exc
            result = None
        if result is not None:
            return result
        await asyncio.sleep(interval)
    suffix = f" (last error: {last_error!r})" if last_error else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{suffix}")


class Publisher:
    """One MQTT connection publishing many QoS-1 messages, waiting for every broker ack."""

    def __init__(self, *, inflight: int = 200) -> None:
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("test-bulk"))
        self._client.max_inflight_messages_set(inflight)
        self._client.max_queued_messages_set(0)

    def __enter__(self) -> Publisher:
        self._client.connect(MQTT_HOST, MQTT_PORT, 30)
        self._client.loop_start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish_all(self, messages: list[tuple[str, bytes]], *, timeout: float = 60) -> None:
        infos = [self._client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge every message"


async def tail_topic(topic: str) -> AIOKafkaConsumer:
    """A started consumer of `topic` that sees what is produced from now on (the caller stops it)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers="127.0.0.1:9092", auto_offset_reset="latest", group_id=unique("test-tail")
    )
    await consumer.start()

    async def assigned() -> bool | None:
        await consumer.getmany(timeout_ms=200)
        return True if consumer.assignment() else None

    try:
        await wait_until(assigned, timeout=30, what=f"partitions of {topic} assigned")
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def delete_topics(prefix: str, bootstrap: str = "127.0.0.1:9092") -> None:
    """Remove the topics of one test run (named with its own prefix)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


SERVICES_SCRIPT = Path(__file__).resolve().parents[2] / "services" / "services.sh"


def services(*args: str) -> None:
    """Run `services.sh` (stop or start a real service, for fault tests)."""
    result = subprocess.run(
        ["bash", str(SERVICES_SCRIPT), *args], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, f"services.sh {' '.join(args)} failed:\n{result.stderr[-2000:]}"
