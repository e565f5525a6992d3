"""The processor's detector-state cache keeps within its budget, and a device it does not hold
is detected on exactly as one it holds: its state is read from the database."""

from __future__ import annotations

import dataclasses
from typing import Any

from processors.state_cache import _ENTRY_OVERHEAD, StateCache
from tests.unit.processors.test_batch_runner import STATION, Rig, readings, records, rig, summary, until


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
            await until(lambda n=n, r=r: r.consumer.commits == n + 1)
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


def test_held_states_are_unwritten_from_when_they_first_were_until_written() -> None:
    cache = StateCache(10_000)
    cache.update({"a": "1", "b": "1"}, unwritten={"a", "b"}, at=1.0)
    cache.update({"c": "1"}, unwritten={"c"}, at=2.0)
    # A state changed again while unwritten stays unwritten since the first time.
    cache.update({"a": "2"}, unwritten={"a"}, at=3.0)
    assert cache.unwritten_since(1.5) == {"a": "2", "b": "1"}
    assert cache.all_unwritten() == {"a": "2", "b": "1", "c": "1"}
    # Written with a batch, or written afterwards: the database has it.
    cache.update({"b": "2"}, at=4.0)
    cache.written(["c"])
    assert (cache.unwritten, cache.unwritten_since(10.0)) == (1, {"a": "2"})
    assert cache.discard(["a", "b"]) == 1 and cache.unwritten == 0
    cache.update({"d": "1"}, unwritten={"d"}, at=5.0)
    assert cache.clear() == 1


def test_what_the_cache_would_hold_is_what_it_holds() -> None:
    cache = StateCache(2 * (100 + _ENTRY_OVERHEAD) + 50)
    cache.update({"a": "x" * 100})
    texts = {"a": "x" * 150, "b": "y" * 100, "c": "z" * 100}
    would = cache.holds_after(texts)
    assert (len(cache), cache.bytes) == (1, 100 + _ENTRY_OVERHEAD), "asking changes nothing"
    cache.update(texts)
    assert would == {d for d in texts if cache.get(d) is not None} == {"a", "b"}


def unzoned_rig(**settings: Any) -> Rig:
    # A station in no district or area: no zone reads its signal, so its state may wait.
    r = rig(**settings)
    r.database.profiles[STATION.id] = dataclasses.replace(STATION, district=None)
    return r


def gauge(r: Rig, name: str) -> float:
    return next(m for m in r.processor.metrics() if m.name == name).samples[0][1]


def unwritten(r: Rig) -> float:
    return gauge(r, "ioc_processor_state_unwritten_devices")


def stored_last_ts(r: Rig) -> str | None:
    state = r.database.detector_states.get(STATION.id)
    return None if state is None else state["last_ts"]


async def test_a_state_whose_alarms_did_not_change_is_written_later_and_when_the_processor_stops() -> None:
    r = unzoned_rig(processor_state_write_s=3600)
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 1.3)))
        await until(lambda: r.consumer.commits == 1)
        assert stored_last_ts(r) is None and unwritten(r) == 1
        # The alarm opens: the state goes with the batch that opened it.
        await r.consumer.polls.put(records(r.settings, readings(4.7, first=2)))
        await until(lambda: r.consumer.commits == 2)
        opened_at = readings(4.7, first=2)[0].ts.isoformat()
        assert stored_last_ts(r) == opened_at and unwritten(r) == 0
        assert r.database.detector_states[STATION.id]["metrics"]["currentLevel"]["alarms"]
        # Still over the threshold: the alarm's tracker is the same, the baseline waits.
        await r.consumer.polls.put(records(r.settings, readings(4.8, first=3)))
        await until(lambda: r.consumer.commits == 3)
        assert stored_last_ts(r) == opened_at
        assert unwritten(r) == 1
    assert stored_last_ts(r) == readings(4.8, first=3)[0].ts.isoformat()


async def test_a_state_left_unwritten_is_written_once_due_though_its_device_fell_silent() -> None:
    r = unzoned_rig(processor_state_write_s=0.05)
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 1.3)))
        await until(lambda: r.consumer.commits == 1)
        await until(lambda: stored_last_ts(r) is not None, timeout_s=5)
        assert unwritten(r) == 0


async def test_a_rebalance_writes_the_unwritten_states_before_letting_them_go() -> None:
    r = unzoned_rig(processor_state_write_s=3600)
    async with r.processor:
        await r.consumer.polls.put(records(r.settings, readings(1.2, 1.3)))
        await until(lambda: r.consumer.commits == 1)
        await r.consumer.listener.on_partitions_revoked(set())
        assert stored_last_ts(r) == readings(1.3, first=1)[0].ts.isoformat()
        assert (gauge(r, "ioc_processor_state_cache_devices"), unwritten(r)) == (0, 0)


async def test_a_failed_batch_is_judged_again_from_the_unwritten_state_it_started_from() -> None:
    batches = [readings(1.2, 1.25, 1.3), readings(4.7, first=3), readings(4.8, 1.0, 1.0, 1.0, first=4)]
    outcomes = []
    for write_s, failing in ((0, False), (3600, False), (3600, True)):
        r = unzoned_rig(processor_state_write_s=write_s)
        async with r.processor:
            for n, batch in enumerate(batches):
                # The failure comes after detection has moved the states on, in every batch.
                r.database.findings_failures = 1 if failing else 0
                await r.consumer.polls.put(records(r.settings, batch))
                await until(lambda n=n, r=r: r.consumer.commits == n + 1)
        assert failing == ("findings failed" in r.journal)
        outcomes.append((r.database.findings, r.database.detector_states[STATION.id]))
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert [f.active for f in outcomes[0][0]][:1] == [True]


async def test_a_commit_made_though_it_failed_is_found_and_its_alarm_still_resolves() -> None:
    batches = [readings(1.2, 1.25, 1.3), readings(4.7, first=3), readings(1.0, 1.0, 1.0, 1.0, first=4)]
    outcomes = []
    for lost_answer in (False, True):
        r = unzoned_rig(processor_state_write_s=3600)
        async with r.processor:
            for n, batch in enumerate(batches):
                # The alarm opens in the second batch, whose commit is made but reported failed:
                # its retry finds the readings stored, so only the database has the open tracker,
                # and only that tracker can resolve the alarm when the level is back in band.
                r.database.failures_after_commit = 1 if lost_answer and n == 1 else 0
                await r.consumer.polls.put(records(r.settings, batch))
                await until(lambda n=n, r=r: r.consumer.commits == n + 1)
        assert lost_answer == ("commit answer lost" in r.journal)
        outcomes.append((summary(r.database.findings), r.database.detector_states[STATION.id]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0][-1] == ("threshold.currentLevel", False, None)
