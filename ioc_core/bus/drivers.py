"""One bus driver per bootstrap URL scheme: `memory://NAME` is the in-process log bus, anything
else a Kafka cluster. Each driver makes aiokafka-shaped clients, so the rest of the bus runs the
same on either."""

from __future__ import annotations

from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ioc_core.bus import kafka, memory


class BusDriver(Protocol):
    def consumer(self, bootstrap: str, **options: Any) -> AIOKafkaConsumer: ...

    def producer(self, bootstrap: str, **options: Any) -> AIOKafkaProducer: ...

    def admin(self, bootstrap: str, **options: Any) -> AIOKafkaAdminClient: ...

    async def replication(
        self, client: AIOKafkaAdminClient, replication_factor: int | None, min_insync_replicas: int | None
    ) -> tuple[int, int]: ...


# A bootstrap without a scheme of this table is Kafka's `host:port[,host:port...]`.
_BY_SCHEME: dict[str, BusDriver] = {memory.SCHEME: memory}


def driver_for(bootstrap: str) -> BusDriver:
    for scheme, driver in _BY_SCHEME.items():
        if bootstrap.startswith(scheme):
            return driver
    return kafka


def new_consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    return driver_for(bootstrap).consumer(bootstrap, **options)


def new_producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    return driver_for(bootstrap).producer(bootstrap, **options)


def new_admin(bootstrap: str, **options: Any) -> AIOKafkaAdminClient:
    return driver_for(bootstrap).admin(bootstrap, **options)
