"""`make run` from a fresh copy of the repository: it makes its own virtualenv, installs, and starts
the whole system with nothing else running (embedded broker, in-process bus, embedded
PostgreSQL, simulator), reaches a healthy API with devices of all five domains on the map,
stops on Ctrl-C and keeps its data for the next run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ioc_core.domains import DOMAINS
from simulators.cities import CITIES
from tests.conftest import Figures
from tests.integration.conftest import free_port
from tests.integration.harness import wait_until

REPOSITORY = Path(__file__).resolve().parents[2]
_KEY = re.compile(r"#key=(ioc_[A-Za-z0-9_-]+)")


def _fresh_copy(target: Path) -> None:
    """The repository's files as a clone has them (tracked and new, not ignored), as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPOSITORY / name
        if not source.is_file():
            continue  # deleted in the working tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


class MakeRun:
    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.runs = 0
        self.log_path = directory / "make-run-0.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.directory / f"make-run-{self.runs}.log"
        with self.log_path.open("wb") as log:
            self.started = time.monotonic()
            # Its own process group, as a terminal gives it: Ctrl-C reaches make and `ioc up`.
            self.process = subprocess.Popen(
                ["make", "run"],
                cwd=self.directory,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self, timeout: float = 60) -> int:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("fresh-clone")
    _fresh_copy(directory)
    yield directory


async def _until_all_domains_on_the_map(base: str, key: str, run: MakeRun) -> dict[str, float]:
    """Seconds from `make run` to the first device on the map, and to all five domains."""
    first: float | None = None

    async def probe() -> dict[str, float] | None:
        nonlocal first
        if run.process is not None and run.process.poll() is not None:
            raise AssertionError(f"make run exited with {run.process.returncode}:\n{run.output()[-4000:]}")
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=5) as client:
            items = (await client.get("/v1/state")).json()["items"]
        reporting = {item["domain"] for item in items if item["metrics"]}
        if reporting and first is None:
            first = time.monotonic() - run.started
        if reporting == set(DOMAINS):
            return {"first_device_s": first or 0.0, "all_domains_s": time.monotonic() - run.started}
        return None

    return await wait_until(probe, timeout=420, what="devices of all five domains on the map", interval=0.5)


async def test_make_run_from_a_fresh_clone(clone: Path, figures: Figures) -> None:
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_") and k != "VIRTUAL_ENV"}
    env.update(
        IOC_API_PORT=str(api_port),
        # The machine's own Mosquitto holds 1883; a newcomer's has it free.
        IOC_EMBEDDED_MQTT_PORT=str(free_port()),
        IOC_SIMULATOR_DEVICES="25",
    )
    base = f"http://127.0.0.1:{api_port}"
    run = MakeRun(clone, env)
    run.start()
    try:

        async def announced() -> str | None:
            if run.process is not None and run.process.poll() is not None:
                raise AssertionError(f"make run exited:\n{run.output()[-4000:]}")
            found = _KEY.search(run.output())
            return found.group(1) if found else None

        key = await wait_until(announced, timeout=420, what="make run to print the page link", interval=0.5)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            assert (await client.get("/ready")).status_code == 200
            page = await client.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        times = await _until_all_domains_on_the_map(base, key, run)
        figures.lines.append(
            "make run from a fresh copy (pip cache warm): first device on the map after"
            f" {times['first_device_s']:.0f} s, all five domains after {times['all_domains_s']:.0f} s"
        )
        assert run.interrupt() in (0, 2, -signal.SIGINT), run.output()[-4000:]
        assert "Traceback" not in run.output(), run.output()[-4000:]

        # Again, from the kept data: same key, the devices are still registered.
        run.start()
        key_again = await wait_until(announced, timeout=120, what="the second run's page link", interval=0.5)
        assert key_again == key
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=10) as client:
            devices = (await client.get("/v1/devices", params={"limit": 1000})).json()["items"]
            # The simulated city's approximate wards are on the map too.
            wards = (await client.get("/v1/areas", params={"city": "ha-noi", "kind": "ward"})).json()
        assert len(devices) >= 25
        assert len(wards["features"]) == len(CITIES["ha-noi"])
        assert all(device["areas"] for device in devices)
        assert run.interrupt() in (0, 2, -signal.SIGINT), run.output()[-4000:]
    finally:
        run.kill()
