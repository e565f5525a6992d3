"""A three-node KRaft Kafka cluster on loopback, for tests that kill brokers.

Each node is broker and controller at once (as in docker-compose.yml), with its own data directory
under a temporary directory, and runs from the Kafka jars `services/services.sh` caches for the
single development broker. Tests start the cluster, SIGKILL and restart single nodes, and ask who
leads which partition. The nodes are separate from the shared broker on port 9092.

Run one by hand (until Ctrl-C; it prints the bootstrap list to point IOC_KAFKA_BOOTSTRAP at):

    .venv/bin/python -m tests.integration.kafka_cluster [--base-port 19092]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.metadata import MetadataRequest

log = logging.getLogger(__name__)

_SERVICES = Path(__file__).resolve().parents[2] / "services"
_TEMPLATE = _SERVICES / "kafka" / "cluster.properties"
_LOG4J = _SERVICES / "kafka" / "log4j.properties"
# Small heaps and one-tier JIT: three brokers share two cores with the system under test, and
# a node restarted in a test should be serving again within seconds.
_JVM = [
    "-Xms64m",
    "-Xmx384m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
_PR_SET_PDEATHSIG = 1


def kafka_libs() -> Path:
    """The cached Kafka jars (fetched by services.sh when missing)."""
    result = subprocess.run(
        ["bash", str(_SERVICES / "services.sh"), "kafka-libs"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"services.sh kafka-libs failed:\n{result.stderr[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _libc_prctl() -> Callable[..., int] | None:
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None  # not Linux: a killed test run may leave nodes behind


# Looked up here, not in the child: between fork and exec only the call itself is safe.
_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    # A test run killed outright (a hard timeout) must not leave brokers holding ports.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True, slots=True, order=True)
class PartitionState:
    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


class KafkaNode:
    """One broker+controller JVM; `kill` is SIGKILL, `start` again reuses its data directory."""

    def __init__(self, node_id: int, port: int, controller_port: int, directory: Path) -> None:
        self.node_id = node_id
        self.port = port
        self.controller_port = controller_port
        self.directory = directory
        self.config = directory / "server.properties"
        self.data = directory / "data"
        self.logs = directory / "logs"
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def exited(self) -> bool:
        """Started and since gone by itself (not killed by the test)."""
        return self._process is not None and self._process.poll() is not None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            "java",
            *_JVM,
            f"-Dkafka.logs.dir={self.logs}",
            f"-Dlog4j.configuration=file:{_LOG4J}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, libs: Path) -> None:
        if self.running:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / "kafka.out").open("ab")
        try:
            self._process = subprocess.Popen(
                self.command(libs, "kafka.Kafka", str(self.config)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()
        self.starts += 1
        log.info("kafka node %d starting on %s (pid %d)", self.node_id, self.address, self._process.pid)

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, no flush, as when a machine dies."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(30)
        log.info("kafka node %d killed", self.node_id)
        self._process = None

    def tail(self, lines: int = 30) -> str:
        path = self.logs / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class KafkaCluster:
    """`size` combined broker+controller nodes on free loopback ports, all voters of one quorum."""

    def __init__(self, root: Path, size: int = 3, *, ports: list[int] | None = None) -> None:
        ports = ports or _free_ports(2 * size)
        if len(ports) != 2 * size:
            raise ValueError(f"a cluster of {size} needs {2 * size} ports (broker and controller)")
        self.root = root
        self.cluster_id = ""
        self.nodes = {
            index + 1: KafkaNode(index + 1, ports[index], ports[size + index], root / f"node-{index + 1}")
            for index in range(size)
        }
        self._libs: Path | None = None

    @property
    def bootstrap(self) -> str:
        """For IOC_KAFKA_BOOTSTRAP: every node, so clients find the cluster whichever is down."""
        return ",".join(node.address for node in self.nodes.values())

    @property
    def libs(self) -> Path:
        if self._libs is None:
            self._libs = kafka_libs()
        return self._libs

    def format(self) -> None:
        """Write each node's configuration and format its storage, all with one cluster id."""
        self.cluster_id = _cluster_id()
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes.values())
        template = _TEMPLATE.read_text()
        for node in self.nodes.values():
            node.logs.mkdir(parents=True, exist_ok=True)
            values = {
                "NODE_ID": str(node.node_id),
                "VOTERS": voters,
                "PORT": str(node.port),
                "CONTROLLER_PORT": str(node.controller_port),
                "LOG_DIRS": str(node.data),
            }
            text = template
            for key, value in values.items():
                text = text.replace(f"@{key}@", value)
            node.config.write_text(text)
        # One JVM per node, side by side: formatting is most of a cold start's time otherwise.
        formats = {
            node.node_id: subprocess.Popen(
                node.command(
                    self.libs,
                    "kafka.tools.StorageTool",
                    "format",
                    # One argument: an id may start with "-", which would read as an option.
                    f"--cluster-id={self.cluster_id}",
                    "-c",
                    str(node.config),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for node in self.nodes.values()
        }
        for node_id, process in formats.items():
            output, _ = process.communicate(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(
                    f"formatting kafka node {node_id} failed:\n{output.decode(errors='replace')}"
                )

    def start(self) -> None:
        if not self.cluster_id:
            self.format()
        for node in self.nodes.values():
            node.start(self.libs)

    def stop(self) -> None:
        """Kill every node (the data is thrown away with the directory)."""
        for node in self.nodes.values():
            node.kill()

    def kill(self, node_id: int) -> None:
        self.nodes[node_id].kill()

    def restart(self, node_id: int) -> None:
        self.nodes[node_id].start(self.libs)

    # -- what the cluster says about itself ---------------------------------------------------

    async def _views(self, topics: list[str] | None) -> dict[int, dict[str, Any]]:
        """The metadata (brokers, and `topics` or all topics) as each running node sees it: the
        nodes learn of changes a little apart, and a restarted node replays old state first."""
        running = [n for n in self.nodes.values() if n.running]
        admin = AIOKafkaAdminClient(
            bootstrap_servers=[n.address for n in running] or self.bootstrap, request_timeout_ms=5_000
        )
        await admin.start()
        try:
            views = {}
            for node in running:
                # Private, but the admin client has no way to ask one particular broker.
                response = await admin._send_request(MetadataRequest(topics), node.node_id)
                views[node.node_id] = response.to_object()
            return views
        finally:
            await admin.close()

    async def brokers(self) -> set[int]:
        """The live (registered, unfenced) brokers, if every running node agrees; else empty."""
        seen = [{int(b["node_id"]) for b in view["brokers"]} for view in (await self._views([])).values()]
        return seen[0] if seen and all(s == seen[0] for s in seen) else set()

    async def partitions(self, topics: Iterable[str] | None = None) -> list[PartitionState]:
        """Leaders and replicas of `topics` (or of all topics), once every running node says the
        same; a node that does not know a topic yet raises."""
        names = list(topics) if topics is not None else None
        views = [_partition_states(view) for view in (await self._views(names)).values()]
        if not views or any(sorted(v) != sorted(views[0]) for v in views):
            raise RuntimeError("the nodes' metadata differs (a change is still spreading)")
        return views[0]

    async def leader_of(self, topic: str, *, timeout: float = 30) -> int:
        """The node leading most of `topic`'s partitions, once every partition has a leader."""
        found: list[int] = []

        async def probe() -> bool:
            counts: dict[int, int] = {}
            states = await self.partitions([topic])
            for p in states:
                counts[p.leader] = counts.get(p.leader, 0) + 1
            if not states or -1 in counts:
                return False
            found.append(max(sorted(counts), key=lambda n: counts[n]))
            return True

        await self.wait_for(f"the leaders of {topic}", probe, timeout=timeout)
        return found[-1]

    # -- waits ---------------------------------------------------------------------------------

    async def wait_for(self, what: str, probe: Callable[[], Awaitable[bool]], *, timeout: float = 60) -> None:
        """Poll the async `probe` until it returns True; the nodes' logs go with a failure."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if await probe():
                    return
            except Exception as exc:
                last = exc
            for node in self.nodes.values():
                if node.exited:
                    raise AssertionError(f"kafka node {node.node_id} exited:\n{node.tail()}")
            await asyncio.sleep(0.2)
        logs = "\n".join(f"--- node {n.node_id} ---\n{n.tail(15)}" for n in self.nodes.values())
        raise AssertionError(
            f"kafka cluster: timed out after {timeout}s waiting for {what} (last: {last!r})\n{logs}"
        )

    async def wait_brokers(self, expected: set[int] | None = None, *, timeout: float = 90) -> None:
        """Until exactly the running nodes (or `expected`) are live brokers of the cluster."""
        want = expected if expected is not None else {n.node_id for n in self.nodes.values() if n.running}

        async def probe() -> bool:
            return await self.brokers() == want

        await self.wait_for(f"brokers {sorted(want)}", probe, timeout=timeout)

    async def wait_in_sync(self, topics: Iterable[str] | None = None, *, timeout: float = 60) -> None:
        """Until every partition (of `topics`, or of all topics) has all its replicas in sync and
        a leader: after a restart, before killing another node."""
        names = list(topics) if topics is not None else None

        async def probe() -> bool:
            states = await self.partitions(names)
            return bool(states) and all(p.leader >= 0 and p.isr == p.replicas for p in states)

        await self.wait_for("all replicas in sync", probe, timeout=timeout)

    async def wait_led_without(self, node_id: int, topics: Iterable[str], *, timeout: float = 60) -> None:
        """Until every partition of `topics` has a leader other than `node_id` (after killing it)."""
        names = list(topics)

        async def probe() -> bool:
            states = await self.partitions(names)
            return bool(states) and all(p.leader >= 0 and p.leader != node_id for p in states)

        await self.wait_for(f"new leaders without node {node_id}", probe, timeout=timeout)


def _partition_states(view: dict[str, Any]) -> list[PartitionState]:
    states = []
    for topic in view["topics"]:
        if topic["error_code"]:
            raise RuntimeError(f"describing {topic['topic']} failed: error {topic['error_code']}")
        for p in topic["partitions"]:
            states.append(
                PartitionState(
                    topic=topic["topic"],
                    partition=int(p["partition"]),
                    leader=int(p["leader"]),
                    replicas=tuple(sorted(int(r) for r in p["replicas"])),
                    isr=tuple(sorted(int(r) for r in p["isr"])),
                )
            )
    return states


def _cluster_id() -> str:
    # KRaft's cluster id: 16 random bytes in URL-safe base64 without padding, as StorageTool's
    # random-uuid prints it (saves starting a JVM for it).
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def fixed_ports(base: int, size: int = 3) -> list[int]:
    """Brokers on base, base+1, ...; their controllers 100 above (19092.. and 19192.. for 19092)."""
    return [base + i for i in range(size)] + [base + 100 + i for i in range(size)]


async def _run_until_interrupted(base_port: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Its clients log every refused connection while the nodes start.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="ioc-kafka-cluster-") as root:
        cluster = KafkaCluster(Path(root), ports=fixed_ports(base_port) if base_port else None)
        try:
            cluster.start()
            await cluster.wait_brokers(set(cluster.nodes))
            print(f"export IOC_KAFKA_BOOTSTRAP={cluster.bootstrap}", flush=True)
            for node in cluster.nodes.values():
                print(f"# node {node.node_id}: pid {node.pid}, data in {node.directory}", flush=True)
            await asyncio.Event().wait()
        finally:
            cluster.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run a three-node Kafka cluster on loopback until Ctrl-C.")
    parser.add_argument("--base-port", type=int, default=None, help="first broker port (default: free ports)")
    arguments = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_until_interrupted(arguments.base_port))
    sys.exit(0)
