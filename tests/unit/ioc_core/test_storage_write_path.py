"""The pure parts of the readings' write path: copies judged within a batch before the database is
asked, and the staged rows of one domain with the metrics each reading adds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ioc_core.storage.copies import _judge_batch
from ioc_core.storage.readings import _added_metrics, _StagedRows
from ioc_core.telemetry import Reading

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _reading(
    device: str,
    seconds: int = 0,
    *,
    seq: int | None = None,
    device_time: bool = False,
    packet_id: int | None = None,
    redelivered: bool = False,
    **metrics: float,
) -> Reading:
    at = T0 + timedelta(seconds=seconds)
    return Reading(
        device, "c", "water", at, seq, metrics or {"pressure": 1.0}, at, device_time, redelivered, packet_id
    )


def test_a_repeated_seq_in_one_batch_is_judged_by_its_first() -> None:
    readings = [_reading("a", 0, seq=7), _reading("a", 1, seq=7), _reading("a", 2, seq=8)]
    judged = _judge_batch(readings)
    assert judged.keep == [True, False, True]
    assert list(judged.by_seq.values()) == [0, 2]
    assert not judged.first_deliveries and not judged.redeliveries


def test_readings_stamped_by_the_device_are_left_to_their_row() -> None:
    readings = [_reading("a", 0, seq=7, device_time=True), _reading("a", 0, seq=7, device_time=True)]
    judged = _judge_batch(readings)
    assert judged.keep == [True, True]
    assert not judged.by_seq


def test_a_flagged_copy_beside_its_first_delivery_is_dropped() -> None:
    first = _reading("a", 0, packet_id=3)
    copy = _reading("a", 2, packet_id=3, redelivered=True)
    judged = _judge_batch([first, copy])
    assert judged.keep == [True, False]
    assert list(judged.first_deliveries.values()) == [first.received_at]
    assert not judged.redeliveries


def test_flagged_copies_without_a_first_delivery_are_asked_about_once() -> None:
    copies = [_reading("a", s, packet_id=3, redelivered=True) for s in (0, 1)]
    judged = _judge_batch(copies)
    assert judged.keep == [True, False]
    assert list(judged.redeliveries.values()) == [0]


def test_staged_rows_keep_the_first_value_of_each_metric() -> None:
    readings = [
        _reading("a", 0, pressure=1.0),
        _reading("b", 0, pressure=5.0),
        _reading("a", 0, pressure=9.0, flow=2.0),
    ]
    staged = _StagedRows.of(readings, [0, 1, 2])
    assert staged.first == {("a", T0): 0, ("b", T0): 1}
    assert staged.later == {("a", T0): [2]}
    assert staged.metrics(readings, ("a", T0)) == {"pressure": 1.0, "flow": 2.0}
    assert staged.metrics(readings, ("b", T0)) is readings[1].metrics


def test_added_metrics_fill_what_an_existing_row_lacks() -> None:
    readings = [_reading("a", 0, pressure=1.0, flow=2.0), _reading("b", 0, pressure=5.0)]
    staged = _StagedRows.of(readings, [0, 1])
    added: list[dict[str, float]] = [{}] * len(readings)
    # Row a existed with pressure only; row b existed with everything b brings.
    merges = _added_metrics(readings, staged, {("a", T0): {"pressure"}, ("b", T0): {"pressure"}}, added)
    assert merges == [("a", T0)]
    assert added == [{"flow": 2.0}, {}]
