"""Stream-processor throughput into the database, against the real services.

    .venv/bin/python -m benchmarks.processor [--readings 300000] [--devices 5000]

Creates a database of its own and registers the devices (spread over every domain), produces the
readings straight into Kafka under a topic prefix of its own (no MQTT, no gateway), then starts
one `ioc processor` process and prints, as JSON, the sustained rate at which readings became
rows: from the first stored row to the last, by polling the row count. The processor is a black
box here: only its settings, its topics and the rows it stores are used. The database and the
topics are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from ioc_core.bus import BusProducer, Topics, ensure_topics
from ioc_core.domains import DOMAINS
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, drop_database, ensure_database
from ioc_core.telemetry import Reading

POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
KAFKA = os.environ.get("IOC_BENCH_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
PARTITIONS = 6
INTERVAL = timedelta(seconds=10)
POLL_S = 0.2
TIMEOUT_S = 900


def device_ids(devices: int) -> list[tuple[str, str]]:
    """(device id, domain) pairs, the domains taking turns."""
    domains = list(DOMAINS)
    return [(f"bench-{i:05d}", domains[i % len(domains)]) for i in range(devices)]


def readings(devices: list[tuple[str, str]], count: int, city: str) -> list[Reading]:
    """`count` readings, every device in turn every 10 s, ending a minute ago, with each domain's
    simulated (in-band) values so that the processor sees ordinary traffic."""
    rng = random.Random(7)
    rounds = -(-count // len(devices))
    start = datetime.now(UTC) - timedelta(minutes=1) - rounds * INTERVAL
    phases = [rng.random() for _ in devices]
    result = []
    for index in range(count):
        slot, turn = divmod(index, len(devices))
        device_id, domain = devices[turn]
        ts = start + slot * INTERVAL + timedelta(milliseconds=turn % 10_000)
        metrics = DOMAINS[domain].sampler(rng, ts, phases[turn])
        result.append(
            Reading(
                device_id=device_id,
                city=city,
                domain=domain,
                ts=ts,
                seq=slot,
                metrics=metrics,
                received_at=ts,
            )
        )
    return result


async def register(url: str, devices: list[tuple[str, str]], city: str) -> None:
    location = Location(lat=21.03, lon=105.85)
    async with Database(url, max_size=8) as db:
        await db.migrate()
        for first in range(0, len(devices), 200):
            await asyncio.gather(
                *(
                    db.devices.insert(DeviceIn(id=device_id, city=city, domain=domain, location=location))
                    for device_id, domain in devices[first : first + 200]
                )
            )


async def produce(topics: Topics, batch: list[Reading]) -> float:
    """Put the readings on their domains' telemetry topics, keyed by device; returns seconds taken."""
    await ensure_topics(KAFKA, topics.all(), partitions=PARTITIONS)
    started = time.monotonic()
    async with BusProducer(KAFKA, linger_ms=20, client_id="bench-processor") as producer:
        pending = []
        for reading in batch:
            pending.append(
                await producer.send(
                    topics.telemetry(reading.domain), reading.to_bytes(), key=reading.device_id
                )
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    return time.monotonic() - started


async def delete_topics(prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def measure(url: str, env: dict[str, str], expected: int, core: int | None) -> dict[str, float]:
    log = tempfile.NamedTemporaryFile(prefix="bench-processor-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "ioc.cli", "processor"]
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    launched = time.monotonic()
    processor = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int]] = []
    peak_rss = 0
    try:
        async with Database(url, max_size=1) as db:
            while True:
                stored = await db.readings.count()
                now = time.monotonic()
                peak_rss = max(peak_rss, rss_kib(processor.pid))
                if stored:
                    samples.append((now, stored))
                if stored >= expected:
                    break
                if processor.poll() is not None:
                    raise RuntimeError(f"ioc processor exited with {processor.returncode}; log: {log.name}")
                if now - launched > TIMEOUT_S:
                    raise RuntimeError(
                        f"only {stored} of {expected} rows after {TIMEOUT_S} s; log: {log.name}"
                    )
                await asyncio.sleep(POLL_S)
    finally:
        processor.terminate()
        try:
            processor.wait(30)
        except subprocess.TimeoutExpired:
            processor.kill()
            processor.wait()
    (first_at, first_count), (last_at, last_count) = samples[0], samples[-1]
    span = max(last_at - first_at, 1e-9)
    # The steady part: between 10 % and 90 % of the rows, free of start-up and of the last batch.
    low = next(s for s in samples if s[1] >= 0.1 * expected)
    high = next(s for s in samples if s[1] >= 0.9 * expected)
    return {
        "startup_s": round(first_at - launched, 2),
        "first_to_last_row_s": round(span, 2),
        "sustained_rows_per_s": round((last_count - first_count) / span, 1),
        "steady_rows_per_s": round((high[1] - low[1]) / max(high[0] - low[0], 1e-9), 1),
        "peak_rss_mib": round(peak_rss / 1024, 1),
        "rows": last_count,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--readings", type=int, default=300_000)
    parser.add_argument("--devices", type=int, default=5_000)
    parser.add_argument(
        "--core", type=int, default=None, help="CPU core to pin the processor to (default: none)"
    )
    args = parser.parse_args()
    if args.readings < 1 or args.devices < 1:
        parser.error("--readings and --devices must be positive")

    run = uuid.uuid4().hex[:8]
    city = f"bench-{run}"
    topics = Topics(f"bench-{run}.")
    url = f"{POSTGRES}/ioc_bench_{run}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IOC_")},
        "IOC_DATABASE_URL": url,
        "IOC_KAFKA_BOOTSTRAP": KAFKA,
        "IOC_TOPIC_PREFIX": topics.prefix,
        "IOC_TOPIC_PARTITIONS": str(PARTITIONS),
        "IOC_PROCESSOR_GROUP_ID": f"bench-processor-{run}",
        # Measures the telemetry path alone.
        "IOC_WEBHOOK_WORKER": "false",
        "IOC_LOG_LEVEL": "WARNING",
    }
    devices = device_ids(args.devices)
    await ensure_database(url)
    try:
        started = time.monotonic()
        await register(url, devices, city)
        registered_s = time.monotonic() - started
        batch = readings(devices, args.readings, city)
        produced_s = await produce(topics, batch)
        del batch
        async with Database(url, max_size=1) as db:
            tier = await db.detect_tier()
        figures = await measure(url, env, args.readings, args.core)
        print(
            json.dumps(
                {
                    "benchmark": "processor throughput (one process, Kafka to database)",
                    "readings": args.readings,
                    "devices": args.devices,
                    "domains": len(DOMAINS),
                    "storage_tier": str(tier),
                    "register_s": round(registered_s, 2),
                    "produce_s": round(produced_s, 2),
                    **figures,
                }
            ),
            flush=True,
        )
    finally:
        await delete_topics(topics.prefix)
        await drop_database(url)


if __name__ == "__main__":
    asyncio.run(main())
