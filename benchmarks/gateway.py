"""Gateway throughput and memory, against the real services.

    .venv/bin/python -m benchmarks.gateway [--messages 100000] [--devices 1000] [--outage-s 60]

Starts one `ioc gateway` process pinned to one core, floods it over MQTT from another process,
and prints the sustained rate at which the gateway validated, produced to Kafka and acknowledged
messages. With `--outage-s`, it then stops Kafka, keeps publishing for that long, and prints the
gateway's resident memory and backlog while Kafka is down, then restarts Kafka and waits for the
backlog to drain.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, drop_database, ensure_database

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services" / "services.sh"
POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
# The gateway's /metrics takes the admin key of its settings without asking the database.
METRICS_KEY = secrets.token_urlsafe(24)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def payloads(city: str, devices: int, count: int) -> list[tuple[str, bytes]]:
    start = datetime.now(tz=UTC) - timedelta(minutes=4)
    return [
        (
            f"ioc/v1/{city}/traffic/bench-{i % devices:05d}/telemetry",
            json.dumps(
                {
                    "ts": (start + timedelta(microseconds=i * 100)).isoformat(),
                    "seq": i,
                    "intensity": 12.5,
                    "occupancy": 0.31,
                    "averageVehicleSpeed": 42.0,
                }
            ).encode(),
        )
        for i in range(count)
    ]


def publish(messages: list[tuple[str, bytes]], rate: float | None) -> None:
    """Publish with QoS 1 (optionally paced), waiting for every broker ack."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", 1883, 60)
    client.loop_start()
    started = time.monotonic()
    infos: collections.deque[mqtt.MQTTMessageInfo] = collections.deque()
    for index, (topic, payload) in enumerate(messages):
        # paho numbers messages with 16 bits: never have more than a fraction of that outstanding.
        while len(infos) >= 20_000:
            infos.popleft().wait_for_publish(timeout=120)
        infos.append(client.publish(topic, payload, qos=1))
        if rate is not None and index % 100 == 0:
            ahead = index / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(timeout=120)
    client.disconnect()
    client.loop_stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    text = (
        await client.get(f"{url}/metrics", timeout=5, headers={"Authorization": f"Bearer {METRICS_KEY}"})
    ).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} missing")


async def register(url: str, city: str, devices: int) -> None:
    """Register the benchmark's traffic devices in `city`."""
    location = Location(lat=21.03, lon=105.85)
    async with Database(url, max_size=8) as db:
        ids = [f"bench-{i:05d}" for i in range(devices)]
        await asyncio.gather(
            *(db.devices.insert(DeviceIn(id=i, city=city, domain="traffic", location=location)) for i in ids)
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--outage-s", type=float, default=0, help="stop Kafka this long under load (0: skip)")
    parser.add_argument(
        "--outage-rate", type=float, default=2_000, help="messages/s published during the outage"
    )
    parser.add_argument("--core", type=int, default=1, help="CPU core the gateway is pinned to")
    args = parser.parse_args()

    city = f"bench-{uuid.uuid4().hex[:6]}"
    database = f"ioc_bench_{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES}/{database}"
    await ensure_database(url)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IOC_")},
        "IOC_DATABASE_URL": url,
        "IOC_GATEWAY_CITIES": json.dumps([city]),
        "IOC_GATEWAY_CLIENT_ID": f"bench-gw-{city}",
        "IOC_GATEWAY_SHARE_GROUP": f"bench-{city}",
        "IOC_TOPIC_PREFIX": f"bench-{city}.",
        "IOC_GATEWAY_HEALTH_PORT": str(port),
        "IOC_ADMIN_API_KEY": METRICS_KEY,
        "IOC_MQTT_SESSION_EXPIRY_S": "600",
        "IOC_LOG_LEVEL": "WARNING",
    }
    subprocess.run([sys.executable, "-m", "ioc.cli", "migrate"], env=env, check=True, capture_output=True)
    await register(url, city, args.devices)

    log = tempfile.NamedTemporaryFile(prefix="bench-gateway-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "ioc.cli", "gateway"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", str(args.core), *command]
    gateway = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(f"{health}/ready", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"gateway did not become ready; log: {log.name}")

            await throughput(client, health, gateway.pid, city, args)

            if args.outage_s > 0:
                await outage(client, health, gateway.pid, city, args)
    finally:
        gateway.terminate()
        gateway.wait(30)
        await drop_database(url)


async def throughput(
    client: httpx.AsyncClient, health: str, pid: int, city: str, args: argparse.Namespace
) -> None:
    """Publish `args.messages` as fast as one publisher can and print the rates the gateway
    acknowledged them at."""
    messages = payloads(city, args.devices, args.messages)
    publisher = multiprocessing.Process(target=publish, args=(messages, None))
    started = time.monotonic()
    publisher.start()
    samples: list[tuple[float, float]] = []
    peak_rss = 0
    while True:
        acked = await metric(client, health, "ioc_gateway_acked_total")
        samples.append((time.monotonic() - started, acked))
        peak_rss = max(peak_rss, rss_kib(pid))
        if acked >= args.messages:
            break
        if time.monotonic() - started > 600:
            raise RuntimeError(f"only {acked} of {args.messages} acknowledged in 600 s")
        await asyncio.sleep(0.5)
    elapsed = samples[-1][0]
    publisher.join()
    # The steady part: between 10 % and 90 % of the messages.
    low = next(s for s in samples if s[1] >= 0.1 * args.messages)
    high = next(s for s in samples if s[1] >= 0.9 * args.messages)
    steady = (high[1] - low[1]) / max(high[0] - low[0], 1e-9)
    print(
        json.dumps(
            {
                "benchmark": "gateway throughput (one process, one core)",
                "messages": args.messages,
                "devices": args.devices,
                "seconds": round(elapsed, 2),
                "mean_rate_msgs_per_s": round(args.messages / elapsed, 1),
                "steady_rate_msgs_per_s": round(steady, 1),
                "peak_rss_mib": round(peak_rss / 1024, 1),
            }
        ),
        flush=True,
    )


async def outage(
    client: httpx.AsyncClient, health: str, pid: int, city: str, args: argparse.Namespace
) -> None:
    before = await metric(client, health, "ioc_gateway_acked_total")
    subprocess.run(["bash", str(SERVICES), "stop", "kafka"], check=True, capture_output=True)
    count = int(args.outage_rate * args.outage_s)
    publisher = multiprocessing.Process(
        target=publish, args=(payloads(city, args.devices, count), args.outage_rate)
    )
    started = time.monotonic()
    publisher.start()
    peak_rss, peak_backlog = 0, 0.0
    while time.monotonic() - started < args.outage_s:
        peak_rss = max(peak_rss, rss_kib(pid))
        peak_backlog = max(peak_backlog, await metric(client, health, "ioc_gateway_backlog"))
        await asyncio.sleep(1)
    subprocess.run(["bash", str(SERVICES), "up"], check=True, capture_output=True)
    restarted = time.monotonic()
    while await metric(client, health, "ioc_gateway_acked_total") < before + count:
        if time.monotonic() - restarted > 600:
            raise RuntimeError("backlog did not drain within 600 s of Kafka's return")
        await asyncio.sleep(0.5)
    publisher.join()
    print(
        json.dumps(
            {
                "benchmark": "gateway with Kafka down",
                "outage_s": args.outage_s,
                "published_during_outage": count,
                "peak_rss_mib": round(peak_rss / 1024, 1),
                "peak_backlog_msgs": peak_backlog,
                "drained_s_after_kafka_back": round(time.monotonic() - restarted, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
