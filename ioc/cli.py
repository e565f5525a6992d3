"""`ioc`: run the components, migrate the schema, import devices, simulate a city."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ioc_core import collector
from ioc_core.domains import DOMAINS
from ioc_core.errors import ConfigurationError, ConflictError, IocError, ValidationError
from ioc_core.exports import FORMATS
from ioc_core.http import HttpServer
from ioc_core.sealing import new_key
from ioc_core.settings import Settings, load_settings
from ioc_core.storage import Database, ensure_database
from ioc_core.supervision import describe
from ioc_core.telemetry import SYSTEM_CLIENT_PREFIX
from ioc_core.webhook_targets import setting_warnings
from simulators.scenarios import SCENARIOS

if TYPE_CHECKING:
    from delivery.worker import WebhookDispatcher
    from ioc_core.metrics import Metric

log = logging.getLogger("ioc")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # asyncpg's pool logs each failed attempt to reconnect, with a traceback; our supervision
    # already reports an outage once when it starts and once when it ends.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)


async def _until_signalled(*waitables: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGINT/SIGTERM, or for any component's own loop to end (then re-raise its error)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
    tasks = [asyncio.ensure_future(w()) for w in waitables]
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()
    finally:
        for task in [stopper, *tasks]:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(sig)


def _log_tasks() -> None:
    """SIGUSR1: log where every task of the process waits, for an operator asking "what is it
    stuck on?" of a process that still answers /health."""
    for task in asyncio.all_tasks():
        places: list[str] = []
        awaited: Any = task.get_coro()
        # Follow the chain of awaits down to where the task is suspended.
        while awaited is not None and len(places) < 40:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                places.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        log.warning("task %s waits in %s", task.get_name(), " -> ".join(places) or "(not started)")


@contextlib.asynccontextmanager
async def _health_server(
    settings: Settings,
    port: int,
    name: str,
    readiness: Callable[[], dict[str, str]],
    metrics: Callable[[], list[Metric]],
) -> AsyncIterator[None]:
    """A component's /health, /ready and /metrics; /metrics checks keys in the database through
    a pool of its own that connects only when a key is to be looked up."""
    from ioc_core.access import MetricsKeys
    from ioc_core.health import health_app
    from ioc_core.storage.api_keys import ApiKeyStore
    from ioc_core.storage.pool import Pool

    pool = Pool(
        settings.database_url.get_secret_value(),
        min_size=0,
        max_size=1,
        timeout_s=settings.database_timeout_s,
    )
    await pool.start()
    try:
        keys = MetricsKeys(
            settings.admin_api_key, ApiKeyStore(pool).by_hash, cache_s=settings.api_key_cache_s
        )
        async with HttpServer(
            health_app(readiness, metrics, keys), host=settings.api_host, port=port, name=name
        ):
            yield
    finally:
        await pool.stop()


async def run_gateway(settings: Settings) -> None:
    from ingest.gateway import Gateway

    _check_gateway_client_id(settings)
    async with Gateway(settings) as gateway:
        collector.settle()
        if settings.gateway_health_port == 0:
            await _until_signalled(gateway.wait)
            return
        async with _health_server(
            settings, settings.gateway_health_port, "gateway health", gateway.readiness, gateway.metrics
        ):
            await _until_signalled(gateway.wait)


def _check_gateway_client_id(settings: Settings) -> None:
    """A broker that takes the gateway's credentials binds each device account to its device id as
    client id; only the prefix no device id may have keeps a device from being bound to this one."""
    if settings.mqtt.username and not settings.gateway_client_id.startswith(SYSTEM_CLIENT_PREFIX):
        raise ConfigurationError(
            f"IOC_GATEWAY_CLIENT_ID must begin with {SYSTEM_CLIENT_PREFIX!r} when the gateway logs in to"
            f" the broker: a device registered as {settings.gateway_client_id!r} could take its session"
        )


