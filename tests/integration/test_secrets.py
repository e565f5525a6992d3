"""Secrets against the real services: webhook signing secrets sealed in the database (as the raw
column shows), sealed by `ioc migrate` when an earlier version stored them in plain text, sealed
again under a new key in a rotation, still signing deliveries; the API over HTTPS; and the
broker's TLS listener as the compose deployment configures it.

Each test has a database of its own, since keys differ between them."""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import certifi
import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography.fernet import Fernet, InvalidToken
from paho.mqtt.enums import CallbackAPIVersion
from standardwebhooks import Webhook as ReferenceVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from delivery.worker import WebhookDispatcher
from ioc_core.events import Event
from ioc_core.http import HttpServer
from ioc_core.sealing import SecretSealer, new_key
from ioc_core.settings import Settings
from ioc_core.storage import Database, ensure_database
from ioc_core.storage.webhooks import route_deliveries
from ioc_core.webhooks import WebhookFilter, new_secret, routed
from tests.integration import harness
from tests.integration.brokers import mosquitto_binary
from tests.integration.conftest import ADMIN_KEY, free_port
from tests.integration.harness import ComponentProcess, unique, wait_until
from tests.integration.systems import new_database

ROOT = Path(__file__).resolve().parents[2]
OLD, NEW, STRANGER = new_key(), new_key(), new_key()
CITY = unique("sealed")[:32]


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A new database with the schema, made in process (the same code as `ioc migrate`)."""
    async with new_database() as url:
        await ensure_database(url)
        async with Database(url, max_size=2) as database:
            await database.migrate()
        yield url


async def raw_secrets(url: str) -> dict[str, str]:
    """The `secret` column as stored, by endpoint id."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT id, secret FROM webhook_endpoints")
    finally:
        await connection.close()
    return {r["id"]: r["secret"] for r in rows}


async def plain_endpoint(url: str, endpoint_id: str, secret: str, target: str) -> None:
    """An endpoint as an earlier version stored it: its secret in plain text."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "INSERT INTO webhook_endpoints (id, url, secret, cities) VALUES ($1, $2, $3, $4)",
            endpoint_id,
            target,
            secret,
            [CITY],
        )
    finally:
        await connection.close()


def ioc(command: str, url: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = harness.test_env(IOC_DATABASE_URL=url, **settings)
    return subprocess.run(
        [sys.executable, "-m", "ioc.cli", command], env=env, capture_output=True, text=True, timeout=120
    )


def opens_with(key: str, sealed: str) -> str | None:
    try:
        return Fernet(key.encode()).decrypt(sealed.encode()).decode()
    except InvalidToken:
        return None


async def test_migrate_seals_plain_secrets_and_a_rotation_seals_them_again(database_url: str) -> None:
    plain, by_old = new_secret(), new_secret()
    await plain_endpoint(database_url, "wh_plain", plain, "https://203.0.113.7/a")
    async with Database(database_url, max_size=1, sealer=SecretSealer(OLD)) as database:
        await database.webhooks.create_endpoint(
            endpoint_id="wh_old",
            url="https://203.0.113.7/b",
            description=None,
            secret=by_old,
            webhook_filter=WebhookFilter(cities=[CITY]),
            created_by="test",
        )
    stored = await raw_secrets(database_url)
    assert stored["wh_plain"] == plain and opens_with(OLD, stored["wh_old"]) == by_old

    rotated = ioc("migrate", database_url, IOC_SECRETS_KEY=NEW, IOC_SECRETS_OLD_KEYS=OLD)
    assert rotated.returncode == 0, rotated.stderr
    assert "1 sealed that were in plain text, 1 sealed again with the current key" in rotated.stderr
    stored = await raw_secrets(database_url)
    for endpoint_id, secret in (("wh_plain", plain), ("wh_old", by_old)):
        raw = stored[endpoint_id]
        assert secret not in raw and secret.removeprefix("whsec_") not in raw and "whsec_" not in raw
        assert opens_with(NEW, raw) == secret and opens_with(OLD, raw) is None

    # Again: nothing left to do, nothing rewritten.
    again = ioc("migrate", database_url, IOC_SECRETS_KEY=NEW)
    assert again.returncode == 0 and "sealed again" not in again.stderr
    assert await raw_secrets(database_url) == stored

    # A key that opens none of them: refused in one line naming the endpoints, nothing changed.
    for command in ("migrate", "webhooks"):
        refused = ioc(command, database_url, IOC_SECRETS_KEY=STRANGER)
        assert refused.returncode == 1, refused.stderr
        [line] = [text for text in refused.stderr.splitlines() if text.startswith(f"ioc {command}:")]
        assert "wh_old, wh_plain" in line and "IOC_SECRETS_OLD_KEYS" in line
        assert "Traceback" not in refused.stderr
    assert await raw_secrets(database_url) == stored


class Receiver:
    """An agency's endpoint on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/hook", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def alarm_event() -> Event:
    return Event(
        id=f"7c1d2e3f-4a5b-4c6d-8e9f-{unique('e')[-12:]}",
        type="alarm.raised",
        subject="station-1",
        time=datetime.now(UTC),
        data={"id": 1, "city": CITY, "domain": "flood", "severity": "critical", "escalated": False},
    )


