"""The whole pipeline end to end, against the real services, measured against the broker's own speed.

    .venv/bin/python -m benchmarks.pipeline [--devices 1000,10000,100000] [--messages 200000]
        [--rate 40000] [--probes 150] [--steady-rate 2000] [--profile DIR] [--set IOC_NAME=VALUE ...]

For each fleet size, in one run, with a database, topic prefix and consumer group of its own:

1. **bare broker hop**: the load generator (`ioc simulate --load`'s) publishes `--messages` QoS 1
   messages at `--rate` to Mosquitto, and one `mosquitto_sub -q 1` takes them; the rate at which
   they arrived is what the broker carries on this machine with nothing else running;
2. **pipeline**: one `ioc gateway`, one `ioc processor` and one `ioc api` process (the topology of
   docker-compose.yml), the fleet registered and brought online first (one reading from every
   device, not counted: a city's steady state); the same load through them. The sustained stored rate
   is taken over the steady window (from 10 % to 90 % of the rows stored, not counting warm-up and
   drain); acknowledged (PUBACKs the load generator received) and stored (rows in the database)
   must be equal; peak RSS and CPU seconds per 1,000 readings of the gateway and the processor,
   and of the services and the load generator, with how busy the whole machine was;
   with pg_stat_statements loaded (services/timescaledb/postgresql.conf), the database's costliest
   statements per 1,000 readings, the WAL they wrote, and the readings insert path's share;
3. **latency**: background load at half the sustained rate, and a probe device publishing one
   reading at a time (paho, QoS 1); the time from its publish until `GET /v1/devices/{id}` shows
   it as the latest, p50 and p99, with the processor's mean time per batch in each phase of its
   batches (`ioc_processor_batch_seconds_total`); then the same under a fixed `--steady-rate`
   (2,000 readings/s unless told), the same load for every fleet size.

Prints one JSON object per fleet size. With `--profile DIR`, py-spy samples the gateway and the
processor during the pipeline phase and the hottest functions are printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.processor import delete_topics
from benchmarks.profiles import hottest, profiled
from benchmarks.statements import reset_statement_costs, statement_costs
from benchmarks.usage import Usage, peak_rss_mib
from ioc_core.models import DeviceIn, Location
from ioc_core.settings import MqttEndpoint, mqtt_endpoint
from ioc_core.storage import Database, drop_database, ensure_database
from processors.phases import PHASES
from simulators.fleet import build_fleet
from simulators.load import run_load

POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
KAFKA = os.environ.get("IOC_BENCH_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
MQTT_URL = os.environ.get("IOC_BENCH_MQTT_URL", "mqtt://127.0.0.1:1883")
PLACES = "ha-noi"
ADMIN_KEY = "bench-" + uuid.uuid4().hex
SECRETS_KEY = "vt5plXO1nnAf8gkxxHoVhJ7j0KXWn2kl_oA8PubrtSg="
_UNLIMITED = json.dumps({"rate": 1_000_000, "burst": 1_000_000})
SAMPLE_S = 0.25
# The components py-spy samples with --profile.
PROFILED = ("gateway", "processor")
WARM_UP_RATE = 5_000


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def endpoint() -> MqttEndpoint:
    return mqtt_endpoint(MQTT_URL, "IOC_BENCH_MQTT_URL")


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    process: subprocess.Popen[bytes]
    log: str
    health: str

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ioc {self.name} exited with {self.process.returncode}; log: {self.log}")


@dataclass
class Deployment:
    """One run's own database, topics, group and processes."""

    city: str
    env: dict[str, str]
    url: str
    components: dict[str, Component] = field(default_factory=dict)

    @classmethod
    def new(cls, settings: dict[str, str] | None = None) -> Deployment:
        run = uuid.uuid4().hex[:8]
        city = f"bench-{run}"
        url = f"{POSTGRES}/ioc_bench_{run}"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IOC_")},
            "IOC_DATABASE_URL": url,
            "IOC_KAFKA_BOOTSTRAP": KAFKA,
            "IOC_MQTT_URL": MQTT_URL,
            "IOC_TOPIC_PREFIX": f"bench-{run}.",
            "IOC_PROCESSOR_GROUP_ID": f"bench-processor-{run}",
            "IOC_GATEWAY_CITIES": json.dumps([city]),
            "IOC_GATEWAY_CLIENT_ID": f"ioc-bench-gw-{run}",
            "IOC_GATEWAY_SHARE_GROUP": f"bench-{run}",
            "IOC_GATEWAY_HEALTH_PORT": str(free_port()),
            "IOC_PROCESSOR_HEALTH_PORT": str(free_port()),
            "IOC_API_PORT": str(free_port()),
            "IOC_ADMIN_API_KEY": ADMIN_KEY,
            "IOC_SECRETS_KEY": SECRETS_KEY,
            "IOC_MQTT_SESSION_EXPIRY_S": "600",
            # Measures the telemetry path; the webhook worker has nothing to send here.
            "IOC_WEBHOOK_WORKER": "false",
            "IOC_LOG_LEVEL": "WARNING",
            **{f"IOC_API_RATE_LIMIT_{who}": _UNLIMITED for who in ("ADMIN", "ANONYMOUS")},
        }
        env.update(settings or {})
        return cls(city=city, env=env, url=url)

    def start(self, name: str, health_port_setting: str, ready_path: str = "/ready") -> None:
        log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "ioc.cli", name], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        health = f"http://127.0.0.1:{self.env[health_port_setting]}"
        self.components[name] = Component(name, process, log.name, health + ready_path)

    async def until_ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for component in self.components.values():
                deadline = time.monotonic() + 120
                while True:
                    component.alive()
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(component.health, timeout=2)).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ioc {component.name} not ready; log: {component.log}")
                    await asyncio.sleep(0.2)

    def stop(self) -> None:
        for component in self.components.values():
            component.process.terminate()
        for component in self.components.values():
            try:
                component.process.wait(30)
            except subprocess.TimeoutExpired:
                component.process.kill()
                component.process.wait()

    def pid(self, name: str) -> int:
        return self.components[name].process.pid


