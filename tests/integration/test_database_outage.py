"""The database away under load: stopped for a minute, and hanging (connections accepted, nothing
answered). Processors pause without committing, crashing or spinning, their lag shows in
`/metrics`, the API answers 503 with `Retry-After`, and afterwards every reading the broker
acknowledged is stored exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import Figures
from tests.integration.conftest import ADMIN_HEADERS, ADMIN_KEY, free_port
from tests.integration.harness import SERVICES_SCRIPT, services, unique, wait_until
from tests.integration.systems import OwnSystem, own_system
from tests.integration.test_faults import publish_in_background

CITY = unique("dbout")[:32]
RATE = 500  # messages a second, as the issue that asked for this test sets it
OUTAGE_S = float(os.environ.get("IOC_TEST_DATABASE_OUTAGE_S", "60"))
HANG_S = 15.0
TIMEOUT_S = 3.0  # IOC_DATABASE_TIMEOUT_S of this system: a hanging server costs at most this


@pytest.fixture(scope="module")
async def outage_system(log_dir: Path) -> AsyncIterator[OwnSystem]:
    async with own_system(
        log_dir,
        "dbout",
        [CITY],
        IOC_PROCESSOR_HEALTH_PORT=str(free_port()),
        IOC_DATABASE_TIMEOUT_S=str(TIMEOUT_S),
        # Offline alarms would follow from readings that wait in Kafka; they are not the subject.
        IOC_OFFLINE_AFTER_S=json.dumps({"flood": 3600}),
    ) as system:
        yield system


@pytest.fixture(scope="module")
async def devices(outage_system: OwnSystem) -> list[str]:
    return await outage_system.register_devices(CITY, "flood", 50, "lvl")


def numbered_messages(
    devices: list[str], count: int, *, first: int, minutes_ago: float
) -> list[tuple[str, bytes]]:
    """`count` readings with `seq` from `first`, 5 ms apart from `minutes_ago`; the two tests take
    time ranges that cannot overlap in whichever order they run."""
    start = datetime.now(tz=UTC) - timedelta(minutes=minutes_ago)
    return [
        (
            f"ioc/v1/{CITY}/flood/{devices[i % len(devices)]}/telemetry",
            json.dumps(
                {
                    "ts": (start + timedelta(milliseconds=(i - first) * 5)).isoformat(),
                    "seq": i,
                    "currentLevel": 1 + i % 9 / 10,
                }
            ).encode(),
        )
        for i in range(first, first + count)
    ]


async def stored(database_url: str, devices: list[str]) -> tuple[int, int]:
    """Rows of these devices, and distinct (device, seq) among them."""
    connection = await asyncpg.connect(database_url, timeout=5)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS total, count(DISTINCT (device_id, seq)) AS distinct_"
            " FROM readings_flood WHERE device_id = ANY($1)",
            devices,
        )
        assert row is not None
        return int(row["total"]), int(row["distinct_"])
    finally:
        await connection.close()


async def processor_probe(system: OwnSystem) -> tuple[int, int]:
    """The processor's /ready status code and its summed lag from /metrics."""
    url = f"http://127.0.0.1:{system.env['IOC_PROCESSOR_HEALTH_PORT']}"
    async with httpx.AsyncClient(timeout=5) as client:
        ready = await client.get(f"{url}/ready")
        metrics = (await client.get(f"{url}/metrics", headers=ADMIN_HEADERS)).text
    lag = sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith("ioc_processor_lag{")
    )
    return ready.status_code, lag


async def api_answers_503(system: OwnSystem) -> httpx.Response | None:
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=TIMEOUT_S * 4
    ) as api:
        response = await api.get("/v1/devices", params={"limit": 1})
    return response if response.status_code == 503 else None


