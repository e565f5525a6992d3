"""The PostgreSQL that `ioc up` embeds: a real server from the pgserver wheel in a temporary
directory. These tests start their own servers and need none of the services of `make services`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

from ioc.embedded import postgres
from ioc.embedded.postgres import EmbeddedPostgres
from ioc_core.errors import ConfigurationError
from ioc_core.models import DeviceIn, Location
from ioc_core.storage import Database, StorageTier
from tests.conftest import Figures

DEVICE = DeviceIn(
    id="hn-flood-embedded-1",
    city="ha-noi",
    domain="flood",
    name="Trạm đo mực nước Phan Đình Phùng",
    district="Ba Đình",
    location=Location(lat=21.0401, lon=105.8412),
)

# Starts a server in the directory given, prints its url and the postmaster's pid, then exits
# at once ("exit", without stopping it) or waits to be signalled ("wait").
_CHILD = """
import asyncio, sys
from pathlib import Path
from ioc.embedded.postgres import EmbeddedPostgres

async def main() -> None:
    server = EmbeddedPostgres(Path(sys.argv[1]))
    await server.start()
    pid = (server.cluster_dir / "postmaster.pid").read_text().split()[0]
    print(server.url, pid, flush=True)
    if sys.argv[2] == "wait":
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(autouse=True)
def real_services() -> None:
    """Replaces the package's check for the real services: these tests run without them."""


@pytest.fixture(scope="module")
async def template(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A data directory with the schema migrated, copied by the tests that need one."""
    data_dir = tmp_path_factory.mktemp("embedded") / "template"
    async with EmbeddedPostgres(data_dir) as server, Database(server.url, max_size=2) as database:
        await database.migrate()
    yield data_dir


def copy_of(template: Path, tmp_path: Path) -> Path:
    data_dir = tmp_path / "pg"
    shutil.copytree(template, data_dir, symlinks=True)
    return data_dir


def is_running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def wait_until_gone(pid: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while is_running(pid):
        assert time.monotonic() < deadline, f"postgres (pid {pid}) still running"
        await asyncio.sleep(0.02)


async def run_child(data_dir: Path, mode: str) -> tuple[asyncio.subprocess.Process, str, int]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(data_dir), mode, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().split()
    assert len(line) == 2, f"the child did not start its server: {line}"
    return child, line[0], int(line[1])


async def test_first_start_migrates_and_a_restart_keeps_the_data(tmp_path: Path, figures: Figures) -> None:
    data_dir = tmp_path / "pg"
    began = time.perf_counter()
    async with EmbeddedPostgres(data_dir) as server:
        first_start_s = time.perf_counter() - began
        assert re.fullmatch(r"postgresql://postgres:[\w-]+@127\.0\.0\.1:\d+/ioc", server.url)
        assert server.display_url == re.sub(r":[\w-]+@", ":***@", server.url)
        assert server.version.startswith("16.")
        port = server.port
        async with Database(server.url, max_size=2) as database:
            assert await database.migrate() is StorageTier.POSTGRES
            await database.devices.insert(DEVICE)
        # One server per directory: a second one would corrupt the cluster.
        with pytest.raises(ConfigurationError, match="another process is running"):
            await EmbeddedPostgres(data_dir).start()

    began = time.perf_counter()
    async with EmbeddedPostgres(data_dir) as server:
        restart_s = time.perf_counter() - began
        assert server.port == port, "the remembered port is reused while free"
        async with Database(server.url, max_size=2) as database:
            assert database.tier is StorageTier.POSTGRES
            assert (await database.devices.get(DEVICE.id)).name == DEVICE.name
    figures.lines.append(
        f"embedded PostgreSQL {server.version}: first start {first_start_s:.2f} s (cluster created),"
        f" restart {restart_s:.2f} s"
    )


async def test_the_next_start_recovers_from_a_killed_server(template: Path, tmp_path: Path) -> None:
    data_dir = copy_of(template, tmp_path)
    server = EmbeddedPostgres(data_dir)
    await server.start()
    async with Database(server.url, max_size=2) as database:
        await database.devices.insert(DEVICE)
    pid = int((server.cluster_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    # Nobody reaps it here when the process manager of the machine does not: a zombie.
    await wait_until_gone(pid)
    await asyncio.wait_for(server.stop(), 10)
    assert (server.cluster_dir / "postmaster.pid").exists(), "stale, as after a crash"

    async with EmbeddedPostgres(data_dir) as server, Database(server.url, max_size=2) as database:
        assert (await database.devices.get(DEVICE.id)).id == DEVICE.id, "committed before the crash"


async def test_the_next_start_takes_over_from_a_killed_process(template: Path, tmp_path: Path) -> None:
    data_dir = copy_of(template, tmp_path)
    child, url, pid = await run_child(data_dir, "wait")
    async with Database(url, max_size=2) as database:
        await database.devices.insert(DEVICE)
    child.kill()
    await child.wait()
    assert is_running(pid), "pg_ctl detaches the server, so it outlives a killed process"

    async with EmbeddedPostgres(data_dir) as server, Database(server.url, max_size=2) as database:
        assert not is_running(pid), "the orphan was stopped and a server of our own started"
        assert (await database.devices.get(DEVICE.id)).id == DEVICE.id


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
async def test_the_server_stops_with_its_process(template: Path, tmp_path: Path, ending: str) -> None:
    data_dir = copy_of(template, tmp_path)
    child, _, pid = await run_child(data_dir, "exit" if ending == "exit" else "wait")
    if ending == "sigterm":
        child.terminate()
    assert await asyncio.wait_for(child.wait(), 30) == (0 if ending == "exit" else 128 + signal.SIGTERM)
    await wait_until_gone(pid)


async def test_a_port_in_use_is_a_clear_error(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = copy_of(template, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        expected = rf"127\.0\.0\.1:{port} is already in use; set IOC_EMBEDDED_POSTGRES_PORT to a free port"
        server = EmbeddedPostgres(data_dir, port=port, port_setting="IOC_EMBEDDED_POSTGRES_PORT")
        with pytest.raises(ConfigurationError, match=expected) as error:
            await server.start()
        assert "\n" not in str(error.value)

        # Taken between the check and the server's own bind: told apart in the server's log.
        monkeypatch.setattr(postgres, "_port_free", lambda host, port: True)
        with pytest.raises(ConfigurationError, match=expected):
            await server.start()
        monkeypatch.undo()

        # Without a port asked for, a remembered port that is taken is simply replaced.
        async with EmbeddedPostgres(data_dir) as first:
            remembered = first.port
        with socket.socket() as also_taken:
            # The stopped server's connections may still hold the port in TIME_WAIT.
            also_taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            also_taken.bind(("127.0.0.1", remembered))
            also_taken.listen()
            async with EmbeddedPostgres(data_dir) as second:
                assert second.port != remembered


async def test_a_directory_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    with pytest.raises(ConfigurationError, match="not empty and was not made by the embedded PostgreSQL"):
        await EmbeddedPostgres(foreign).start()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"], "left untouched"

    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "PG_VERSION").write_text("17\n")
    with pytest.raises(ConfigurationError, match="is a PostgreSQL data directory not made by"):
        await EmbeddedPostgres(cluster).start()