async def test_a_secret_sealed_by_the_migration_still_signs_deliveries(database_url: str) -> None:
    receiver = Receiver()
    plain = new_secret()
    await plain_endpoint(database_url, "wh_agency", plain, receiver.url)
    assert ioc("migrate", database_url, IOC_SECRETS_KEY=NEW).returncode == 0
    assert opens_with(NEW, (await raw_secrets(database_url))["wh_agency"]) == plain

    settings = Settings(
        database_url=database_url, secrets_key=NEW, webhook_allow_private=True, webhook_poll_s=0.2
    )
    async with HttpServer(receiver.app, host="127.0.0.1", port=receiver.port, name="agency"):
        async with Database(database_url, max_size=1) as database, database.pool.acquire() as connection:
            assert await route_deliveries(connection, routed([alarm_event()])) == 1
        async with WebhookDispatcher(settings):

            async def received() -> bool | None:
                return True if receiver.requests else None

            await wait_until(received, timeout=15, what="the delivery at the agency")
    [(headers, body)] = receiver.requests
    payload: dict[str, Any] = ReferenceVerifier(plain).verify(body, headers)
    assert payload["type"] == "alarm.raised" and payload["data"]["city"] == CITY


async def test_the_api_over_https_stores_new_secrets_sealed(database_url: str, tmp_path: Path) -> None:
    certificates = tmp_path / "tls"
    certificates.mkdir()
    made = subprocess.run(
        ["sh", str(ROOT / "deploy" / "tls" / "self-signed.sh"), "localhost", "127.0.0.1"],
        env={**os.environ, "TLS_DIR": str(certificates)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    env = harness.test_env(
        IOC_DATABASE_URL=database_url,
        IOC_ADMIN_API_KEY=ADMIN_KEY,
        IOC_API_PORT=str(port),
        IOC_SECRETS_KEY=NEW,
        IOC_API_TLS_CERT_FILE=str(certificates / "api.crt"),
        IOC_API_TLS_KEY_FILE=str(certificates / "api.key"),
        IOC_WEBHOOK_ALLOW_PRIVATE="true",
    )
    api = ComponentProcess("api", env, tmp_path, name="api-tls")
    api.start()
    try:
        await api.wait_for_log(f"API listening on https://127.0.0.1:{port}")
        trusted = ssl.create_default_context(cafile=str(certificates / "ca.crt"))
        async with httpx.AsyncClient(
            base_url=f"https://localhost:{port}", verify=trusted, headers={"X-API-Key": ADMIN_KEY}, timeout=10
        ) as client:
            assert (await client.get("/ready")).status_code == 200
            created = await client.post(
                "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "filter": {"cities": [CITY]}}
            )
            assert created.status_code == 201, created.text
        hook = created.json()
        raw = (await raw_secrets(database_url))[hook["id"]]
        assert hook["secret"] not in raw and "whsec_" not in raw
        assert opens_with(NEW, raw) == hook["secret"]
        async with httpx.AsyncClient(timeout=5) as plain_http:
            with pytest.raises(httpx.HTTPError):
                await plain_http.get(f"http://127.0.0.1:{port}/ready")
    finally:
        api.stop()


def _tls_listener_block(port: int, certificates: Path) -> str:
    """The broker configuration's TLS listener, as deploy/mosquitto/mosquitto.conf has it, on a
    loopback port of this test and with its certificate files."""
    lines = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
    start = lines.index("listener 8883")
    block = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("#"):
            break
        block.append(line)
    text = "\n".join(block).replace("listener 8883", f"listener {port} 127.0.0.1")
    assert "/mosquitto/certs/" in text, text
    return text.replace("/mosquitto/certs/", f"{certificates}/")


def _connack(port: int, ca_file: Path | None) -> int | str:
    """The CONNACK reason of a TLS connection (trusting `ca_file`), or why there was none."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("tls"), protocol=mqtt.MQTTv5)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    answered = threading.Event()
    outcome: list[int | str] = []

    def on_connect(*args: Any) -> None:
        outcome.append(args[3].value)
        answered.set()

    client.on_connect = on_connect
    # A broker that closes the connection instead of answering ends the wait at once.
    client.on_disconnect = lambda *args: answered.set()
    try:
        client.connect("localhost", port, 10)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0] if outcome else "no CONNACK"


def _start_broker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([mosquitto_binary(), "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)


async def test_the_brokers_tls_listener_as_deployed(tmp_path: Path) -> None:
    certificates = tmp_path / "certs"
    certificates.mkdir()
    made = subprocess.run(
        ["sh", str(ROOT / "deploy" / "tls" / "self-signed.sh"), "localhost"],
        env={**os.environ, "TLS_DIR": str(certificates)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    # Authentication is the device-credentials tests' subject; here, only the transport. `user`:
    # run as whoever runs the tests, since the broker reads its certificate files after dropping
    # to its own user (which is why the deployment's key must be readable by uid 1883).
    config.write_text(
        f"{_tls_listener_block(port, certificates)}\nallow_anonymous true\nuser {getpass.getuser()}\n"
        "log_dest stderr\n"
    )
    log = tmp_path / "mosquitto.log"
    broker = _start_broker(config, log)
    try:

        async def listening() -> bool | None:
            assert broker.poll() is None, log.read_text()
            with socket.socket() as probe:
                return True if probe.connect_ex(("127.0.0.1", port)) == 0 else None

        await wait_until(listening, timeout=15, what="the TLS listener")
        assert await asyncio.to_thread(_connack, port, certificates / "ca.crt") == 0
        # Without the deployment's CA a client refuses the broker's certificate, and plain MQTT
        # gets no answer on the TLS port.
        untrusted = await asyncio.to_thread(_connack, port, Path(certifi.where()))
        assert untrusted == "SSLCertVerificationError"
        assert await asyncio.to_thread(_connack, port, None) != 0
    finally:
        broker.terminate()
        broker.wait(timeout=10)
