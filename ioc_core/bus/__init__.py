"""The message bus: topics, an idempotent producer and a commit-after-write consumer, over Kafka
(`kafka`) or the in-process log bus (`memory`), chosen by the bootstrap address (`drivers`)."""

from ioc_core.bus.clients import BusConsumer, BusProducer, BusRecord
from ioc_core.bus.drivers import BusDriver, driver_for, new_admin, new_consumer, new_producer
from ioc_core.bus.kafka import replication_for
from ioc_core.bus.topics import Topics, ensure_topics

__all__ = [
    "BusConsumer",
    "BusDriver",
    "BusProducer",
    "BusRecord",
    "Topics",
    "driver_for",
    "ensure_topics",
    "new_admin",
    "new_consumer",
    "new_producer",
    "replication_for",
]