def check_unavailable(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.json()["status"] == 503


async def drained(system: OwnSystem, devices: list[str], total: int) -> tuple[int, int] | None:
    counts = await stored(system.database_url, devices)
    if counts[0] < total:
        return None
    _, lag = await processor_probe(system)
    return counts if lag == 0 else None


async def test_a_minute_without_the_database_under_load_loses_and_doubles_nothing(
    outage_system: OwnSystem, devices: list[str], figures: Figures
) -> None:
    system = outage_system
    processor = system.processes["processor"]
    warm_up_s, after_s = 5.0, 10.0
    total = int(RATE * (warm_up_s + OUTAGE_S + after_s))
    # What the hanging-database test stored, when it ran first (the order is not fixed).
    before = await stored(system.database_url, devices)
    publisher = publish_in_background(numbered_messages(devices, total, first=0, minutes_ago=10), rate=RATE)
    await wait_until(
        lambda: _some_stored(system, devices), timeout=30, what=f"the first readings stored\n{_logs(system)}"
    )
    await asyncio.to_thread(services, "stop", "timescaledb")
    stopped_at = time.monotonic()
    try:
        status = await wait_until(
            lambda: _not_ready(system), timeout=30, what="the processor's /ready turning 503"
        )
        assert status == 503
        check_unavailable(await wait_until(lambda: api_answers_503(system), timeout=30, what="the API's 503"))
        _, early_lag = await processor_probe(system)
        cpu_before = processor.cpu_seconds()
        sampled_at = time.monotonic()
        await asyncio.sleep(max(0.0, stopped_at + OUTAGE_S - time.monotonic()))
        cpu_share = (processor.cpu_seconds() - cpu_before) / (time.monotonic() - sampled_at)
        status, outage_lag = await processor_probe(system)
        assert status == 503
        # Read every 2 s from the broker's ends: it rises while nothing is stored.
        assert outage_lag > max(early_lag, 0), (early_lag, outage_lag)
        assert processor.running, processor.tail()
    finally:
        await asyncio.to_thread(services, "up")
    restarted_at = time.monotonic()
    counts = await wait_until(
        lambda: drained(system, devices, before[0] + total),
        timeout=240,
        what=f"all {total} readings stored and the lag gone\n{_logs(system)}",
        interval=0.5,
    )
    recovery_s = time.monotonic() - restarted_at
    await asyncio.to_thread(publisher.join, 60)
    assert not publisher.is_alive()
    stored_now = (counts[0] - before[0], counts[1] - before[1])
    assert stored_now == (total, total), f"stored {stored_now[0]} rows, {stored_now[1]} distinct, of {total}"
    assert all(p.running for p in system.processes.values()), _logs(system)
    # Nothing waits in a busy loop while the database is away (the consumer's fetching included).
    assert cpu_share < 0.25, f"the processor used {cpu_share:.0%} of a core while the database was down"
    figures.lines.append(
        f"database stopped {OUTAGE_S:.0f} s under {RATE} msg/s: processor lag at its end {outage_lag},"
        f" recovery (database back -> all {total} stored, lag 0) {recovery_s:.1f} s,"
        f" processor CPU {cpu_share:.0%} of a core meanwhile, lost 0, doubled 0"
    )


async def test_a_hanging_database_is_a_retriable_timeout(
    outage_system: OwnSystem, devices: list[str], figures: Figures
) -> None:
    system = outage_system
    rate = 200
    total = int(rate * (HANG_S + 10))
    first = 10_000_000  # seq numbers of their own, apart from the other test's
    new_devices_total = (await stored(system.database_url, devices))[0] + total
    publisher = publish_in_background(
        numbered_messages(devices, total, first=first, minutes_ago=5), rate=rate
    )
    with paused_timescaledb():
        hung_at = time.monotonic()
        status = await wait_until(
            lambda: _not_ready(system), timeout=TIMEOUT_S * 10, what="the processor's /ready turning 503"
        )
        assert status == 503
        asked_at = time.monotonic()
        response = await wait_until(
            lambda: api_answers_503(system), timeout=TIMEOUT_S * 10, what="the API's 503"
        )
        check_unavailable(response)
        answer_s = time.monotonic() - asked_at
        await asyncio.sleep(max(0.0, hung_at + HANG_S - time.monotonic()))
        assert all(p.running for p in system.processes.values()), _logs(system)
    resumed_at = time.monotonic()
    counts = await wait_until(
        lambda: drained(system, devices, new_devices_total),
        timeout=180,
        what=f"every reading stored after the database answers again\n{_logs(system)}",
        interval=0.5,
    )
    await asyncio.to_thread(publisher.join, 60)
    assert counts == (new_devices_total, new_devices_total)
    figures.lines.append(
        f"database hanging {HANG_S:.0f} s under {rate} msg/s: API answered 503 in {answer_s:.1f} s,"
        f" recovery {time.monotonic() - resumed_at:.1f} s, lost 0, doubled 0"
    )


@contextlib.contextmanager
def paused_timescaledb() -> Iterator[None]:
    """SIGSTOP the TimescaleDB server and its backends: the kernel still accepts connections,
    nothing answers them. SIGCONT on the way out, whatever happened."""
    pids = _server_pids()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _server_pids() -> list[int]:
    status = subprocess.run(
        ["bash", str(SERVICES_SCRIPT), "status"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    line = next(line for line in status.splitlines() if line.startswith("timescaledb"))
    assert "(pid " in line, f"TimescaleDB was not started by services.sh: {line}"
    postmaster = int(line.rsplit("(pid ", 1)[1].rstrip(")"))
    return [postmaster, *_children(postmaster)]


def _children(parent: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            yield int(entry.name)


async def _some_stored(system: OwnSystem, devices: list[str]) -> bool | None:
    return True if (await stored(system.database_url, devices))[0] >= RATE else None


async def _not_ready(system: OwnSystem) -> int | None:
    status, _ = await processor_probe(system)
    return status if status == 503 else None


def _logs(system: OwnSystem) -> str:
    return "\n".join(f"--- {name} ---\n{p.tail(15)}" for name, p in system.processes.items())
