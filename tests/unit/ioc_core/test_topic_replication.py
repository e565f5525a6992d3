"""Topics get the replication the settings ask for, or one that follows the cluster's size: three
copies with two in sync on three brokers or more, one on a single broker. The in-process bus has
nothing to replicate and takes any setting."""

from __future__ import annotations

from typing import Any

import pytest

from ioc_core import bus
from ioc_core.bus import ensure_topics, replication_for
from ioc_core.bus import memory as memory_bus
from ioc_core.errors import ConfigurationError
from ioc_core.settings import load_settings


@pytest.mark.parametrize(
    ("brokers", "expected"),
    [(0, (1, 1)), (1, (1, 1)), (2, (2, 1)), (3, (3, 2)), (5, (3, 2))],
)
def test_unset_replication_follows_the_number_of_brokers(brokers: int, expected: tuple[int, int]) -> None:
    assert replication_for(brokers) == expected


def test_settings_override_the_cluster_size() -> None:
    assert replication_for(5, 5, 3) == (5, 3)
    assert replication_for(3, 2) == (2, 1)
    assert replication_for(3, None, 1) == (3, 1)
    assert replication_for(1, None, None) == (1, 1)


def test_more_in_sync_copies_than_copies_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="exceeds the replication factor"):
        replication_for(1, None, 2)
    with pytest.raises(ConfigurationError):
        replication_for(3, 2, 3)


def test_settings_read_and_check_the_replication(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOC_KAFKA_REPLICATION_FACTOR", raising=False)
    monkeypatch.delenv("IOC_KAFKA_MIN_INSYNC_REPLICAS", raising=False)
    unset = load_settings()
    assert unset.kafka_replication_factor is None and unset.kafka_min_insync_replicas is None

    monkeypatch.setenv("IOC_KAFKA_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("IOC_KAFKA_MIN_INSYNC_REPLICAS", "2")
    settings = load_settings()
    assert (settings.kafka_replication_factor, settings.kafka_min_insync_replicas) == (3, 2)

    monkeypatch.setenv("IOC_KAFKA_MIN_INSYNC_REPLICAS", "4")
    with pytest.raises(ConfigurationError, match="IOC_KAFKA_MIN_INSYNC_REPLICAS"):
        load_settings()
    monkeypatch.setenv("IOC_KAFKA_REPLICATION_FACTOR", "0")
    with pytest.raises(ConfigurationError):
        load_settings()


class _Response:
    def __init__(self, names: list[str]) -> None:
        self.topic_errors = [(name, 0, None) for name in names]


class FakeAdmin:
    """What `ensure_topics` asks of a Kafka admin client, with a cluster of `brokers`."""

    def __init__(self, brokers: int, existing: list[str]) -> None:
        self.brokers = brokers
        self.existing = existing
        self.created: list[Any] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def list_topics(self) -> list[str]:
        return list(self.existing)

    async def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"node_id": n} for n in range(1, self.brokers + 1)]}

    async def create_topics(self, new_topics: list[Any], **_: Any) -> _Response:
        self.created.extend(new_topics)
        return _Response([t.name for t in new_topics])


def _fake_cluster(
    monkeypatch: pytest.MonkeyPatch, brokers: int, existing: list[str] | None = None
) -> FakeAdmin:
    admin = FakeAdmin(brokers, existing or [])
    monkeypatch.setattr(bus.kafka, "admin", lambda bootstrap, **_: admin)
    return admin


@pytest.mark.parametrize(("brokers", "copies", "in_sync"), [(1, 1, 1), (3, 3, 2)])
async def test_new_topics_carry_replication_and_min_insync(
    monkeypatch: pytest.MonkeyPatch, brokers: int, copies: int, in_sync: int
) -> None:
    admin = _fake_cluster(monkeypatch, brokers, existing=["old"])
    await ensure_topics("kafka-1:9092,kafka-2:9092", ["old", "a", "b"], partitions=6)
    assert [t.name for t in admin.created] == ["a", "b"]
    for topic in admin.created:
        assert (topic.num_partitions, topic.replication_factor) == (6, copies)
        assert topic.topic_configs == {"min.insync.replicas": str(in_sync)}


async def test_explicit_replication_wins_over_the_cluster_size(monkeypatch: pytest.MonkeyPatch) -> None:
    admin = _fake_cluster(monkeypatch, 5)
    await ensure_topics("kafka:9092", ["t"], partitions=3, replication_factor=2, min_insync_replicas=2)
    [topic] = admin.created
    assert topic.replication_factor == 2
    assert topic.topic_configs == {"min.insync.replicas": "2"}


async def test_the_in_process_bus_ignores_replication() -> None:
    bootstrap = "memory://test-topic-replication"
    try:
        await ensure_topics(bootstrap, ["t"], partitions=2, replication_factor=3, min_insync_replicas=2)
        admin = bus.new_admin(bootstrap)
        assert await admin.list_topics() == ["t"]
        # Created already: nothing to ask of a cluster it does not have.
        await ensure_topics(bootstrap, ["t"], partitions=2, replication_factor=3, min_insync_replicas=2)
    finally:
        memory_bus.forget(bootstrap)