async def run_processor(settings: Settings) -> None:
    from processors.telemetry import TelemetryProcessor

    async with contextlib.AsyncExitStack() as stack:
        processor = await stack.enter_async_context(TelemetryProcessor(settings))
        collector.settle()
        waits: list[Callable[[], Awaitable[None]]] = [processor.wait]
        readiness = [processor.readiness]
        if settings.webhook_worker:
            dispatcher = await _start_webhooks(stack, settings)
            waits.append(dispatcher.wait)
            readiness.append(dispatcher.readiness)
        if settings.processor_health_port:
            await stack.enter_async_context(
                _health_server(
                    settings,
                    settings.processor_health_port,
                    "processor health",
                    lambda: {k: v for ready in readiness for k, v in ready().items()},
                    processor.metrics,
                )
            )
        await _until_signalled(*waits)


async def run_webhooks(settings: Settings) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await _until_signalled((await _start_webhooks(stack, settings)).wait)


async def _start_webhooks(stack: contextlib.AsyncExitStack, settings: Settings) -> WebhookDispatcher:
    from delivery.worker import WebhookDispatcher

    return await stack.enter_async_context(WebhookDispatcher(settings))


async def run_api(settings: Settings) -> None:
    from api.server import ApiServer

    async with ApiServer(settings) as server:
        await _until_signalled(server.wait)


async def run_up(settings: Settings) -> None:
    from ioc.up import run_up as run_everything

    await run_everything(
        settings,
        migrate=migrate,
        until_signalled=_until_signalled,
        announce=lambda text: print(text, flush=True),
    )


