"""`ioc up`: the whole system in one process.

A service whose setting is unset runs embedded: `IOC_DATABASE_URL` unset starts a PostgreSQL
whose data lives under `IOC_DATA_DIR` (`./.ioc-data/`), `IOC_MQTT_URL` unset an MQTT broker on
127.0.0.1:1883, `IOC_KAFKA_BOOTSTRAP` unset the in-process log bus (kept on disk there too). Set, the real
service is used.
Without `IOC_ADMIN_API_KEY` an admin key is made on the first run, kept in the data directory and
printed with a link to the operations page that carries it; likewise `IOC_SECRETS_KEY`, the key
webhook signing secrets are sealed with. A viewer key for a wall screen is made too (kept there
and registered in the database) and printed in a link of its own. With the simulator on, its
city's approximate areas (generated wards, province and catchments) are stored at every start.

Stopping (Ctrl-C or SIGTERM) goes in the order that leaves nothing half done: the simulator
stops, the broker hands what it holds to the gateway, the gateway stops taking telemetry, the
processor stores what the bus holds, then the rest stops. A killed process loses nothing the
gateway acknowledged either: the bus fsyncs a record before its send completes, and the next start
reads it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import SecretStr

from ioc.embedded.mqtt_broker import EmbeddedBroker
from ioc_core.access import hash_key
from ioc_core.areas import parse_feature
from ioc_core.bus import memory as memory_bus
from ioc_core.errors import ConfigurationError
from ioc_core.sealing import new_key
from ioc_core.settings import Settings
from ioc_core.storage import Database
from ioc_core.telemetry import MAX_PAYLOAD_BYTES, TOPIC_ROOT

log = logging.getLogger(__name__)

_ADMIN_KEY_FILE = "admin-api-key"
# Room for the contract's largest payload with its topic and properties, and then as much again,
# so that a payload somewhat over the limit still reaches the gateway and its dead letter.
MAX_PACKET_BYTES = 2 * MAX_PAYLOAD_BYTES
_SECRETS_KEY_FILE = "secrets-key"
_VIEWER_KEY_FILE = "viewer-api-key"
_DRAIN_TIMEOUT_S = 15.0
# How long `ioc up` waits for the API's live event stream before printing its link anyway.
_LIVE_EVENTS_WAIT_S = 30.0


def _new_api_key() -> str:
    return "ioc_" + secrets.token_urlsafe(32)


def _read_kept(path: Path) -> str | None:
    if path.exists():
        return path.read_text().strip() or None
    return None


def _keep(path: Path, value: str) -> None:
    """Write a secret readable by the owner only, from its first byte on."""
    path.unlink(missing_ok=True)
    with open(path, "x", opener=lambda name, flags: os.open(name, flags, 0o600)) as file:
        file.write(value + "\n")


def _kept(data_dir: Path, name: str, make: Callable[[], str]) -> str:
    """The value made on the first run, or a new one."""
    path = data_dir / name
    value = _read_kept(path)
    if value is None:
        value = make()
        _keep(path, value)
    return value


async def _viewer_key(settings: Settings, data_dir: Path) -> str:
    """The wall screen's viewer key: the kept one while the database knows it (and it is not
    revoked), else a new one registered there."""
    path = data_dir / _VIEWER_KEY_FILE
    key = _read_kept(path)
    async with Database(settings.database_url.get_secret_value(), max_size=1) as database:
        if key is not None and await database.api_keys.by_hash(hash_key(key)) is not None:
            return key
        key = _new_api_key()
        await database.api_keys.create(
            key_id="key_" + secrets.token_hex(8),
            name="wall screen (ioc up)",
            role="viewer",
            cities=None,
            domains=None,
            key_hash=hash_key(key),
            created_by="ioc up",
        )
    _keep(path, key)
    return key


def _data_dir(settings: Settings) -> Path:
    data_dir = settings.data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot use {data_dir} as IOC_DATA_DIR: {exc}") from exc
    return data_dir


def embedded_broker(port: int, gateway_client_id: str, password: str) -> EmbeddedBroker:
    """The MQTT broker `ioc up` embeds, on loopback: packets over 128 KiB refused as the compose
    broker refuses them (a payload between 64 and 128 KiB reaches the gateway, which dead-letters
    it as the contract says), telemetry never kept as retained, and the gateway's client id taken
    only with `password`."""
    return EmbeddedBroker(
        "127.0.0.1",
        port,
        max_packet_size=MAX_PACKET_BYTES,
        protected_clients={gateway_client_id: password},
        unretained=[f"{TOPIC_ROOT}/+/+/+/telemetry"],
    )


async def _embed(
    stack: contextlib.AsyncExitStack, settings: Settings
) -> tuple[Settings, EmbeddedBroker | None]:
    """Start the services whose settings are unset; the settings that point at them, and the
    embedded broker if there is one."""
    given = settings.model_fields_set
    data_dir = _data_dir(settings)
    changes: dict[str, object] = {}
    embedded: list[str] = []
    broker: EmbeddedBroker | None = None
    if "database_url" not in given:
        from ioc.embedded.postgres import EmbeddedPostgres

        database = await stack.enter_async_context(
            EmbeddedPostgres(
                data_dir / "postgres",
                port=settings.embedded_postgres_port,
                port_setting="IOC_EMBEDDED_POSTGRES_PORT",
            )
        )
        changes["database_url"] = SecretStr(database.url)
        embedded.append(f"PostgreSQL at {database.display_url}")
    if "mqtt_url" not in given:
        # The broker takes anonymous clients, but the gateway's client id only with this run's
        # password: a client connecting with it would otherwise take the gateway's session over.
        password = secrets.token_urlsafe(24)
        broker = await stack.enter_async_context(
            embedded_broker(settings.embedded_mqtt_port, settings.gateway_client_id, password)
        )
        changes["mqtt_url"] = SecretStr(f"mqtt://ioc:{password}@127.0.0.1:{broker.port}")
        embedded.append(f"MQTT broker at {broker.url}")
    if "kafka_bootstrap" not in given:
        bootstrap = f"{memory_bus.SCHEME}ioc"
        memory_bus.open_log(bootstrap, data_dir / "bus")
        stack.callback(memory_bus.forget, bootstrap)
        changes["kafka_bootstrap"] = bootstrap
        embedded.append(f"in-process log bus in place of Kafka, kept in {data_dir / 'bus'}")
    if "admin_api_key" not in given:
        changes["admin_api_key"] = SecretStr(_kept(data_dir, _ADMIN_KEY_FILE, _new_api_key))
    if "secrets_key" not in given:
        changes["secrets_key"] = SecretStr(_kept(data_dir, _SECRETS_KEY_FILE, new_key))
    if embedded:
        log.info("embedded: %s", "; ".join(embedded))
    return settings.model_copy(update=changes), broker


async def run_up(
    settings: Settings,
    *,
    migrate: Callable[[Settings], Awaitable[None]],
    until_signalled: Callable[..., Awaitable[None]],
    announce: Callable[[str], None],
) -> None:
    from api.server import ApiServer
    from delivery.worker import WebhookDispatcher
    from ingest.gateway import Gateway
    from processors.telemetry import TelemetryProcessor

    async with contextlib.AsyncExitStack() as stack:
        settings, broker = await _embed(stack, settings)
        await migrate(settings)
        viewer_key = await _viewer_key(settings, settings.data_dir.resolve())
        if settings.simulator_devices > 0:
            await _store_simulated_areas(settings)
        processor = await stack.enter_async_context(TelemetryProcessor(settings))
        # Runs after everything entered below has stopped: what the bus holds is stored first.
        stack.push_async_callback(processor.drain, _DRAIN_TIMEOUT_S)
        waits: list[Callable[[], Awaitable[None]]] = [processor.wait]
        if settings.webhook_worker:
            waits.append((await stack.enter_async_context(WebhookDispatcher(settings))).wait)
        server = await stack.enter_async_context(ApiServer(settings))
        waits.append(server.wait)
        waits.append((await stack.enter_async_context(Gateway(settings))).wait)
        if broker is not None:
            # Stopped before the gateway: it hands what it still holds to the gateway, which
            # stores it, instead of losing it with its memory.
            stack.push_async_callback(broker.stop)
        if settings.simulator_devices > 0:
            waits.append(await _start_simulator(stack, settings))
        # The link is printed once the page works end to end, its live stream included; a bus
        # that is slow to answer delays it, a bus that does not answer only logs.
        if not await server.live_events_connected(_LIVE_EVENTS_WAIT_S):
            log.warning("the live event stream is not connected yet; the page will show it once it is")
        announce(_announcement(settings, viewer_key))
        await until_signalled(*waits)


async def _store_simulated_areas(settings: Settings) -> None:
    """The simulated city's approximate province, wards and catchments (generated from its places,
    labelled approximate), stored afresh at every start, so that the map has areas to show from the
    first run; real boundaries come in through `ioc areas import`, under ids of their own."""
    from simulators.cities import city_areas

    areas = [
        parse_feature(feature, max_vertices=settings.area_max_vertices)
        for feature in city_areas(settings.simulator_city)
    ]
    async with Database(settings.database_url.get_secret_value(), max_size=1) as database:
        await database.areas.put_many(areas)
    log.info("stored %d approximate areas of the simulated city %s", len(areas), settings.simulator_city)


async def _start_simulator(
    stack: contextlib.AsyncExitStack, settings: Settings
) -> Callable[[], Awaitable[None]]:
    from simulators.city import CitySimulator

    simulator = await stack.enter_async_context(
        CitySimulator(settings, city=settings.simulator_city, devices=settings.simulator_devices)
    )
    return simulator.wait


def _announcement(settings: Settings, viewer_key: str) -> str:
    """Printed, never logged: the keys stay out of log files. They travel in the URL fragment,
    which browsers do not send, so they stay out of access logs and Referer headers too."""
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::") else "127.0.0.1"
    scheme = "https" if settings.api_tls else "http"
    base = f"{scheme}://{host}:{settings.api_port}"
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    lines = [
        f"IOC running: API on {base}",
        f"  wall screen (viewer key, read only): {base}/#key={viewer_key}",
        f"  operations page (admin key):         {base}/#key={key}",
        f"  admin API key:                       {key}",
    ]
    if settings.simulator_devices > 0:
        lines.append(f"  simulating {settings.simulator_devices} devices in {settings.simulator_city}")
    lines.append(f"  Ctrl-C stops everything; the data stays in {settings.data_dir}")
    return "\n".join(lines)
