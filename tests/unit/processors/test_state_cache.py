"""The processor's detector-state cache keeps within its budget, and a device it does not hold
is detected on exactly as one it holds: its state is read from the database."""

from __future__ import annotations

from processors.state_cache import _ENTRY_OVERHEAD, StateCache
from tests.unit.processors.test_batch_runner import STATION, readings, records, rig, summary, until


def test_devices_are_held_until_the_budget_is_spent_and_the_first_ones_stay() -> None:
    cache = StateCache(3 * (100 + _ENTRY_OVERHEAD))
    for n in range(10):
        cache.update({f"d{n}": "x" * 100})
    # Devices report in a cycle: keeping the first ones hits a share of them on every round,
    # where evicting the least recently used would hit none.
    assert [cache.get(f"d{n}") is not None for n in range(5)] == [True, True, True, False, False]
    assert (len(cache), cache.bytes, cache.hits, cache.misses) == (3, 3 * (100 + _ENTRY_OVERHEAD), 3, 2)


def test_a_held_state_is_replaced_and_one_grown_past_the_budget_is_let_go() -> None:
    cache = StateCache(2 * (100 + _ENTRY_OVERHEAD) + 50)
    cache.update({"a": "x" * 100, "b": "y" * 100})
    cache.update({"a": "z" * 120})
    assert cache.get("a") == "z" * 120 and cache.bytes == 220 + 2 * _ENTRY_OVERHEAD
    cache.update({"b": "w" * 200})
    assert cache.get("b") is None and cache.bytes == 120 + _ENTRY_OVERHEAD
    cache.update({"c": "v" * 100})
    assert cache.get("c") == "v" * 100


def test_discarded_and_cleared_states_give_their_budget_back() -> None:
    cache = StateCache(10_000)
    cache.update({"a": "x" * 100, "b": "y" * 100})
    cache.discard(["a", "unknown"])
    assert (len(cache), cache.bytes) == (1, 100 + _ENTRY_OVERHEAD)
    cache.clear()
    assert (len(cache), cache.bytes, cache.get("b")) == (0, 0, None)


async def judged(**settings: int) -> tuple[list[tuple[str, bool, str | None]], dict[str, float]]:
    r = rig(**settings)
    async with r.processor:
        # Over the threshold, still over it, then back in band long enough to resolve: each
        # batch is judged with the state the one before it stored.
        batches = [readings(1.2, 4.7), readings(4.8, first=2), readings(*[1.2] * 10, first=3)]
        for n, batch in enumerate(batches):
            await r.consumer.polls.put(records(r.settings, batch))
            await until(lambda n=n: r.consumer.commits == n + 1)
        metrics = r.processor.metrics()
    reads = next(m for m in metrics if m.name == "ioc_processor_state_reads_total")
    assert STATION.id in r.database.detector_states
    return summary(r.database.findings), {labels["source"]: value for labels, value in reads.samples}


async def test_without_memory_for_state_a_device_is_judged_from_its_stored_state() -> None:
    held, held_reads = await judged()
    read_back, read_back_reads = await judged(processor_state_cache_mb=0)
    assert read_back == held
    assert held[0][:2] == ("threshold.currentLevel", True)
    assert held[-1] == ("threshold.currentLevel", False, None)
    # The first batch finds no state anywhere; the next two find it in memory, or in the database.
    assert held_reads == {"memory": 2, "database": 1}
    assert read_back_reads == {"memory": 0, "database": 3}
