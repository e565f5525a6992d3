"""The Kafka driver: aiokafka's own clients, and topic copies that follow the cluster's size."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ioc_core.errors import ConfigurationError


def consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **options)


def producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, **options)


def admin(bootstrap: str, **options: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, **options)


async def replication(
    client: AIOKafkaAdminClient, replication_factor: int | None, min_insync_replicas: int | None
) -> tuple[int, int]:
    """Copies of each new partition and the copies a write must reach, on the live cluster."""
    brokers = len((await client.describe_cluster())["brokers"])
    return replication_for(brokers, replication_factor, min_insync_replicas)


def replication_for(
    brokers: int, replication_factor: int | None = None, min_insync_replicas: int | None = None
) -> tuple[int, int]:
    """Copies of each partition and the copies a write must reach (`min.insync.replicas`): as
    given, or from the cluster's size. Three copies with two in sync survive one broker lost
    without refusing writes, and a second without losing an acknowledged one."""
    copies = replication_factor if replication_factor is not None else max(1, min(3, brokers))
    in_sync = min_insync_replicas if min_insync_replicas is not None else (2 if copies >= 3 else 1)
    if in_sync > copies:
        raise ConfigurationError(
            f"min.insync.replicas {in_sync} exceeds the replication factor {copies}: no write could succeed"
        )
    return copies, in_sync