# -- the fleet ---------------------------------------------------------------------------------


async def register(deployment: Deployment, devices: int) -> float:
    """Migrate the run's database and register its fleet and the latency probe; seconds taken."""
    started = time.monotonic()
    await ensure_database(deployment.url)
    subprocess.run(
        [sys.executable, "-m", "ioc.cli", "migrate"], env=deployment.env, check=True, capture_output=True
    )
    fleet = [device.registration() for device in build_fleet(deployment.city, devices, places=PLACES)]
    probe = DeviceIn(
        id=probe_id(deployment),
        city=deployment.city,
        domain="flood",
        location=Location(lat=21.03, lon=105.85),
    )
    async with Database(deployment.url, max_size=2) as database:
        for first in range(0, len(fleet), 20_000):
            await database.devices.insert_many(fleet[first : first + 20_000])
        await database.devices.insert_many([probe])
    return time.monotonic() - started


def probe_id(deployment: Deployment) -> str:
    return f"probe-{deployment.city}"


# -- 1. the bare broker hop --------------------------------------------------------------------


def bare_hop(devices: int, messages: int, rate: float) -> dict[str, Any]:
    """The load generator → Mosquitto → one `mosquitto_sub -q 1`: messages a second it carried."""
    binary = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    city = f"hop-{uuid.uuid4().hex[:8]}"
    mqtt_at = endpoint()
    subscriber = subprocess.Popen(
        [
            binary,
            "-h",
            mqtt_at.host,
            "-p",
            str(mqtt_at.port),
            "-q",
            "1",
            "-C",
            str(messages),
            "-t",
            f"ioc/v1/{city}/#",
            "-F",
            "%t",
        ],
        stdout=subprocess.PIPE,
    )
    arrivals: list[float] = []

    def read() -> None:
        assert subscriber.stdout is not None
        for _ in subscriber.stdout:
            arrivals.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.0)  # the subscription is in place before anything is published
    summary = run_load(
        mqtt_at, city=city, devices=devices, rate=rate, duration=messages / rate, places=PLACES
    )
    # Everything the broker acknowledged reaches the subscriber; the load generator may have sent
    # fewer than asked (it stops at the run's duration), so `-C` alone may never be reached.
    deadline = time.monotonic() + 120
    while len(arrivals) < summary.acknowledged and time.monotonic() < deadline:
        time.sleep(0.05)
    subscriber.kill()
    reader.join(timeout=10)
    subscriber.wait()
    steady = steady_rate([(t, n + 1) for n, t in enumerate(arrivals)], len(arrivals))
    return {
        "hop_published": summary.sent,
        "hop_received": len(arrivals),
        "hop_publish_rate": round(summary.rate),
        "bare_hop_per_s": round(steady),
    }


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Rate between the samples where the count first reached 10 % and 90 % of `total`."""
    if total == 0 or not samples:
        return 0.0
    low = next(s for s in samples if s[1] >= 0.1 * total)
    high = next(s for s in samples if s[1] >= 0.9 * total)
    return (high[1] - low[1]) / max(high[0] - low[0], 1e-9)


# -- 2. throughput -----------------------------------------------------------------------------


async def metric(client: httpx.AsyncClient, health: str, name: str) -> float:
    return (await metrics(client, health, (name,)))[0]


async def metrics(client: httpx.AsyncClient, health: str, names: tuple[str, ...]) -> list[float]:
    """The samples named (with their labels, as the text format writes them), from one scrape."""
    response = await client.get(
        health.replace("/ready", "/metrics"), timeout=5, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    lines = response.text.splitlines()
    samples = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    missing = [name for name in names if name not in samples]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing from {health}")
    return [float(samples[name]) for name in names]


async def bring_online(deployment: Deployment, devices: int, rate: float) -> dict[str, Any]:
    """One reading from every device through the pipeline, not measured. A city's fleet is online
    and its processor warm in steady operation: without this pass the measured phase would also pay,
    once per device, for its first-seen status change (an event through the outbox) and for loading
    its state, a third of all readings at 100,000 devices and 300,000 messages."""
    started = time.monotonic()
    # Slow enough for the load generator to keep up beside the pipeline: run for long enough,
    # run_load sends every device's message in turn, int(rate * duration) in all.
    rate = min(rate, WARM_UP_RATE)
    summary = await asyncio.to_thread(
        run_load,
        endpoint(),
        city=deployment.city,
        devices=devices,
        rate=rate,
        duration=(devices + 0.5) / rate,
        places=PLACES,
    )
    async with Database(deployment.url, max_size=1) as database:
        deadline = time.monotonic() + 600
        while True:
            for component in deployment.components.values():
                component.alive()
            stored = await database.readings.count()
            waiting = await database.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            if stored >= summary.acknowledged and not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"warm-up: {stored} of {summary.acknowledged} stored, {waiting} events unsent"
                )
            await asyncio.sleep(SAMPLE_S)
    return {"warm_up_readings": stored, "warm_up_s": round(time.monotonic() - started, 1)}


async def throughput(
    deployment: Deployment, devices: int, messages: int, rate: float, *, stored_before: int
) -> dict[str, Any]:
    """The load through the pipeline; the steady stored rate and what it cost each component.
    `stored_before`: readings already in the database (the warm-up's), not counted."""
    usage = Usage()
    pids = {name: deployment.pid(name) for name in deployment.components}
    usage.mark(pids)
    load = asyncio.create_task(
        asyncio.to_thread(
            run_load,
            endpoint(),
            city=deployment.city,
            devices=devices,
            rate=rate,
            duration=messages / rate,
            places=PLACES,
        )
    )
    processor = deployment.components["processor"]
    samples: list[tuple[float, int]] = []
    offering = 0  # samples taken while the load generator still published
    async with httpx.AsyncClient() as client:
        while True:
            for component in deployment.components.values():
                component.alive()
            stored = int(await metric(client, processor.health, "ioc_processor_rows_written_total"))
            stored -= stored_before
            samples.append((time.monotonic(), stored))
            if not load.done():
                offering = len(samples)
            if load.done() and stored >= load.result().acknowledged:
                break
            if load.done() and len(samples) > 1 and time.monotonic() - _last_change(samples) > 60:
                break
            await asyncio.sleep(SAMPLE_S)
    summary = load.result()
    cpu = usage.since(pids)
    machine = cpu.pop("machine")
    async with Database(deployment.url, max_size=1) as database:
        rows = await database.readings.count() - stored_before
    return {
        "offered_rate": rate,
        "published": summary.sent,
        "acknowledged": summary.acknowledged,
        "stored": rows,
        "lost": summary.acknowledged - rows,
        "stored_per_s": round(steady_rate(samples, rows)),
        # The same while the load generator still published, from 10 % of the rows on: mostly the
        # steady window above comes after it, when the pipeline drains the broker's queue with
        # the generator's core free.
        "stored_per_s_while_offering": _rate_while_offering(samples[:offering], rows),
        "cpu_s_per_1000": {name: round(1000 * seconds / max(rows, 1), 3) for name, seconds in cpu.items()},
        # How much of the machine the whole run kept busy: near 1, the cores are the limit.
        "machine_busy": round(cpu["machine busy"] / max(machine, 1e-9), 2),
    }


def _rate_while_offering(samples: list[tuple[float, int]], total: int) -> int | None:
    window = [sample for sample in samples if sample[1] >= 0.1 * total]
    if len(window) < 2:
        return None
    (began, low), (ended, high) = window[0], window[-1]
    return round((high - low) / max(ended - began, 1e-9))


def _last_change(samples: list[tuple[float, int]]) -> float:
    last = samples[-1][1]
    for at, count in reversed(samples):
        if count != last:
            return at
    return samples[0][0]


# -- 3. latency --------------------------------------------------------------------------------


async def latency(deployment: Deployment, devices: int, rate: float, probes: int) -> dict[str, Any]:
    """Probe readings' publish → latest-in-the-API times under background load at `rate`."""
    halt = threading.Event()
    # The load runs until the last probe is seen (`halt`): a fixed length ran out while slow
    # probes still waited, and the probes after it measured an idle pipeline.
    duration = _LATENCY_LOAD_CAP_S
    background = asyncio.create_task(
        asyncio.to_thread(
            run_load,
            endpoint(),
            city=deployment.city,
            devices=devices,
            rate=rate,
            duration=duration,
            places=PLACES,
            stop=halt,
        )
    )
    processor = deployment.components["processor"]
    gateway = deployment.components["gateway"]
    backlog: list[float] = []
    try:
        await asyncio.sleep(5)  # the background load is steady before the first probe
        async with httpx.AsyncClient() as client:

            async def sample_backlog() -> None:
                # Messages the gateway holds unacknowledged: what a new reading queues behind there.
                while True:
                    backlog.append(await metric(client, gateway.health, "ioc_gateway_backlog"))
                    await asyncio.sleep(0.1)

            before = await metrics(client, processor.health, _BATCH_METRICS + _PHASE_METRICS)
            usage = Usage()
            pids = {name: deployment.pid(name) for name in deployment.components}
            usage.mark(pids)
            started = time.monotonic()
            sampler = asyncio.create_task(sample_backlog())
            try:
                times, acked, unseen = await _probe(deployment, probes)
            finally:
                sampler.cancel()
            after = await metrics(client, processor.health, _BATCH_METRICS + _PHASE_METRICS)
            elapsed = time.monotonic() - started
            cpu = usage.since(pids)
    finally:
        halt.set()
        await background
    changes = [b - a for a, b in zip(before, after, strict=True)]
    rows, batches = changes[: len(_BATCH_METRICS)]
    phase_seconds = changes[len(_BATCH_METRICS) :]
    return {
        # Below the background rate, the pipeline fell behind while probing: each probe then waits
        # behind a growing queue, and the percentiles say how long the probing lasted, not a tail.
        "stored_while_probing_per_s": round(rows / elapsed),
        # The processor's batches while probing: a reading waits for the batch in hand, then its own.
        "batches_per_s": round(batches / elapsed, 1),
        "mean_batch": round(rows / max(batches, 1)),
        # Where a batch's time went, mean milliseconds per batch (poll includes waiting for records).
        "batch_ms_by_phase": {
            phase: round(1000 * spent / max(batches, 1), 1)
            for phase, spent in zip(PHASES, phase_seconds, strict=True)
        },
        "gateway_backlog_mean": round(statistics.fmean(backlog), 1) if backlog else None,
        "gateway_backlog_max": max(backlog, default=None),
        "background_rate": round(rate),
        # Cores each process kept busy while probing (the load generator's line includes the
        # probe and its polling of the API), and the whole machine's busy share.
        "cores_while_probing": {
            name: round(seconds / elapsed, 2)
            for name, seconds in cpu.items()
            if not name.startswith("machine")
        },
        "machine_busy_while_probing": round(cpu["machine busy"] / max(cpu["machine"], 1e-9), 2),
        "probes": len(times),
        "probes_not_seen": unseen,
        **_percentiles("", times),
        # Split at the broker's PUBACK: the probe → Mosquitto, then Mosquitto → gateway → Kafka →
        # processor → database → API (the gateway acknowledges to the broker only after Kafka).
        **_percentiles("puback_", acked),
        **_percentiles("after_puback_", [t - a for t, a in zip(times, acked, strict=True)]),
    }


def _percentiles(prefix: str, seconds: list[float]) -> dict[str, float | None]:
    ordered = sorted(seconds)
    if not ordered:
        return {f"{prefix}p50_ms": None, f"{prefix}p99_ms": None, f"{prefix}max_ms": None}
    return {
        f"{prefix}p50_ms": round(1000 * statistics.median(ordered), 1),
        f"{prefix}p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        f"{prefix}max_ms": round(1000 * ordered[-1], 1),
    }


# Longest the background load of a latency phase runs, should the probes never end sooner.
_LATENCY_LOAD_CAP_S = 3600.0
# A probe not visible by then ends the probing; the pipeline fell behind its background load.
_PROBE_GIVE_UP_S = 30.0
# How often a probe asks the API: each GET costs the API and the probe, on the pipeline's cores
# (polling every 2 ms took 0.04 cores more than every 5 ms and added ~0.4 s to the saturated p50).
_PROBE_POLL_S = 0.005
_BATCH_METRICS = ("ioc_processor_rows_written_total", "ioc_processor_batches_total")
_PHASE_METRICS = tuple(f'ioc_processor_batch_seconds_total{{phase="{phase}"}}' for phase in PHASES)


async def _probe(deployment: Deployment, probes: int) -> tuple[list[float], list[float], int]:
    """Each probe's publish → visible time, and the part of it until the PUBACK: Mosquitto's, so
    the broker has it; the rest is the gateway's, Kafka's, the processor's and the API's."""
    api = f"http://127.0.0.1:{deployment.env['IOC_API_PORT']}"
    device = probe_id(deployment)
    topic = f"ioc/v1/{deployment.city}/flood/{device}/telemetry"
    times: list[float] = []
    acked: list[float] = []
    with _paho() as client:
        async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
            for seq in range(1, probes + 1):
                ts = datetime.now(UTC)
                payload = json.dumps({"ts": ts.isoformat(), "seq": seq, "currentLevel": 1.0 + seq / 1000})
                sent = time.monotonic()
                # Off the event loop: the backlog sampler runs beside the probe.
                await asyncio.to_thread(client.publish(topic, payload, qos=1).wait_for_publish, 10)
                puback = time.monotonic() - sent
                if not await _visible(http, device, ts, sent + _PROBE_GIVE_UP_S):
                    return times, acked, 1
                times.append(time.monotonic() - sent)
                acked.append(puback)
                await asyncio.sleep(0.2)
    return times, acked, 0


async def _visible(http: httpx.AsyncClient, device: str, ts: datetime, deadline: float) -> bool:
    """Whether the reading of `ts` became the device's latest in the API before `deadline`."""
    while True:
        body = (await http.get(f"/v1/devices/{device}", timeout=10)).json()
        latest = body.get("latest") or {}
        if latest.get("ts") and datetime.fromisoformat(latest["ts"]) >= ts:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_PROBE_POLL_S)


