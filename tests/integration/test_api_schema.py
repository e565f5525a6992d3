"""Schemathesis against the API's own OpenAPI schema: generated requests (valid and not) to every
operation must never get a 5xx, and every answer must match the schema (status code, content
type, headers, body). It runs an `ioc api` of its own on a database of its own, since it creates,
changes and deletes whatever it can.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ioc_core.storage import drop_database, ensure_database
from tests.integration.conftest import POSTGRES_URL, System, free_port
from tests.integration.harness import ComponentProcess

KEY = "schema-admin-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
async def schema_api(system: System, log_dir: Path) -> AsyncIterator[str]:
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
            # A few real objects, so that generated requests also reach the paths that find things.
            for i, domain in enumerate(("traffic", "waste", "water", "grid", "flood")):
                body = {
                    "id": f"schema-{domain}-{i}",
                    "city": "hai-phong",
                    "domain": domain,
                    "location": {"lat": 20.86, "lon": 106.68},
                }
                assert (await client.post("/v1/devices", json=body)).status_code == 201
        yield url
    finally:
        api.stop()
        await drop_database(database_url)


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    schema_api: str, tmp_path: Path
) -> None:
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is not installed in the virtualenv (make install)"
    command = [
        schemathesis,
        "run",
        f"{schema_api}/openapi.json",
        "--header",
        f"X-API-Key: {KEY}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_headers_conformance,response_schema_conformance,negative_data_rejection",
        # The live stream never ends by itself; it has tests of its own.
        "--exclude-path",
        "/v1/stream",
        "--max-examples",
        "25",
        "--seed",
        "20261121",
        "--request-timeout",
        "10",
        # One worker: runs with two have hit a race inside schemathesis's own caches.
        "--workers",
        "1",
        "--no-color",
    ]
    # In a scratch directory: schemathesis keeps its example database in the working directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12_000:]
