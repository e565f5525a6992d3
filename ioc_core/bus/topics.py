"""The bus's topics: their names, and their creation with the partitions and copies they need."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from ioc_core.bus.drivers import driver_for
from ioc_core.domains import DOMAINS
from ioc_core.errors import IocError, ServiceUnavailableError

log = logging.getLogger(__name__)

_TOPIC_EXISTS = 36


@dataclass(frozen=True, slots=True)
class Topics:
    """The bus's topic names. The prefix (empty by default, so the names are the contract's)
    lets several deployments, or test runs, share one Kafka cluster without seeing each other."""

    prefix: str = ""

    def telemetry(self, domain: str) -> str:
        return f"{self.prefix}ioc.telemetry.{domain}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}ioc.deadletter"

    @property
    def events(self) -> str:
        return f"{self.prefix}ioc.events"

    def telemetry_topics(self) -> list[str]:
        return [self.telemetry(name) for name in DOMAINS]

    def all(self) -> list[str]:
        return [*self.telemetry_topics(), self.deadletter, self.events]

    def domain_of(self, topic: str) -> str | None:
        """The domain whose telemetry travels on `topic`, or None for the other topics."""
        base = f"{self.prefix}ioc.telemetry."
        name = topic[len(base) :] if topic.startswith(base) else None
        return name if name in DOMAINS else None


async def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int,
    replication_factor: int | None = None,
    min_insync_replicas: int | None = None,
) -> None:
    """Create missing topics (idempotent); the broker may also auto-create, but with its defaults.

    Unset, `replication_factor` and `min_insync_replicas` follow the number of live brokers (see
    `replication_for`). The in-process bus (`memory://`) has nothing to replicate."""
    admin = driver_for(bootstrap).admin(bootstrap, request_timeout_ms=15_000)
    try:
        await admin.start()
    except KafkaError as exc:
        raise ServiceUnavailableError(
            f"Kafka at {bootstrap} is unreachable: {exc}", public="Kafka is unavailable"
        ) from exc
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        driver = driver_for(bootstrap)
        copies, in_sync = await driver.replication(admin, replication_factor, min_insync_replicas)
        response = await admin.create_topics(
            [
                NewTopic(
                    name=t,
                    num_partitions=partitions,
                    replication_factor=copies,
                    topic_configs={"min.insync.replicas": str(in_sync)},
                )
                for t in missing
            ]
        )
        for topic, code, message in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                raise IocError(f"creating Kafka topic {topic} failed: error {code} {message}", retriable=True)
        log.info(
            "created Kafka topics %s (%d copies, %d in sync for a write)", ", ".join(missing), copies, in_sync
        )
    finally:
        await admin.close()