async def migrate(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    await ensure_database(url)
    # With a key, webhook secrets in plain text (or sealed with an old key) are sealed with it.
    async with Database(url, max_size=2, sealer=settings.sealer_if_configured()) as database:
        tier = await database.migrate(
            retention=timedelta(days=settings.retention_days),
            compress_after=timedelta(days=settings.compress_after_days),
            reader_password=(
                settings.reader_db_password.get_secret_value() if settings.reader_db_password else None
            ),
            postgis=settings.postgis,
        )
    print(f"schema up to date (storage tier: {tier}, areas computed with {database.spatial})")


async def import_areas(settings: Settings, path: Path) -> int:
    from ioc.areas_file import read_areas

    areas, problems = read_areas(path, max_vertices=settings.area_max_vertices)
    for problem in problems:
        print(f"ioc areas import: {problem}", file=sys.stderr)
    if problems:
        print(f"ioc areas import: {len(problems)} bad features; nothing imported", file=sys.stderr)
        return 1
    async with Database(settings.database_url.get_secret_value(), max_size=2) as database:
        created = await database.areas.put_many(areas)
    new = sum(created.values())
    print(json.dumps({"created": new, "replaced": len(created) - new}))
    return 0


async def import_devices(settings: Settings, path: Path) -> int:
    from ioc.devices_file import read_devices

    devices, problems = read_devices(path)
    created = existing = 0
    async with Database(settings.database_url.get_secret_value(), max_size=2) as database:
        for device in devices:
            try:
                await database.devices.insert(device)
                created += 1
            except ConflictError:
                existing += 1
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(json.dumps({"registered": created, "already_registered": existing, "invalid": len(problems)}))
    return 1 if problems else 0


async def export_readings(settings: Settings, args: argparse.Namespace) -> int:
    """`ioc export`: a domain's readings (or per-device buckets of them) as CSV or Parquet, read
    from the database a chunk at a time, on `--out` or standard output."""
    from ioc_core.exports import check_range, choose_metrics, encoder, export_columns, parse_bucket

    check_range(args.start, args.end)
    chosen = choose_metrics(DOMAINS[args.domain], args.metrics)
    width = parse_bucket(args.bucket) if args.bucket is not None else None
    if args.format == "parquet" and args.out is None and sys.stdout.isatty():
        print("ioc export: Parquet is binary: give --out FILE or redirect standard output", file=sys.stderr)
        return 2
    encode = encoder(args.format, export_columns(chosen, bucketed=width is not None))
    # Written beside and renamed, so a failed export leaves no file that looks whole.
    partial = args.out.with_name(f".{args.out.name}.partial") if args.out is not None else None
    count = 0
    try:
        async with Database(settings.database_url.get_secret_value(), max_size=1) as database:
            sink = partial.open("wb") if partial is not None else contextlib.nullcontext(sys.stdout.buffer)
            with sink as out:
                out.write(encode.start())
                async with contextlib.aclosing(
                    database.readings.export(
                        domain=args.domain,
                        cities=[args.city] if args.city is not None else None,
                        start=args.start,
                        end=args.end,
                        metrics=[m.name for m in chosen],
                        bucket=width,
                        areas=args.area.split(",") if args.area else None,
                    )
                ) as rows:
                    async for chunk in rows:
                        out.write(encode.encode(chunk))
                        count += len(chunk)
                out.write(encode.finish())
                out.flush()
        if partial is not None:
            partial.replace(args.out)
    except BrokenPipeError:
        # As `ioc detect`: the reader stopped reading; keep the flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"ioc export: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    print(f"ioc export: {count} rows", file=sys.stderr)
    return 0


async def simulate(settings: Settings, args: argparse.Namespace) -> None:
    from simulators.progress import progress_display
    from simulators.simulate import simulate as run_simulation

    # Ctrl-C or SIGTERM ends the run early; the summary is printed all the same.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with progress_display(f"{args.city} {args.scenario}", args.duration) as progress:
        summary = await run_simulation(
            settings,
            city=args.city,
            devices=args.devices,
            rate=args.rate,
            duration=args.duration,
            scenario=args.scenario,
            register=args.register,
            api_url=args.api,
            places=args.places,
            truth=args.truth,
            seed=args.seed,
            load=args.load,
            processes=args.processes,
            progress=progress,
            stop=stop,
        )
    print(json.dumps(summary, ensure_ascii=False))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def detect(source: Path, out: Path | None, *, domain: str | None, metric: str | None) -> int:
    """`ioc detect`: the series replayed through the detectors, as CSV on `out` or stdout."""
    from processors.replay import replay_file, write_replayed

    try:
        rows, replayed = replay_file(source, domain=domain, metric=metric)
        if out is None:
            alarms = write_replayed(replayed, sys.stdout)
        else:
            # Written beside and renamed, so a failed run leaves no half-written result.
            partial = out.with_name(f".{out.name}.partial")
            with partial.open("w", encoding="utf-8", newline="") as text:
                alarms = write_replayed(replayed, text)
            partial.replace(out)
    except ValidationError as exc:
        print(f"ioc detect: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of standard output stopped reading (`| head`): nothing more to say. Python's
        # own advice: point stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"ioc detect: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"ioc detect: {rows} rows, {alarms} alarms raised", file=sys.stderr)
    return 0


def detect_scenario(args: argparse.Namespace) -> int:
    """`ioc detect --scenario`: the scenario replayed through the detectors and scored."""
    from ioc.scenario_check import replay_scenario, report_lines

    try:
        result = replay_scenario(
            args.scenario,
            city=args.city,
            devices=args.devices,
            rate=args.rate,
            duration_s=args.duration,
            places=args.places,
            seed=args.seed,
            start=args.start,
        )
    except ValueError as exc:
        print(f"ioc detect: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        print("\n".join(report_lines(result)))
    return 0


def detect_rules(args: argparse.Namespace) -> int:
    """`ioc detect --rules RULES.json --device ID`: proposed rules back-tested on stored history."""
    from ioc.backtest import backtest, report_lines

    if args.rules is None or args.device is None:
        print("ioc detect: --rules and --device go together", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        _configure_logging(settings.log_level)
        result = asyncio.run(backtest(settings, args.device, args.rules, days=args.days))
    except (ValidationError, ValueError) as exc:
        print(f"ioc detect: {exc}", file=sys.stderr)
        return 2
    except IocError as exc:
        print(f"ioc detect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        print("\n".join(report_lines(result)))
    return 0


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {text!r}") from exc
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give the instant's UTC offset, e.g. 2026-12-01T00:00:00+07:00")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ioc", description="Intelligent Operations Center streaming backend."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", help="run gateway, processor and API in one process")
    commands.add_parser("gateway", help="run one MQTT ingest gateway")
    commands.add_parser("processor", help="run one stream processor")
    commands.add_parser("api", help="run the HTTP API")
    commands.add_parser(
        "webhooks", help="run a webhook delivery worker on its own (processors run one by default)"
    )
    commands.add_parser("migrate", help="create or upgrade the database schema (safe to repeat)")
    commands.add_parser("settings", help="print the effective settings, secrets masked")
    commands.add_parser("secrets-key", help="print a new random key for IOC_SECRETS_KEY")
    devices = commands.add_parser("devices", help="manage the device registry")
    device_commands = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    importer = device_commands.add_parser("import", help="register devices from a GeoJSON FeatureCollection")
    importer.add_argument("file", type=Path, help="GeoJSON file with Point features")
    areas = commands.add_parser("areas", help="manage areas on the map (wards, catchments, zones)")
    area_commands = areas.add_subparsers(dest="areas_command", required=True, metavar="ACTION")
    area_importer = area_commands.add_parser(
        "import",
        help="store the areas of a GeoJSON FeatureCollection, replacing those of the same ids; all of"
        " them or, when any feature is bad, none",
    )
    area_importer.add_argument("file", type=Path, help="GeoJSON file with Polygon or MultiPolygon features")
    detect = commands.add_parser(
        "detect",
        help="replay a recorded series (CSV timestamp,value), or a simulated scenario, through the detectors",
    )
    detect.add_argument(
        "file", type=Path, nargs="?", help="CSV with a header naming timestamp and value (NAB's layout)"
    )
    detect.add_argument(
        "--out", type=Path, help="write timestamp,value,alarm,score here (default: standard output)"
    )
    detect.add_argument("--domain", help="replay as this domain's metric, with its default rules")
    detect.add_argument("--metric", help="the domain's metric the values are (with --domain)")
    scenario = detect.add_argument_group(
        "scenario", "instead of a FILE: a simulated city in simulated time, scored against its ground truth"
    )
    scenario.add_argument("--scenario", choices=sorted(SCENARIOS), help="what happens in the city")
    scenario.add_argument("--city", default="hai-phong", help="city slug (default: hai-phong)")
    scenario.add_argument("--places", metavar="CITY", help="lay the fleet out on this city's map")
    scenario.add_argument(
        "--devices", type=_positive_int, default=200, help="number of devices (default: 200)"
    )
    scenario.add_argument(
        "--rate", type=_positive_float, default=2.0, help="readings per second in total (default: 2)"
    )
    scenario.add_argument(
        "--duration", type=_positive_float, default=10800.0, help="simulated seconds (default: 10800)"
    )
    scenario.add_argument("--seed", type=int, default=7, help="the same seed gives the same fleet")
    scenario.add_argument(
        "--start", type=_instant, help="simulated start, ISO 8601 with an offset (default: now)"
    )
    scenario.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    backtesting = detect.add_argument_group(
        "rules", "instead of a FILE: proposed rules back-tested on a device's stored history (the database's)"
    )
    backtesting.add_argument(
        "--rules", type=Path, metavar="RULES.json", help="{metric: {key: value}}, as PUT /v1/rules takes"
    )
    backtesting.add_argument("--device", metavar="ID", help="the device whose history is replayed")
    backtesting.add_argument(
        "--days", type=_positive_float, default=7.0, help="how far back to replay (default: 7)"
    )
    exporter = commands.add_parser(
        "export", help="write a domain's readings, or per-device buckets of them, as CSV or Parquet"
    )
    exporter.add_argument("--domain", required=True, choices=sorted(DOMAINS), help="the domain to export")
    exporter.add_argument(
        "--from", dest="start", required=True, type=_instant, help="start, ISO 8601 with an offset"
    )
    exporter.add_argument(
        "--to", dest="end", required=True, type=_instant, help="end (exclusive), ISO 8601 with an offset"
    )
    exporter.add_argument("--city", help="only this city's devices (default: every city)")
    exporter.add_argument("--area", help="comma-separated area ids: only devices lying in one of them")
    exporter.add_argument("--metrics", help="comma-separated metrics (default: all of the domain's)")
    exporter.add_argument("--bucket", help="per device and bucket of this width: 30s, 5m, 1h, 1d")
    exporter.add_argument("--format", default="csv", choices=FORMATS, help="csv (default) or parquet")
    exporter.add_argument("--out", type=Path, help="write here (default: standard output)")
    sim = commands.add_parser("simulate", help="publish realistic telemetry over MQTT")
    sim.add_argument("--city", required=True, help="city slug, e.g. ha-noi")
    sim.add_argument("--devices", type=_positive_int, default=50, help="number of devices")
    sim.add_argument("--rate", type=_positive_float, default=10.0, help="messages per second in total")
    sim.add_argument("--duration", type=_positive_float, default=60.0, help="seconds to run")
    sim.add_argument(
        "--scenario",
        default="normal",
        choices=sorted(SCENARIOS),
        help="what happens in the city (timeline laid over --duration)",
    )
    sim.add_argument(
        "--register",
        action="store_true",
        help="register the fleet first (per-station limits) with the city's approximate wards and catchments",
    )
    sim.add_argument("--api", metavar="URL", help="register through this API (key in IOC_ADMIN_API_KEY)")
    sim.add_argument("--places", metavar="CITY", help="lay the fleet out on this city's map")
    sim.add_argument("--truth", type=Path, metavar="FILE", help="ground truth, JSON Lines")
    sim.add_argument("--seed", type=int, default=7, help="the same seed gives the same fleet")
    sim.add_argument("--load", action="store_true", help="load mode (also above 500 devices)")
    sim.add_argument("--processes", type=_positive_int, help="load mode: worker processes")
    return parser


def _needs_secrets_key(command: str, settings: Settings) -> bool:
    """Whether the command stores or opens webhook signing secrets (`ioc up` makes its own key)."""
    return command in ("api", "webhooks") or (command == "processor" and settings.webhook_worker)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "secrets-key":
        print(new_key())
        return 0
    if args.command == "detect" and (args.rules is not None or args.device is not None):
        return detect_rules(args)
    if args.command == "detect":
        # Needs no settings and no services: a replay is pure computation over a file.
        if (args.file is None) == (args.scenario is None):
            print("ioc detect: give a FILE or --scenario NAME, one of them", file=sys.stderr)
            return 2
        if args.scenario is not None:
            return detect_scenario(args)
        return detect(args.file, args.out, domain=args.domain, metric=args.metric)
    try:
        settings = load_settings()
        _configure_logging(settings.log_level)
        for warning in setting_warnings(settings):
            log.warning("%s", warning)
        command = args.command
        if command == "settings":
            print(json.dumps(settings.masked(), indent=2))
            return 0
        if _needs_secrets_key(command, settings):
            # Refused before anything starts, rather than once the other parts are running.
            settings.sealer()
        if command == "devices":
            return asyncio.run(import_devices(settings, args.file))
        if command == "export":
            return asyncio.run(export_readings(settings, args))
        if command == "areas":
            return asyncio.run(import_areas(settings, args.file))
        runners = {
            "up": run_up,
            "gateway": run_gateway,
            "processor": run_processor,
            "api": run_api,
            "webhooks": run_webhooks,
            "migrate": migrate,
        }
        if command == "simulate":
            asyncio.run(simulate(settings, args))
        else:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(runners[command](settings))
        return 0
    except IocError as exc:
        print(f"ioc {args.command}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"ioc {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Anything else is a defect; one line for the supervisor's log (the traceback is logged at
        # debug level), and a non-zero exit so that it starts a clean process.
        log.debug("ioc %s failed", args.command, exc_info=True)
        print(f"ioc {args.command}: unexpected failure: {describe(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
