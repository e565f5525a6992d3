"""`ioc up`: the whole system in one process.

A service whose setting is unset runs embedded: `IOC_DATABASE_URL` unset starts a PostgreSQL
whose data lives under `IOC_DATA_DIR` (`./.ioc-data/`), `IOC_MQTT_URL` unset an MQTT broker on
127.0.0.1:1883, `IOC_KAFKA_BOOTSTRAP` unset the in-process log bus (kept on disk there too). Set, the real
service is used.
Without `IOC_ADMIN_API_KEY` an admin key is made on the first run, kept in the data directory and
printed with a link to the operations page that carries it.

Stopping (Ctrl-C or SIGTERM) goes in the order that leaves nothing half done: the simulator
stops, the broker hands what it holds to the gateway, the gateway stops taking telemetry, the
processor stores what the bus holds, then the rest stops. A killed process loses nothing the
gateway acknowledged either: the bus fsyncs a record before its send completes, and the next start
reads it back.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import SecretStr

from ioc.embedded.mqtt_broker import EmbeddedBroker
from ioc_core.bus import memory as memory_bus
from ioc_core.errors import ConfigurationError
from ioc_core.settings import Settings

log = logging.getLogger(__name__)

_ADMIN_KEY_FILE = "admin-api-key"
_DRAIN_TIMEOUT_S = 15.0
# How long `ioc up` waits for the API's live event stream before printing its link anyway.
_LIVE_EVENTS_WAIT_S = 30.0


def _admin_key(data_dir: Path) -> str:
    """The key made on the first run, or a new one (kept readable by the owner only)."""
    path = data_dir / _ADMIN_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        if key:
            return key
    key = "ioc_" + secrets.token_urlsafe(32)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _data_dir(settings: Settings) -> Path:
    data_dir = settings.data_dir.resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot use {data_dir} as IOC_DATA_DIR: {exc}") from exc
    return data_dir


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
        broker = await stack.enter_async_context(EmbeddedBroker("127.0.0.1", settings.embedded_mqtt_port))
        changes["mqtt_url"] = SecretStr(broker.url)
        embedded.append(f"MQTT broker at {broker.url}")
    if "kafka_bootstrap" not in given:
        bootstrap = f"{memory_bus.SCHEME}ioc"
        memory_bus.open_log(bootstrap, data_dir / "bus")
        stack.callback(memory_bus.forget, bootstrap)
        changes["kafka_bootstrap"] = bootstrap
        embedded.append(f"in-process log bus in place of Kafka, kept in {data_dir / 'bus'}")
    if "admin_api_key" not in given:
        changes["admin_api_key"] = SecretStr(_admin_key(data_dir))
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
        announce(_announcement(settings))
        await until_signalled(*waits)


async def _start_simulator(
    stack: contextlib.AsyncExitStack, settings: Settings
) -> Callable[[], Awaitable[None]]:
    from simulators.city import CitySimulator

    simulator = await stack.enter_async_context(
        CitySimulator(settings, city=settings.simulator_city, devices=settings.simulator_devices)
    )
    return simulator.wait


def _announcement(settings: Settings) -> str:
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"http://{host}:{settings.api_port}"
    key = settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
    lines = [
        f"IOC running: API on {base}",
        f"  operations page: {base}/#key={key}",
        f"  admin API key:   {key}",
    ]
    if settings.simulator_devices > 0:
        lines.append(f"  simulating {settings.simulator_devices} devices in {settings.simulator_city}")
    lines.append(f"  Ctrl-C stops everything; the data stays in {settings.data_dir}")
    return "\n".join(lines)
