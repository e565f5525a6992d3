"""Schemathesis against the API's own OpenAPI schema: generated requests (valid and not) to every
operation must never get a 5xx, and every answer must match the schema (status code, content
type, headers, body). Then two runs with scoped keys, whose generated path parameters include
the ids of real devices and alarms of two cities (`schema_hooks`): an operator key limited to one
city finds no object of the other and no 5xx, and a viewer key finds no write that succeeds.
It runs an `ioc api` of its own on a database of its own, since it creates, changes and deletes
whatever it can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ioc_core.domains import DOMAINS
from ioc_core.storage import drop_database, ensure_database
from tests.integration.conftest import POSTGRES_URL, System, free_port
from tests.integration.harness import ComponentProcess

KEY = "schema-admin-key-" + uuid.uuid4().hex
OWN_CITY, OTHER_CITY = "hai-phong", "quang-ninh"
REPOSITORY = Path(__file__).resolve().parents[2]


@dataclass
class SchemaApi:
    url: str
    database_url: str
    operator_key: str  # an operator limited to OWN_CITY
    viewer_key: str  # a viewer of every city
    device_ids: dict[str, list[str]]  # by city
    alarm_ids: dict[str, list[int]]  # by city


async def _register(client: httpx.AsyncClient, city: str, prefix: str) -> list[str]:
    ids = []
    for i, domain in enumerate(DOMAINS):
        body = {
            "id": f"{prefix}-{domain}-{i}",
            "city": city,
            "domain": domain,
            "location": {"lat": 20.86, "lon": 106.68},
        }
        assert (await client.post("/v1/devices", json=body)).status_code == 201
        ids.append(body["id"])
    return ids


_ALARM_SQL = (
    "INSERT INTO alarms (subject, device_id, city, domain, rule, metric, severity, started_at,"
    " last_seen_at, value, threshold, message_vi, message_en)"
    " VALUES ($1, $1, $2, $3, $4, $5, 'high', $6, $6, 1, 0, 'cảnh báo', 'warning') RETURNING id"
)


async def _raise_alarms(database_url: str, device_ids: list[str], city: str) -> list[int]:
    """An open alarm on each device, as a processor would have recorded it."""
    connection = await asyncpg.connect(database_url)
    try:
        ids = []
        for device_id in device_ids:
            domain = device_id.split("-")[-2]
            metric = DOMAINS[domain].metrics[0].name
            ids.append(
                await connection.fetchval(
                    _ALARM_SQL,
                    device_id,
                    city,
                    domain,
                    f"threshold.{metric}",
                    metric,
                    datetime.now(UTC),
                )
            )
        return ids
    finally:
        await connection.close()


async def _make_key(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/api-keys", json=body)
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


@pytest.fixture(scope="module")
async def schema_api(system: System, log_dir: Path) -> AsyncIterator[SchemaApi]:
    database_url = f"{POSTGRES_URL}/ioc_test_{int(time.time())}_{uuid.uuid4().hex[:8]}"
    await ensure_database(database_url)
    env = {
        **system.env,
        "IOC_DATABASE_URL": database_url,
        "IOC_API_PORT": str(free_port()),
        "IOC_ADMIN_API_KEY": KEY,
    }
    migrated = subprocess.run(
        [sys.executable, "-m", "ioc.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    api = ComponentProcess("api", env, log_dir, name="api-schema")
    api.start()
    try:
        await api.wait_for_log("API listening")
        url = f"http://127.0.0.1:{env['IOC_API_PORT']}"
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}) as client:
            # Real objects, so that generated requests also reach the paths that find things.
            devices = {
                city: await _register(client, city, f"schema-{city}") for city in (OWN_CITY, OTHER_CITY)
            }
            alarms = {city: await _raise_alarms(database_url, ids, city) for city, ids in devices.items()}
            operator = await _make_key(client, role="operator", cities=[OWN_CITY], name="schema operator")
            viewer = await _make_key(client, role="viewer", name="schema viewer")
        yield SchemaApi(url, database_url, operator, viewer, devices, alarms)
    finally:
        api.stop()
        await drop_database(database_url)


def run_schemathesis(
    url: str, key: str, workdir: Path, options: list[str], *, scope_run: dict[str, Any] | None = None
) -> str:
    """One `schemathesis run` against the API's schema; fails the test with its report if it
    found anything. With `scope_run`, the hooks of `schema_hooks` are loaded, told about it."""
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is not installed in the virtualenv (make install)"
    env = dict(os.environ)
    if scope_run is not None:
        env.update(
            SCHEMATHESIS_HOOKS="tests.integration.schema_hooks",
            SCHEMA_SCOPE_RUN=json.dumps(scope_run),
            PYTHONPATH=str(REPOSITORY),
        )
    command = [
        schemathesis,
        "run",
        f"{url}/openapi.json",
        "--header",
        f"X-API-Key: {key}",
        # The live stream never ends by itself; it has tests of its own.
        "--exclude-path",
        "/v1/stream",
        "--seed",
        "20261121",
        "--request-timeout",
        "10",
        # One worker: runs with two have hit a race inside schemathesis's own caches.
        "--workers",
        "1",
        "--no-color",
        *options,
    ]
    # In a scratch directory: schemathesis keeps its example database in the working directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=workdir, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12_000:]
    return output


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    schema_api: SchemaApi, tmp_path: Path
) -> None:
    checks = (
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance,negative_data_rejection"
    )
    run_schemathesis(schema_api.url, KEY, tmp_path, ["--checks", checks, "--max-examples", "25"])


async def _snapshot(database_url: str) -> dict[str, Any]:
    """What writes could change: the registry, alarm states, keys and webhooks."""
    connection = await asyncpg.connect(database_url)
    try:
        return {
            "devices": await connection.fetch("SELECT * FROM devices ORDER BY id"),
            "alarms": await connection.fetch("SELECT id, state, count, severity FROM alarms ORDER BY id"),
            "keys": await connection.fetch("SELECT id, revoked_at FROM api_keys ORDER BY id"),
            "webhooks": await connection.fetch("SELECT * FROM webhook_endpoints ORDER BY id"),
        }
    finally:
        await connection.close()


def _scope_run(api: SchemaApi) -> dict[str, Any]:
    return {
        "device_ids": [d for ids in api.device_ids.values() for d in ids],
        "alarm_ids": [a for ids in api.alarm_ids.values() for a in ids],
        "other_city": OTHER_CITY,
        "other_device_ids": api.device_ids[OTHER_CITY],
    }


async def test_a_city_scoped_operator_finds_nothing_of_another_city(
    schema_api: SchemaApi, tmp_path: Path
) -> None:
    before = await _snapshot(schema_api.database_url)
    run_schemathesis(
        schema_api.url,
        schema_api.operator_key,
        tmp_path,
        [
            *("--checks", "not_a_server_error,no_object_of_another_city"),
            *("--phases", "fuzzing,stateful", "--max-examples", "12"),
        ],
        scope_run=_scope_run(schema_api),
    )
    after = await _snapshot(schema_api.database_url)

    def of_other_city(snapshot: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        alarms = set(schema_api.alarm_ids[OTHER_CITY])
        return [d for d in snapshot["devices"] if d["city"] == OTHER_CITY], [
            a for a in snapshot["alarms"] if a["id"] in alarms
        ]

    assert of_other_city(after) == of_other_city(before), "the operator changed something of another city"
    own = [d for d in after["devices"] if d["city"] == OWN_CITY]
    async with httpx.AsyncClient(
        base_url=schema_api.url, headers={"X-API-Key": schema_api.operator_key}
    ) as api:
        summary = (await api.get("/v1/summary")).json()
        assert sum(d["devices"]["total"] for d in summary["domains"].values()) == len(own)
        assert [c["city"] for c in (await api.get("/v1/cities")).json()["items"]] == [OWN_CITY] * bool(own)


async def test_a_viewer_finds_no_write_that_succeeds(schema_api: SchemaApi, tmp_path: Path) -> None:
    before = await _snapshot(schema_api.database_url)
    writes = [
        option for method in ("POST", "PUT", "PATCH", "DELETE") for option in ("--include-method", method)
    ]
    run_schemathesis(
        schema_api.url,
        schema_api.viewer_key,
        tmp_path,
        [
            *("--checks", "not_a_server_error,no_write_succeeds"),
            *("--phases", "examples,fuzzing", "--max-examples", "8", *writes),
        ],
        scope_run=_scope_run(schema_api),
    )
    assert await _snapshot(schema_api.database_url) == before, "a viewer's request changed something"