@contextlib.contextmanager
def _paho() -> Iterator[mqtt.Client]:
    mqtt_at = endpoint()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-probe-{uuid.uuid4().hex[:8]}")
    client.connect(mqtt_at.host, mqtt_at.port, 60)
    client.loop_start()
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def forget_session(client_id: str) -> None:
    """End the stopped gateway's MQTT session: it keeps its session when it stops, as a gateway
    restarting must, and Mosquitto would queue for it what was still being published and write
    that to disk every minute (its `autosave_interval`), slowing the broker in every later run."""
    mqtt_at = endpoint()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    client.connect(mqtt_at.host, mqtt_at.port, 60, clean_start=True, properties=properties)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()


def broker_store_bytes() -> int | None:
    """What Mosquitto holds for sessions now (its $SYS figure): more than a little means an
    earlier run left a session behind, and the broker is slower for it."""
    found: list[int] = []
    with _paho() as client:
        client.on_message = lambda _client, _data, message: found.append(int(message.payload))
        client.subscribe("$SYS/broker/store/messages/bytes")
        # Mosquitto publishes its $SYS figures retained.
        deadline = time.monotonic() + 5
        while not found and time.monotonic() < deadline:
            time.sleep(0.05)
    return found[0] if found else None


# -- the run -----------------------------------------------------------------------------------


