"""`/v1/state` under polling load for a city of 10,000 devices, with the pipeline ingesting.

    .venv/bin/python -m benchmarks.api_state [--devices 10000] [--rate 1000] [--duration 20]
                                             [--connections 32]

Registers a simulated city, runs `ioc gateway`, `ioc processor` and `ioc api` against the real
services, keeps `ioc simulate` publishing (by default every device every 10 s), and loads
`/v1/state?city=` with `wrk` (Debian package `wrk`) three ways: whole body gzipped, whole body
uncompressed, and conditional (`If-None-Match`, as a screen polling it sends). Prints a JSON line
per run with requests per second and latency percentiles, and how many answers were 304.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.gateway import free_port
from ioc_core.sealing import new_key
from ioc_core.storage import drop_database, ensure_database

POSTGRES = os.environ.get("IOC_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
ADMIN_KEY = "bench-admin-" + uuid.uuid4().hex
CITY = "hai-phong"

_LUA_304 = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
tag = nil
not_modified = 0
request = function()
  if tag then wrk.headers["If-None-Match"] = tag end
  return wrk.format()
end
response = function(status, headers, body)
  tag = headers["ETag"] or headers["etag"] or tag
  if status == 304 then not_modified = not_modified + 1 end
end
done = function(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + (t:get("not_modified") or 0) end
  io.write(string.format("304 responses: %d\\n", n))
end
"""

_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_NOT_MODIFIED = re.compile(r"304 responses: (\d+)")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(
    url: str, *, headers: dict[str, str], connections: int, duration: int, lua: str | None
) -> dict[str, Any]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    with tempfile.TemporaryDirectory() as scratch:
        if lua:
            script = Path(scratch) / "conditional.lua"
            script.write_text(lua)
            command += ["-s", str(script)]
        output = subprocess.run([*command, url], capture_output=True, text=True, timeout=duration + 60).stdout
    latency = {f"p{m.group(1)}_ms": round(_ms(m.group(2), m.group(3)), 2) for m in _LATENCY.finditer(output)}
    rate = _RATE.search(output)
    total = _TOTAL.search(output)
    errors = _NON_2XX.search(output)
    not_modified = _NOT_MODIFIED.search(output)
    return {
        "requests_per_s": float(rate.group(1)) if rate else None,
        "requests": int(total.group(1)) if total else None,
        "errors_4xx_5xx": int(errors.group(1)) if errors else 0,
        "not_modified_304": int(not_modified.group(1)) if not_modified else None,
        **latency,
    }


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


async def wait_for_state(url: str, devices: int, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    seen = 0
    async with httpx.AsyncClient(headers={"X-API-Key": ADMIN_KEY}, timeout=30) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.get(url)
                items = response.json()["items"] if response.status_code == 200 else []
                seen = sum(1 for item in items if item["ts"] is not None)
                if seen >= devices * 0.9:
                    return seen
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)
    return seen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1_000.0, help="messages per second published")
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    return parser.parse_args()


def bench_env(database_url: str, port: int) -> dict[str, str]:
    """The environment of every `ioc` process of the run: its own database, topics and group."""
    run = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
    env.update(
        IOC_DATABASE_URL=database_url,
        IOC_ADMIN_API_KEY=ADMIN_KEY,
        IOC_SECRETS_KEY=new_key(),
        IOC_API_PORT=str(port),
        IOC_TOPIC_PREFIX=f"bench-{run}.",
        IOC_PROCESSOR_GROUP_ID=f"bench-{run}",
        IOC_GATEWAY_CLIENT_ID=f"bench-gw-{run}",
        IOC_GATEWAY_SHARE_GROUP=f"bench-gw-{run}",
        IOC_GATEWAY_HEALTH_PORT=str(free_port()),
        # wrk with one key from one address is far past any screen's rate: measure the API, not 429s.
        **{
            f"IOC_API_RATE_LIMIT_{who}": json.dumps({"rate": 1_000_000, "burst": 1_000_000})
            for who in ("VIEWER", "OPERATOR", "ADMIN", "ANONYMOUS")
        },
        IOC_LOG_LEVEL="WARNING",
    )
    return env


def simulate_args(devices: int, rate: float, duration_s: int) -> list[str]:
    return [
        "simulate",
        "--city",
        CITY,
        "--devices",
        str(devices),
        "--rate",
        str(rate),
        "--duration",
        str(duration_s),
    ]


def register_fleet(ioc: list[str], env: dict[str, str], devices: int) -> None:
    started = time.monotonic()
    subprocess.run(
        [*ioc, *simulate_args(devices, 1, 1), "--register"], env=env, check=True, capture_output=True
    )
    print(json.dumps({"registered": devices, "seconds": round(time.monotonic() - started, 1)}))


def measure(url: str, args: argparse.Namespace) -> None:
    """One wrk run per way a screen asks: gzip, identity, and conditional (304) with gzip."""
    auth = {"X-API-Key": ADMIN_KEY}
    for name, headers, lua in (
        ("gzip", {**auth, "Accept-Encoding": "gzip"}, None),
        ("identity", auth, None),
        ("conditional-gzip", {**auth, "Accept-Encoding": "gzip"}, _LUA_304),
    ):
        result = run_wrk(url, headers=headers, connections=args.connections, duration=args.duration, lua=lua)
        print(json.dumps({"run": name, "devices": args.devices, "ingest_msgs_per_s": args.rate, **result}))


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


async def main() -> None:
    args = parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    database_url = f"{POSTGRES}/ioc_bench_api_{int(time.time())}"
    await ensure_database(database_url)
    port = free_port()
    env = bench_env(database_url, port)
    ioc = [sys.executable, "-m", "ioc.cli"]
    logs = Path(tempfile.mkdtemp(prefix="ioc-bench-api-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([*ioc, "migrate"], env=env, check=True, capture_output=True)
        register_fleet(ioc, env, args.devices)
        for name in ("gateway", "processor", "api"):
            processes.append(spawn([*ioc, name], env, logs / f"{name}.log"))
        total_s = args.duration * 3 + 120
        simulate = [*ioc, *simulate_args(args.devices, args.rate, total_s)]
        processes.append(spawn(simulate, env, logs / "simulate.log"))
        url = f"http://127.0.0.1:{port}/v1/state?city={CITY}"
        seen = await wait_for_state(url, args.devices, within_s=180)
        print(json.dumps({"devices_with_state": seen}))
        measure(url, args)
    finally:
        stop_all(processes)
        await drop_database(database_url)
        print(json.dumps({"logs": str(logs)}))


if __name__ == "__main__":
    asyncio.run(main())
