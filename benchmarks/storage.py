"""The storage tiers measured against real servers, in two modes.

The write path (the default): the processor's writes to the real TimescaleDB, piece by piece: what
the readings' insert costs, what their hypertable's time index adds to it, and what the per-device
rows (latest state, detector state) add as the fleet grows.

    .venv/bin/python -m benchmarks.storage [--devices 1000,100000] [--readings 200000] [--batch 2000]

For each fleet size and each variant, a database of its own (removed at the end) with the fleet
registered; the same readings (every device in turn, every 10 s, each domain's simulated values)
written in batches of `--batch`, one transaction each, as the processor writes a poll of the bus:

- `readings`: the readings alone (`insert_readings`: binary COPY into staging, one INSERT ... SELECT);
- `readings, no time index`: the same with the hypertables' `ts` index dropped (the primary key
  (device_id, ts) stays: it is what makes a redelivered reading a no-op);
- `batch`: readings, latest state per device and statuses (`BatchTransaction.write`);
- `batch + detector state`: also each device's detector state, as detection leaves it.

Prints one JSON object per fleet size: rows a second and milliseconds per 1,000 readings of each.

The read side (`--history`): what weeks of history cost on each tier, on disk and to read; see
`benchmarks/storage_history.py`.

    .venv/bin/python -m benchmarks.storage --history [--tiers community,apache,postgres]
        [--devices 1000] [--days 14] [--domain water] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson

from benchmarks.processor import device_ids, readings
from benchmarks.storage_history import HISTORY_SERVERS, history_tier
from ioc_core.domains import DOMAINS
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, TelemetryBatch, drop_database, ensure_database
from ioc_core.storage.readings import insert_readings
from ioc_core.telemetry import Reading
from processors.detection import DeviceDetection, DeviceDetectorState, DeviceProfile

POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
CITY = "ha-noi"

Variant = Callable[[Database, list[Reading]], Awaitable[None]]


async def _readings_only(database: Database, batch: list[Reading]) -> None:
    async with database.transaction() as transaction:
        await insert_readings(transaction.connection, batch)


async def _whole_batch(database: Database, batch: list[Reading]) -> None:
    async with database.transaction() as transaction:
        await transaction.write(TelemetryBatch(records=[(r, hash(r.device_id) % 6) for r in batch]))


def _detector_states(batch: list[Reading]) -> dict[str, str]:
    """Each device's detector state as detection leaves it after the device's readings."""
    detection = DeviceDetection()
    by_device: dict[str, list[Reading]] = {}
    for reading in batch:
        by_device.setdefault(reading.device_id, []).append(reading)
    states = {}
    for device_id, device_readings in by_device.items():
        first = device_readings[0]
        profile = DeviceProfile.of(
            id=device_id, city=first.city, domain=first.domain, name=None, district=None, thresholds={}
        )
        state = DeviceDetectorState.from_json({})
        detection.evaluate(profile, device_readings, state)
        states[device_id] = orjson.dumps(state.to_json()).decode()
    return states


async def _batch_and_states(database: Database, batch: list[Reading]) -> None:
    states = _detector_states(batch)
    async with database.transaction() as transaction:
        await transaction.write(TelemetryBatch(records=[(r, hash(r.device_id) % 6) for r in batch]))
        await transaction.save_detector_states(states, {})


async def _drop_time_indexes(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        for domain in DOMAINS.values():
            names = await connection.fetch(
                "SELECT indexname FROM pg_indexes WHERE tablename = $1 AND indexname NOT LIKE '%pkey'",
                domain.table,
            )
            for row in names:
                await connection.execute(f'DROP INDEX "{row["indexname"]}"')
    finally:
        await connection.close()


VARIANTS: dict[str, tuple[Variant, bool]] = {
    "readings": (_readings_only, False),
    "readings, no time index": (_readings_only, True),
    "batch": (_whole_batch, False),
    "batch + detector state": (_batch_and_states, False),
}


async def one_variant(
    devices: list[tuple[str, str]], rows: list[Reading], size: int, variant: Variant, drop_index: bool
) -> dict[str, float]:
    url = f"{POSTGRES}/ioc_bench_storage_{uuid.uuid4().hex[:8]}"
    await ensure_database(url)
    try:
        async with Database(url, max_size=2) as database:
            await database.migrate()
            location = Location(lat=21.03, lon=105.85)
            fleet = [DeviceIn(id=d, city=CITY, domain=domain, location=location) for d, domain in devices]
            for first in range(0, len(fleet), 20_000):
                await database.devices.insert_many(fleet[first : first + 20_000])
            if drop_index:
                await _drop_time_indexes(url)
            batches = [rows[i : i + size] for i in range(0, len(rows), size)]
            # The first tenth warms the caches and the chunks up; the rest is timed.
            warm = max(1, len(batches) // 10)
            for batch in batches[:warm]:
                await variant(database, batch)
            timed = sum(len(b) for b in batches[warm:])
            started = time.perf_counter()
            for batch in batches[warm:]:
                await variant(database, batch)
            seconds = time.perf_counter() - started
    finally:
        await drop_database(url)
    return {"rows_per_s": round(timed / seconds), "ms_per_1000": round(1000 * seconds * 1000 / timed, 1)}


# -- the read side (--history) --------------------------------------------------------------------


async def write_path(devices: str, count: int, batch: int) -> None:
    for size in (int(n) for n in devices.split(",")):
        fleet = device_ids(size)
        rows = readings(fleet, count, CITY)
        # Readings stamped up to the minute before now: all inside the hypertables' first chunks.
        assert rows[-1].ts - rows[0].ts < timedelta(days=30)
        figures: dict[str, Any] = {"devices": size, "readings_written": len(rows), "batch_size": batch}
        for name, (variant, drop_index) in VARIANTS.items():
            figures[name] = await one_variant(fleet, rows, batch, variant, drop_index)
        print(json.dumps(figures), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices",
        help="fleet sizes, comma-separated (default 1000,100000); with --history one size (default 1000)",
    )
    parser.add_argument("--readings", type=int, default=200_000, help="readings written per variant")
    parser.add_argument("--batch", type=int, default=2000, help="readings per transaction")
    parser.add_argument("--history", action="store_true", help="measure the read side instead")
    parser.add_argument("--tiers", default=",".join(HISTORY_SERVERS), help="with --history: tiers to measure")
    parser.add_argument("--days", type=int, default=14, help="with --history: days of readings")
    parser.add_argument("--domain", default="water", choices=sorted(DOMAINS), help="with --history")
    parser.add_argument("--repeat", type=int, default=5, help="with --history: timed runs of each query")
    args = parser.parse_args()
    random.seed(7)
    if not args.history:
        await write_path(args.devices or "1000,100000", args.readings, args.batch)
        return
    tiers = args.tiers.split(",")
    unknown = set(tiers) - set(HISTORY_SERVERS)
    if unknown:
        parser.error(f"unknown tiers {sorted(unknown)}; known: {', '.join(HISTORY_SERVERS)}")
    if args.days < 1 or args.repeat < 1:
        parser.error("--days and --repeat must be at least 1")
    devices = int(args.devices or 1000)
    for server in tiers:
        figures = await history_tier(server, DOMAINS[args.domain], devices, args.days, args.repeat)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