async def one_size(devices: int, args: argparse.Namespace) -> dict[str, Any]:
    store_bytes = await asyncio.to_thread(broker_store_bytes)
    hop = await asyncio.to_thread(bare_hop, devices, args.messages, args.rate)
    deployment = Deployment.new(dict(setting.split("=", 1) for setting in args.set))
    figures: dict[str, Any] = {"devices": devices, "broker_store_bytes_at_start": store_bytes, **hop}
    try:
        figures["register_s"] = round(await register(deployment, devices), 1)
        deployment.start("gateway", "IOC_GATEWAY_HEALTH_PORT")
        deployment.start("processor", "IOC_PROCESSOR_HEALTH_PORT")
        deployment.start("api", "IOC_API_PORT")
        await deployment.until_ready()
        profile_dir = args.profile / f"{devices}" if args.profile else None
        figures.update(await bring_online(deployment, devices, args.rate))
        counting = await reset_statement_costs(deployment.url)
        with profiled({name: deployment.pid(name) for name in PROFILED}, profile_dir):
            figures.update(
                await throughput(
                    deployment, devices, args.messages, args.rate, stored_before=figures["warm_up_readings"]
                )
            )
        if counting:
            figures["database"] = await statement_costs(deployment.url, figures["stored"])
        figures["ratio_to_bare_hop"] = round(figures["stored_per_s"] / max(hop["bare_hop_per_s"], 1), 2)
        figures["peak_rss_mib"] = {
            name: round(peak_rss_mib(deployment.pid(name)), 1) for name in ("gateway", "processor")
        }
        half = figures["stored_per_s"] / 2
        figures["latency"] = await latency(deployment, devices, half, args.probes)
        if args.steady_rate:
            # A fixed background load, the same for every size and every version of the pipeline.
            figures["latency_at_steady_rate"] = await latency(
                deployment, devices, args.steady_rate, args.probes
            )
        if profile_dir is not None:
            figures["profile"] = {
                name: hottest(profile_dir / f"{name}.txt")
                for name in PROFILED
                if (profile_dir / f"{name}.txt").exists()
            }
    finally:
        deployment.stop()
        await asyncio.to_thread(forget_session, deployment.env["IOC_GATEWAY_CLIENT_ID"])
        await drop_database(deployment.url)
        await delete_topics(deployment.env["IOC_TOPIC_PREFIX"])
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", default="1000", help="fleet sizes, comma-separated")
    parser.add_argument("--messages", type=int, default=200_000, help="messages offered per phase")
    parser.add_argument("--rate", type=float, default=40_000, help="messages a second offered")
    parser.add_argument("--probes", type=int, default=150, help="latency probes")
    parser.add_argument(
        "--steady-rate",
        type=float,
        default=2_000,
        help="latency is also probed under this fixed background rate (0: not)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="write py-spy profiles here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="IOC_NAME=VALUE",
        help="a setting for the components (e.g. IOC_KAFKA_LINGER_MS=0), to measure its effect",
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.devices.split(",")]
    if any(not setting.startswith("IOC_") or "=" not in setting for setting in args.set):
        parser.error("--set takes IOC_NAME=VALUE")
    if args.messages < 1000 or args.rate <= 0 or any(size < 5 for size in sizes):
        parser.error("--messages at least 1000, --rate positive, fleets of at least 5 devices")
    for devices in sizes:
        print(json.dumps(await one_size(devices, args)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
