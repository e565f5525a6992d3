"""An in-process log bus standing in for Kafka when the system runs in one process (`ioc up`
without `IOC_KAFKA_BOOTSTRAP`): `memory://NAME` as the bootstrap address.

It keeps what the components rely on from Kafka:
- topics of partitions, each an append-only log with offsets; a key always lands on the same
  partition, so one device's records (and one alarm's events) stay in order;
- consumer groups whose members split the partitions (with the rebalance listener called as
  aiokafka calls it) and whose committed offsets say where a member that takes over a partition
  starts: offsets are committed only when the consumer says so, after its rows are durable;
- group-less consumers that assign partitions and seek, for the live event stream's exact resume.

The classes copy the parts of aiokafka's consumer, producer and admin client that the bus module
and the event hub use, so both run unchanged on either.

Retention never drops a record that a group still needs. A partition keeps about its newest
`retained` records; once it is full and its oldest records are not yet committed by every group
that holds it back, a send to it waits (as an MQTT broker withholds a PUBACK) until commits make
room, and sends waiting for one partition go in in the order they came. What holds a partition
back:
- a group with members holds the partitions of the topics they subscribe to, from its committed
  offset (from the partition's start before its first commit there);
- a group without members holds the partitions it has commits for, until `GROUP_HOLD_S` after
  its last commit, as Kafka keeps an empty group's offsets for `offsets.retention.minutes`: a
  group that is gone for good (a renamed `IOC_PROCESSOR_GROUP_ID`) holds producers back until
  then at most, never for ever. Its commits stay; should it come back after retention dropped
  records it had not committed, it resumes at the oldest record kept, with a warning.
Group-less readers (assign and seek, for the live stream) hold nothing back: a reader behind
the retention skips to the oldest record kept. A waiting send ends with `ProducerClosed` when
its producer stops or the log closes, and can be cancelled.

A log opened with a directory (`open_log`, as `ioc up` does under its data directory) is also
written to disk: each partition as segment files of checksummed, length-prefixed records, each
group's committed offsets as a small JSON file replaced atomically. A send resolves only once its
record is fsynced, and readers see a record only from then on (as Kafka's consumers see records
up to the high watermark), so a group cannot commit a record a crash can take back. The next start
reads the segments back, ending each partition's log at the first torn or damaged record, and
resumes every group from its commits, never past the end that was read back. Without a
directory, records live in memory only.

The package: `log` (`MemoryLog`: partitions, appends, retention, durability), `groups` (the
consumer groups a log composes), `segments` (the on-disk format), `clients` (the aiokafka-shaped
clients), `registry` (the process's logs by name); here, the driver functions of
`ioc_core.bus.drivers`.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ioc_core.bus.memory.clients import MemoryAdmin, MemoryConsumer, MemoryProducer
from ioc_core.bus.memory.groups import GROUP_HOLD_S
from ioc_core.bus.memory.log import DEFAULT_PARTITIONS, DEFAULT_RETAINED, SEGMENT_RECORDS, MemoryLog
from ioc_core.bus.memory.registry import SCHEME, forget, is_memory, log_for, open_log

# The tunables are named here for reading; they take effect where they are read (`log` reads
# SEGMENT_RECORDS, `groups` GROUP_HOLD_S), so that is where to change them.
__all__ = [
    "DEFAULT_PARTITIONS",
    "DEFAULT_RETAINED",
    "GROUP_HOLD_S",
    "SCHEME",
    "SEGMENT_RECORDS",
    "MemoryAdmin",
    "MemoryConsumer",
    "MemoryLog",
    "MemoryProducer",
    "admin",
    "consumer",
    "forget",
    "is_memory",
    "log_for",
    "open_log",
    "producer",
    "replication",
]


# The driver interface (`ioc_core.bus.drivers.BusDriver`): clients shaped like aiokafka's.
def consumer(bootstrap: str, **options: Any) -> AIOKafkaConsumer:
    return MemoryConsumer(bootstrap_servers=bootstrap, **options)


def producer(bootstrap: str, **options: Any) -> AIOKafkaProducer:
    return MemoryProducer(bootstrap_servers=bootstrap, **options)


def admin(bootstrap: str, **options: Any) -> AIOKafkaAdminClient:
    return MemoryAdmin(bootstrap_servers=bootstrap, **options)


async def replication(
    client: AIOKafkaAdminClient, replication_factor: int | None, min_insync_replicas: int | None
) -> tuple[int, int]:
    """One process holds one copy: there is nothing to replicate."""
    return 1, 1
