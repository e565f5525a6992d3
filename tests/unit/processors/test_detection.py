"""The detection layer: each detector fires on its pattern and stays quiet otherwise, alarms clear
with hysteresis and only after several in-band readings, late and replayed readings change nothing,
state survives its JSON form, device settings win over domain defaults, and district correlation
gives one finding per district."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ioc_core.alarms import Finding
from ioc_core.domains import DOMAINS
from ioc_core.telemetry import Reading
from processors.detection import (
    DetectionSettings,
    DeviceDetection,
    DeviceDetectorState,
    DeviceProfile,
    DistrictFloodCorrelator,
    FloodZone,
    StationSignal,
    offline_finding,
)
from processors.detection.detectors import _days_of_kind
from processors.detection.state import MetricState
from processors.replay import replay_profile

START = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)
DETECTION = DeviceDetection()


def station(
    thresholds: Mapping[str, Mapping[str, float | None]] | None = None,
    *,
    device_id: str = "hn-flood-001",
    name: str | None = "Trạm Phan Đình Phùng",
    domain: str = "flood",
    district: str | None = "Ba Đình",
) -> DeviceProfile:
    return DeviceProfile.of(
        id=device_id, city="ha-noi", domain=domain, name=name, district=district, thresholds=thresholds or {}
    )


def readings_of(
    profile: DeviceProfile,
    values: Iterable[Mapping[str, float]],
    *,
    start: datetime = START,
    every_s: float = 10,
) -> list[Reading]:
    return [
        Reading(
            device_id=profile.id,
            city=profile.city,
            domain=profile.domain,
            ts=start + timedelta(seconds=index * every_s),
            seq=index,
            metrics=dict(metrics),
            received_at=start + timedelta(seconds=index * every_s),
        )
        for index, metrics in enumerate(values)
    ]


def levels(*values: float) -> list[dict[str, float]]:
    return [{"currentLevel": value} for value in values]


def evaluate_each(
    profile: DeviceProfile,
    readings: Sequence[Reading],
    state: DeviceDetectorState | None = None,
    *,
    detection: DeviceDetection = DETECTION,
) -> list[Finding]:
    """Reading by reading, as a processor seeing one reading per batch would."""
    state = state if state is not None else DeviceDetectorState()
    findings: list[Finding] = []
    for reading in readings:
        findings.extend(detection.evaluate(profile, [reading], state))
    return findings


def of_rule(findings: Iterable[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule == rule]


def summary(findings: Iterable[Finding]) -> list[tuple[str, bool, str | None]]:
    return [(f.rule, f.active, f.severity) for f in findings]


def episodes(findings: Iterable[Finding]) -> list[tuple[str, bool]]:
    """Raises and recoveries in order, repeats of an open alarm left out."""
    seen: list[tuple[str, bool]] = []
    state: dict[str, bool] = {}
    for finding in findings:
        if state.get(finding.rule) != finding.active:
            seen.append((finding.rule, finding.active))
        state[finding.rule] = finding.active
    return seen


# Sudden synthetic jumps are also rates of change; these isolate the limits.
LIMITS_ONLY = {"currentLevel": {"rise_above": None, "zscore": None}}


# Threshold with hysteresis


def test_threshold_raises_with_place_value_and_limit_in_both_languages() -> None:
    profile = station(LIMITS_ONLY)
    state = DeviceDetectorState()
    findings = DETECTION.evaluate(profile, readings_of(profile, levels(1.2, 4.7)), state)
    assert summary(findings) == [("threshold.currentLevel", True, "critical")]
    finding = findings[0]
    assert (finding.subject, finding.device_id, finding.city, finding.domain, finding.district) == (
        "hn-flood-001",
        "hn-flood-001",
        "ha-noi",
        "flood",
        "Ba Đình",
    )
    assert (finding.metric, finding.value, finding.threshold, finding.repeats) == (
        "currentLevel",
        4.7,
        4.5,
        1,
    )
    assert finding.at == START + timedelta(seconds=10)
    assert finding.message_vi == (
        "Mực nước tại Trạm Phan Đình Phùng (Ba Đình, Hà Nội) là 4,70 m, vượt ngưỡng nguy hiểm 4,50 m"
    )
    assert finding.message_en == (
        "Water level at Trạm Phan Đình Phùng (Ba Đình, Hà Nội) is 4.70 m, above the danger limit 4.50 m"
    )
    assert state.open_alarms == {"threshold.currentLevel": "critical"}


def test_warn_then_crit_is_one_alarm_carrying_the_worst_severity() -> None:
    profile = station(LIMITS_ONLY)
    state = DeviceDetectorState()
    first = DETECTION.evaluate(profile, readings_of(profile, levels(3.2, 3.4)), state)
    assert summary(first) == [("threshold.currentLevel", True, "medium")]
    assert first[0].repeats == 2
    later = DETECTION.evaluate(
        profile, readings_of(profile, levels(3.6, 4.8, 4.0), start=START + timedelta(minutes=1)), state
    )
    assert summary(later) == [("threshold.currentLevel", True, "critical")]
    assert (later[0].value, later[0].threshold, later[0].repeats) == (4.8, 4.5, 3)
    assert state.open_alarms == {"threshold.currentLevel": "critical"}


def test_below_limits_read_as_below() -> None:
    profile = station(domain="water", name="Trạm bơm Yên Phụ")
    findings = DETECTION.evaluate(profile, readings_of(profile, [{"pressure": 1.2}]), DeviceDetectorState())
    assert summary(findings) == [("threshold.pressure", True, "medium")]
    assert findings[0].message_vi.endswith("là 1,20 bar, dưới ngưỡng cảnh báo 1,50 bar")
    assert findings[0].message_en.endswith("is 1.20 bar, below the warning limit 1.50 bar")


def test_an_alarm_holds_inside_the_hysteresis_and_clears_after_three_readings_beyond_it() -> None:
    profile = station(LIMITS_ONLY)
    # 2.95 is back under 3.0 but within the 0.1 m hysteresis: the alarm holds, however long.
    findings = evaluate_each(profile, readings_of(profile, levels(3.3, *[2.95] * 10, 2.85, 2.85, 2.85)))
    assert summary(findings) == [
        ("threshold.currentLevel", True, "medium"),
        ("threshold.currentLevel", False, None),
    ]
    recovered = findings[1]
    assert recovered.at == START + timedelta(seconds=130)
    assert recovered.value == 2.85 and recovered.repeats == 0
    assert (
        recovered.message_vi
        == "Mực nước tại Trạm Phan Đình Phùng (Ba Đình, Hà Nội) đã trở lại trong ngưỡng: 2,85 m"
    )
    assert (
        recovered.message_en
        == "Water level at Trạm Phan Đình Phùng (Ba Đình, Hà Nội) is back within limits: 2.85 m"
    )


def test_a_value_flapping_around_a_limit_is_one_alarm_with_repeats() -> None:
    profile = station({"currentLevel": {"hysteresis": None, "rise_above": None, "zscore": None}})
    flapping = [3.05, 2.8, 2.9, 3.1] * 15
    findings = evaluate_each(profile, readings_of(profile, levels(1.0, *flapping)))
    assert {f.rule for f in findings} == {"threshold.currentLevel"}
    assert all(f.active for f in findings)
    assert sum(f.repeats for f in findings) == 30
    # In one batch: one finding, not one per crossing.
    batched = DETECTION.evaluate(profile, readings_of(profile, levels(1.0, *flapping)), DeviceDetectorState())
    assert summary(batched) == [("threshold.currentLevel", True, "medium")]
    assert batched[0].repeats == 30


def test_raised_and_recovered_in_one_batch_gives_active_then_inactive() -> None:
    profile = station(LIMITS_ONLY)
    findings = DETECTION.evaluate(
        profile, readings_of(profile, levels(3.5, 2.0, 2.0, 2.0)), DeviceDetectorState()
    )
    assert summary(findings) == [
        ("threshold.currentLevel", True, "medium"),
        ("threshold.currentLevel", False, None),
    ]


def test_recovered_and_raised_again_in_one_batch_ends_with_the_open_alarm() -> None:
    profile = station(LIMITS_ONLY)
    state = DeviceDetectorState()
    DETECTION.evaluate(profile, readings_of(profile, levels(4.7)), state)
    findings = DETECTION.evaluate(
        profile, readings_of(profile, levels(2.0, 2.0, 2.0, 3.5), start=START + timedelta(minutes=1)), state
    )
    assert summary(findings) == [
        ("threshold.currentLevel", False, None),
        ("threshold.currentLevel", True, "medium"),
    ]
    assert findings[1].repeats == 1
    assert state.open_alarms == {"threshold.currentLevel": "medium"}


def test_the_rules_of_one_metric_share_one_alarm_and_keep_it_open_while_one_holds() -> None:
    profile = station({"currentLevel": {"zscore": None}})
    state = DeviceDetectorState()
    DETECTION.evaluate(profile, readings_of(profile, levels(2.0, 2.0)), state)
    # A jump past the warning level is also a fast rise: two findings, one alarm.
    jump = DETECTION.evaluate(
        profile, readings_of(profile, levels(3.4), start=START + timedelta(minutes=1)), state
    )
    assert summary(jump) == [("threshold.currentLevel", True, "medium"), ("rate.currentLevel", True, "high")]
    assert {f.key for f in jump} == {("hn-flood-001", "excursion.currentLevel")}
    # Eleven minutes later the rise has left the rate's window while the level stays up: the
    # threshold's repeat comes before the rate's recovery, so the alarm never looks resolved.
    later = DETECTION.evaluate(
        profile, readings_of(profile, levels(*[3.4] * 6), start=START + timedelta(minutes=12)), state
    )
    assert summary(later) == [("threshold.currentLevel", True, "medium"), ("rate.currentLevel", False, None)]
    assert state.open_alarm_keys == {"excursion.currentLevel"}


# Rate of change


def test_a_flash_flood_rise_raises_a_rate_alarm() -> None:
    profile = station({"currentLevel": {"zscore": None}})
    rising = [1.0 + 0.06 * step for step in range(12)]
    findings = evaluate_each(profile, readings_of(profile, levels(*[1.0] * 5, *rising)))
    assert episodes(findings) == [("rate.currentLevel", True)]
    first = findings[0]
    assert first.threshold == 0.5 and first.value == pytest.approx(0.54)
    assert first.message_en.startswith(
        "Water level at Trạm Phan Đình Phùng (Ba Đình, Hà Nội) rose by 0.54 m within 10 min"
    )
    assert "tăng 0,54 m trong 10 phút" in first.message_vi


def test_a_burst_main_raises_one_rate_alarm_and_no_statistical_one() -> None:
    profile = station(domain="water", name="Trạm bơm Yên Phụ")
    rng = random.Random(3)
    normal = [{"pressure": round(3.5 + rng.gauss(0, 0.03), 3)} for _ in range(60)]
    burst = [{"pressure": 1.8}] * 5
    findings = evaluate_each(profile, readings_of(profile, [*normal, *burst]))
    assert episodes(findings) == [("rate.pressure", True)]
    assert not of_rule(findings, "zscore.pressure")
    assert "giảm" in findings[0].message_vi and "fell by" in findings[0].message_en


def test_a_rate_alarm_recovers_once_the_change_leaves_the_window() -> None:
    profile = station({"currentLevel": {"zscore": None}})
    values = levels(*[1.0] * 5, 1.6, *[1.6] * 70)
    findings = evaluate_each(profile, readings_of(profile, values))
    assert episodes(findings) == [("rate.currentLevel", True), ("rate.currentLevel", False)]
    # About the window (600 s) later, give or take the down-sampling of the history and clear-after.
    assert timedelta(seconds=540) < findings[-1].at - findings[0].at < timedelta(seconds=660)


def test_a_tide_does_not_raise_a_rate_alarm() -> None:
    profile = station()
    # 0.2 m an hour, the steepest a tide moves.
    tide = levels(*[1.0 + 0.2 * step * 10 / 3600 for step in range(720)])
    assert evaluate_each(profile, readings_of(profile, tide)) == []


# Statistical


def flow_meter(thresholds: Mapping[str, Mapping[str, float | None]] | None = None) -> DeviceProfile:
    return station(thresholds, domain="water", device_id="hn-water-004", name="Đồng hồ tổng Yên Phụ")


def flows(rng: random.Random, count: int, mean: float = 300.0, std: float = 5.0) -> list[dict[str, float]]:
    return [{"flow": round(rng.gauss(mean, std), 1)} for _ in range(count)]


# The baseline's mechanics within minutes, on a flow meter: without the day a metric with a daily
# cycle waits before its statistics speak (tested on its own below).
UNHELD = DeviceDetection(DetectionSettings(daily_warmup_days=0.0))


def test_a_metric_with_a_daily_cycle_is_judged_once_it_has_seen_a_day() -> None:
    meter = flow_meter()
    rng = random.Random(5)
    first_hours = [*flows(rng, 60), {"flow": 500.0}]
    assert evaluate_each(meter, readings_of(meter, first_hours, every_s=600)) == []
    state = DeviceDetectorState()
    evaluate_each(meter, readings_of(meter, flows(rng, 150), every_s=600), state)
    next_day = START + timedelta(days=1, hours=1)
    late = evaluate_each(meter, readings_of(meter, [{"flow": 500.0}], start=next_day), state)
    assert summary(late) == [("zscore.flow", True, "low")]
    # A metric nothing is known of (a series replayed without a domain) is not held.
    series, name = replay_profile(None, None)
    values = [{name: v["flow"]} for v in first_hours]
    assert summary(evaluate_each(series, readings_of(series, values, every_s=600))) == [
        (f"zscore.{name}", True, "low")
    ]


def test_a_spike_far_outside_the_usual_level_raises_a_statistical_alarm() -> None:
    profile = flow_meter()
    rng = random.Random(5)
    findings = evaluate_each(
        profile, readings_of(profile, [*flows(rng, 60), {"flow": 500.0}]), detection=UNHELD
    )
    assert summary(findings) == [("zscore.flow", True, "low")]
    assert findings[0].value == 500.0 and findings[0].threshold == pytest.approx(300 + 6 * 20, abs=5)
    assert "bất thường so với mức gần đây" in findings[0].message_vi
    assert "standard deviations away" in findings[0].message_en


def test_no_statistical_alarm_during_warm_up() -> None:
    profile = flow_meter()
    rng = random.Random(5)
    assert (
        evaluate_each(profile, readings_of(profile, [*flows(rng, 20), {"flow": 500.0}, *flows(rng, 5)])) == []
    )


def test_one_spike_does_not_blind_the_statistics() -> None:
    profile = flow_meter()
    rng = random.Random(6)
    values = [*flows(rng, 60), {"flow": 900.0}, *flows(rng, 10), {"flow": 500.0}, *flows(rng, 10)]
    findings = evaluate_each(profile, readings_of(profile, values), detection=UNHELD)
    assert summary(findings) == [("zscore.flow", True, "low"), ("zscore.flow", False, None)] * 2


def generic_values(rng: random.Random, count: int, mean: float = 100.0) -> list[dict[str, float]]:
    return [{"value": rng.gauss(mean, 1.0)} for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
def test_a_persistent_deviation_alarms_where_a_single_one_of_its_size_does_not(seed: int) -> None:
    # Debouncing: 5 standard deviations out is no alarm once, but is one when it persists (the
    # CUSUM of the deviations past 2.7), before the baseline has followed it.
    profile, _ = replay_profile()
    rng = random.Random(seed)
    once = [*generic_values(rng, 200), {"value": 105.0}, *generic_values(rng, 30)]
    assert evaluate_each(profile, readings_of(profile, once)) == []
    state = DeviceDetectorState()
    assert evaluate_each(profile, readings_of(profile, generic_values(rng, 200)), state) == []
    shifted = readings_of(profile, generic_values(rng, 10, mean=105.0), start=START + timedelta(hours=1))
    findings = evaluate_each(profile, shifted, state)
    assert episodes(findings)[:1] == [("zscore.value", True)]
    assert findings[0].at <= shifted[5].ts
    # Back to normal (or the new level learned), the sums drain and the alarm resolves.
    calm = readings_of(profile, generic_values(rng, 60), start=START + timedelta(hours=2))
    evaluate_each(profile, calm, state)
    assert state.open_alarms == {}
    assert state.metrics["value"].cusum_up < 6 and state.metrics["value"].cusum_down < 6


def spiky_values(rng: random.Random, count: int) -> list[dict[str, float]]:
    # A key-press count: mostly nothing, now and then a burst, mostly of a few, now and then of
    # a few dozen.
    return [{"value": rng.expovariate(1 / 10) if rng.random() < 0.03 else 0.0} for _ in range(count)]


def test_a_metric_whose_normal_has_spikes_alarms_only_on_what_passes_its_own_tail() -> None:
    # Its spread is about zero, so every burst stands hundreds of deviations out; the band is
    # never narrower than the values' 99.9 % residual, so its usual bursts stop alarming once it
    # has seen them, and a burst far beyond any of them still alarms.
    profile, _ = replay_profile()
    rng = random.Random(11)
    state = DeviceDetectorState()
    first = evaluate_each(profile, readings_of(profile, spiky_values(rng, 3000)), state)
    later_start = START + timedelta(days=1)
    later = evaluate_each(profile, readings_of(profile, spiky_values(rng, 3000), start=later_start), state)
    # Bursts come about 90 times in 3,000 readings: in the first 3,000 most alarm while the tail
    # learns them, in the next at most 20 (each alarm is a raise and a resolve).
    assert len(episodes(later)) < len(episodes(first)) / 1.5 and len(episodes(later)) <= 2 * 20
    assert state.metrics["value"].tail > 20.0
    burst = readings_of(profile, [{"value": 400.0}], start=later_start + timedelta(days=1))
    assert summary(evaluate_each(profile, burst, state)) == [("zscore.value", True, "low")]


@pytest.mark.parametrize("seed", range(3))
def test_near_gaussian_noise_keeps_its_band_at_the_zscore_limit(seed: int) -> None:
    profile, _ = replay_profile()
    rng = random.Random(seed)
    state = DeviceDetectorState()
    evaluate_each(profile, readings_of(profile, generic_values(rng, 5000)), state)
    metric = state.metrics["value"]
    # The 99.9 % residual of normal noise is 3.3 standard deviations, inside the limit's 6.
    assert 2.0 < metric.tail < 4.5 * metric.deviation * math.sqrt(math.pi / 2)


def test_a_long_excursion_barely_moves_the_tail() -> None:
    # While the alarm is open the tail learns at a tenth of its pace: one long event does not
    # raise the line for the days the estimate takes to come down again.
    profile, _ = replay_profile()
    rng = random.Random(4)
    state = DeviceDetectorState()
    evaluate_each(profile, readings_of(profile, generic_values(rng, 2000)), state)
    before = state.metrics["value"].tail
    excursion = readings_of(profile, generic_values(rng, 40, mean=150.0), start=START + timedelta(days=1))
    assert episodes(evaluate_each(profile, excursion, state))[:1] == [("zscore.value", True)]
    assert state.metrics["value"].tail < 1.25 * before + 10.0


def test_a_baseline_stored_without_its_tail_keeps_the_rest() -> None:
    stored = {"version": 2, "metrics": {"value": {"baseline": [40, 100.0, 0.5, 1.0, 0, 1.5, 0.0]}}}
    metric = DeviceDetectorState.from_json(stored).metrics["value"]
    assert (metric.count, metric.level, metric.cusum_up, metric.tail) == (40, 100.0, 1.5, 0.0)
    metric.tail = 7.25
    again = DeviceDetectorState.from_json(json.loads(json.dumps({"metrics": {"value": metric.to_json()}})))
    assert again.metrics["value"].tail == 7.25


def test_a_metric_with_a_daily_cycle_is_not_judged_by_persistence() -> None:
    # Its hours are learned over weeks; until they settle, rush hour runs persistently off them.
    meter = flow_meter()
    rng = random.Random(8)
    state = DeviceDetectorState()
    assert evaluate_each(meter, readings_of(meter, flows(rng, 200)), state, detection=UNHELD) == []
    # 100 above is 5 of its spreads (its floor, 20): no single value alarms, ten in a row would.
    shifted = readings_of(meter, flows(rng, 10, mean=400.0), start=START + timedelta(hours=1))
    assert evaluate_each(meter, shifted, state, detection=UNHELD) == []


def test_the_floor_keeps_a_near_constant_signal_quiet() -> None:
    values = [{"pH": 7.2}] * 40 + [{"pH": 7.25}]
    ph_meter = station(domain="water", device_id="hn-water-ph")
    assert evaluate_each(ph_meter, readings_of(ph_meter, values)) == []
    without_floor = station({"pH": {"zscore_floor": None}}, domain="water", device_id="hn-water-ph")
    assert summary(evaluate_each(without_floor, readings_of(without_floor, values))) == [
        ("zscore.pH", True, "low")
    ]


def test_gaussian_noise_raises_nothing() -> None:
    rng = random.Random(11)
    profile = station()
    noisy = levels(*[round(1.5 + rng.gauss(0, 0.02), 3) for _ in range(3000)])
    assert evaluate_each(profile, readings_of(profile, noisy)) == []
    meter = flow_meter({"flow": {"zscore_floor": None}})
    assert evaluate_each(meter, readings_of(meter, flows(rng, 3000))) == []


def test_a_steady_ramp_is_expected_and_a_break_in_it_is_not() -> None:
    # Demand climbing through the morning: the baseline follows its slope, so the climb raises
    # nothing even where it is many standard deviations from the level of a while ago.
    meter = flow_meter({"flow": {"zscore_floor": None}})
    rng = random.Random(21)
    ramp = [{"flow": round(300 + 2.0 * i + rng.gauss(0, 2), 1)} for i in range(400)]
    assert evaluate_each(meter, readings_of(meter, ramp), detection=UNHELD) == []
    # The same climb with its last value fallen back to where it started.
    broken = [*ramp, {"flow": 300.0}]
    assert summary(evaluate_each(meter, readings_of(meter, broken), detection=UNHELD)) == [
        ("zscore.flow", True, "low")
    ]


def test_a_new_normal_is_learned_instead_of_alarmed_about_for_ever() -> None:
    # A valve opened: the flow settles at a new level. One alarm for the step, which resolves once
    # the baseline has taken the new level in.
    meter = flow_meter()
    rng = random.Random(22)
    values = [*flows(rng, 100), *flows(rng, 300, mean=500.0)]
    assert episodes(evaluate_each(meter, readings_of(meter, values), detection=UNHELD)) == [
        ("zscore.flow", True),
        ("zscore.flow", False),
    ]


def traffic_days(
    counter: DeviceProfile, rng: random.Random, start: datetime, days: float, *, hours_late: float = 0
) -> list[Reading]:
    """A road's counts every 5 minutes as the simulator's traffic domain draws them (local rush
    hours 7:30 and 17:45); `hours_late` draws each from that many hours earlier in the day."""
    every = timedelta(minutes=5)
    sampler = DOMAINS["traffic"].sampler
    readings = []
    for index in range(int(timedelta(days=days) / every)):
        at = start + index * every
        metrics = sampler(rng, at - timedelta(hours=hours_late), 0.5)
        readings.append(
            Reading(
                device_id=counter.id,
                city=counter.city,
                domain=counter.domain,
                ts=at,
                seq=None,
                metrics={"intensity": metrics["intensity"]},
                received_at=at,
            )
        )
    return readings


def test_a_daily_profile_makes_rush_hour_normal_and_a_quiet_rush_hour_an_anomaly() -> None:
    counter = station(domain="traffic", device_id="hn-traffic-007", name="Giải Phóng")
    rng = random.Random(23)
    monday = datetime(2026, 11, 2, tzinfo=UTC)
    state = DeviceDetectorState()
    evaluate_each(counter, traffic_days(counter, rng, monday, 3), state)
    # From the third day on the rush hours are what the profile expects: four days, no alarm.
    assert evaluate_each(counter, traffic_days(counter, rng, monday + timedelta(days=3), 4), state) == []
    usual = state.metrics["intensity"].daily
    assert usual[0] > 3 * usual[20]  # 7:00 local against 3:00 local
    without_profile = DeviceDetectorState.from_json(json.loads(json.dumps(state.to_json())))
    without_profile.metrics["intensity"].daily = []
    # The next morning the rush never comes: the road stays as quiet as at night until 8:30 local.
    # Nothing sudden happens, so only the profile can tell.
    quiet = traffic_days(counter, rng, monday + timedelta(days=7, hours=-2), 3.5 / 24, hours_late=6)
    assert episodes(evaluate_each(counter, quiet, state))[:1] == [("zscore.intensity", True)]
    flat_detection = DeviceDetection(DetectionSettings(daily_min_days=1000))
    assert [f for r in quiet for f in flat_detection.evaluate(counter, [r], without_profile)] == []


def test_weekends_keep_hours_of_their_own() -> None:
    # The simulator's roads have a smaller morning rush on Saturdays and Sundays (0.6 of a working
    # day's): three weeks raise nothing, and the profile has learned both kinds of morning.
    counter = station(domain="traffic", device_id="hn-traffic-008", name="Nguyễn Trãi")
    rng = random.Random(29)
    state = DeviceDetectorState()
    assert (
        evaluate_each(counter, traffic_days(counter, rng, datetime(2026, 11, 2, tzinfo=UTC), 21), state) == []
    )
    usual = state.metrics["intensity"].daily
    assert len(usual) == 48
    working_rush, weekend_rush, night = usual[0], usual[24], usual[20]  # 7:30, 7:30 and 3:30 local
    assert night < weekend_rush < 0.85 * working_rush
    # A profile of one kind of day, as the previous version wrote it, serves both kinds.
    body = state.to_json()
    body["metrics"]["intensity"]["daily"][0] = usual[:24]
    assert DeviceDetectorState.from_json(body).metrics["intensity"].daily == usual[:24] * 2


@pytest.mark.parametrize("seed", range(5))
def test_days_of_each_kind_are_counted_as_a_calendar_would(seed: int) -> None:
    rng = random.Random(seed)
    day_ms = 86_400_000
    for _ in range(200):
        since = rng.randrange(0, 60 * day_ms)
        until = since + rng.randrange(0, 40 * day_ms)
        by_hand = {True: 0.0, False: 0.0}
        at = since
        while at < until:
            end = min((at // day_ms + 1) * day_ms, until)
            # 1 January 1970 was a Thursday.
            by_hand[datetime.fromtimestamp(at / 1000, UTC).weekday() >= 5] += (end - at) / day_ms
            at = end
        for weekend in (True, False):
            assert _days_of_kind(since, until, weekend=weekend) == pytest.approx(by_hand[weekend])


def test_a_metric_without_a_daily_cycle_keeps_no_profile() -> None:
    profile = station()
    state = DeviceDetectorState()
    rng = random.Random(24)
    DETECTION.evaluate(
        profile, readings_of(profile, [{"currentLevel": 1.2 + rng.gauss(0, 0.01)} for _ in range(50)]), state
    )
    assert state.metrics["currentLevel"].daily == []
    assert "daily" not in state.to_json()["metrics"]["currentLevel"]


def test_a_baseline_stored_by_the_previous_version_is_kept() -> None:
    # Version 1 kept the exponentially weighted mean and variance; an upgrade reads them as the
    # baseline's level and spread instead of warming every device up again.
    stored = {"version": 1, "metrics": {"flow": {"ewma": [30, 300.0, 400.0]}}}
    state = DeviceDetectorState.from_json(stored)
    baseline = state.metrics["flow"]
    assert (baseline.count, baseline.level, baseline.slope) == (30, 300.0, 0.0)
    assert baseline.deviation * math.sqrt(math.pi / 2) == pytest.approx(20.0)
    meter = flow_meter()
    assert summary(DETECTION.evaluate(meter, readings_of(meter, [{"flow": 500.0}]), state)) == [
        ("zscore.flow", True, "low")
    ]


# Flatline


def grid_meter(thresholds: Mapping[str, Mapping[str, float | None]] | None = None) -> DeviceProfile:
    return station(thresholds, domain="grid", device_id="hn-grid-002", name="Trạm biến áp Giảng Võ")


def test_a_stuck_value_raises_a_flatline_alarm_after_its_duration() -> None:
    profile = grid_meter()
    rng = random.Random(2)
    moving = [{"voltage": round(228 + rng.gauss(0, 1), 1)} for _ in range(5)]
    stuck = [{"voltage": 230.0}] * 61
    findings = evaluate_each(profile, readings_of(profile, [*moving, *stuck]))
    assert summary(findings) == [("flatline.voltage", True, "low")]
    # The value first read at 50 s is stuck 600 s later.
    assert findings[0].at == START + timedelta(seconds=650)
    assert findings[0].value == 230.0 and findings[0].threshold == 600
    assert "giữ nguyên 230,0 V suốt 10 phút" in findings[0].message_vi
    assert "has stayed at exactly 230.0 V for 10 min" in findings[0].message_en
    recovering = [{"voltage": 229.0}, {"voltage": 229.5}, {"voltage": 230.5}]
    state = DeviceDetectorState()
    all_findings = evaluate_each(profile, readings_of(profile, [*moving, *stuck, *recovering]), state)
    assert summary(all_findings) == [("flatline.voltage", True, "low"), ("flatline.voltage", False, None)]


def test_flatline_needs_several_readings_not_only_time() -> None:
    profile = grid_meter()
    # Every 5 minutes: the value has held for 10 minutes at the third reading, but only the fifth
    # makes it more than chance.
    sparse = readings_of(profile, [{"frequency": 50.012}] * 5, every_s=300)
    findings = [DETECTION.evaluate(profile, [r], state) for state in [DeviceDetectorState()] for r in sparse]
    assert [summary(f) for f in findings] == [[], [], [], [], [("flatline.frequency", True, "low")]]


def test_rain_may_sit_at_zero_for_days() -> None:
    profile = station()
    dry = readings_of(
        profile, [{"rainfall": 0.0, "currentLevel": 1.2 + 0.001 * (i % 7)} for i in range(300)], every_s=600
    )
    assert evaluate_each(profile, dry) == []


# Normal data, late and replayed readings, state


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_normal_behaviour_of_every_domain_raises_nothing(name: str) -> None:
    domain = DOMAINS[name]
    rng = random.Random(17)
    start = datetime(2026, 11, 20, 6, 0, tzinfo=UTC)
    for index in range(3):
        profile = station(domain=name, device_id=f"{name}-{index}")
        phase = rng.random()
        values = [domain.sampler(rng, start + timedelta(seconds=20 * step), phase) for step in range(720)]
        assert evaluate_each(profile, readings_of(profile, values, start=start, every_s=20)) == []


def test_replayed_batch_changes_nothing() -> None:
    profile = station(LIMITS_ONLY)
    batch = readings_of(profile, levels(1.0, 1.1, 4.7, 4.8))
    state = DeviceDetectorState()
    assert DETECTION.evaluate(profile, batch, state)
    saved = json.dumps(state.to_json())
    assert DETECTION.evaluate(profile, batch, state) == []
    assert json.dumps(state.to_json()) == saved


def test_readings_are_taken_in_time_order_and_late_ones_are_skipped() -> None:
    profile = station(LIMITS_ONLY)
    batch = readings_of(profile, levels(1.0, 3.5, 2.0, 2.0, 2.0))
    shuffled = [batch[3], batch[0], batch[4], batch[2], batch[1]]
    findings = DETECTION.evaluate(profile, shuffled, DeviceDetectorState())
    assert summary(findings) == [
        ("threshold.currentLevel", True, "medium"),
        ("threshold.currentLevel", False, None),
    ]

    state = DeviceDetectorState()
    DETECTION.evaluate(profile, readings_of(profile, levels(1.0), start=START + timedelta(minutes=5)), state)
    saved = state.to_json()
    late = readings_of(profile, levels(4.9), start=START + timedelta(minutes=4))
    assert DETECTION.evaluate(profile, late, state) == []
    assert state.to_json() == saved


def scenario(profile: DeviceProfile) -> list[list[Reading]]:
    rng = random.Random(23)
    values = [
        {"currentLevel": round(1.0 + rng.gauss(0, 0.01), 3), "rainfall": 0.0} for _ in range(40)
    ]  # warm-up
    values += [{"currentLevel": 1.0 + 0.07 * step, "rainfall": 30.0} for step in range(40)]  # flood
    values += [{"currentLevel": 1.5, "rainfall": 0.0}] * 200  # stuck sensor
    values += [{"currentLevel": round(1.5 + rng.gauss(0, 0.01), 3), "rainfall": 0.0} for _ in range(40)]
    readings = readings_of(profile, values)
    return [readings[i : i + 7] for i in range(0, len(readings), 7)]


def test_state_through_json_behaves_exactly_as_the_state_in_memory() -> None:
    profile = station()
    kept = DeviceDetectorState()
    expected = [f for batch in scenario(profile) for f in DETECTION.evaluate(profile, batch, kept)]
    assert {f.rule for f in expected} >= {
        "threshold.currentLevel",
        "rate.currentLevel",
        "flatline.currentLevel",
    }
    stored = DeviceDetectorState().to_json()
    actual: list[Finding] = []
    for batch in scenario(profile):
        state = DeviceDetectorState.from_json(json.loads(json.dumps(stored)))
        actual.extend(DETECTION.evaluate(profile, batch, state))
        stored = state.to_json()
    assert actual == expected
    assert stored == kept.to_json()


def test_a_state_this_process_wrote_reads_back_alike_without_the_checks() -> None:
    # The processor reads its held states back unchecked; every part a scenario fills (trackers,
    # flatline, history, baseline) must come back as the checked reading gives it.
    profile = station()
    state = DeviceDetectorState()
    for batch in scenario(profile):
        DETECTION.evaluate(profile, batch, state)
        text = orjson.dumps(state.to_json())
        own = DeviceDetectorState.from_own_json(orjson.loads(text))
        assert own == DeviceDetectorState.from_json(orjson.loads(text))
        assert orjson.dumps(own.to_json()) == text


def test_state_is_bounded_and_small() -> None:
    profile = station()
    rng = random.Random(1)
    state = DeviceDetectorState()
    values = [{"currentLevel": round(1.2 + rng.gauss(0, 0.01), 3), "rainfall": 0.4} for _ in range(5000)]
    DETECTION.evaluate(profile, readings_of(profile, values, every_s=1), state)
    assert len(state.metrics["currentLevel"].history) <= 33
    assert len(json.dumps(state.to_json())) < 2048


@pytest.mark.parametrize(
    "stored",
    [
        None,
        {},
        {"version": 99},
        {"last_ts": "yesterday", "metrics": []},
        {"last_ts": "2026-11-20T01:00:00", "metrics": {"currentLevel": "full"}},
        {
            "metrics": {
                "currentLevel": {
                    "ewma": ["a", 1, 2],
                    "history": [[1, 2], "x"],
                    "history_end": 5,
                    "flat": [1],
                    "alarms": {"threshold": ["dreadful", 0], "rate": "high"},
                    "last": "1.0",
                }
            }
        },
    ],
)
def test_unreadable_state_starts_fresh_instead_of_failing(stored: object) -> None:
    state = DeviceDetectorState.from_json(stored)  # type: ignore[arg-type]
    assert state.last_ts is None
    assert all(not part.trackers and not part.history and part.count == 0 for part in state.metrics.values())
    profile = station()
    assert summary(DETECTION.evaluate(profile, readings_of(profile, levels(4.7)), state)) == [
        ("threshold.currentLevel", True, "critical")
    ]


@pytest.mark.parametrize(
    "history",
    [
        [[-10, 1.0], [0, "2"]],
        [[-10, 1.0], [0, 2.0, 3.0]],
        [[-10, 1.0], (0, 2.0)],
        [[True, 1.0], [0, 2.0]],
        [[-10.0, 1.0], [0, 2.0]],
        [[0, 1.0], [-10, 2.0]],
        [[-10, math.inf], [0, 2.0]],
        [[-10, None], [0, 2.0]],
        "[[-10, 1.0]]",
    ],
)
def test_an_unreadable_history_is_dropped_and_the_rest_kept(history: object) -> None:
    readable = {"last": 2.0, "last_at": 1_000, "history": [[-10, 1.0], [0, 2]], "history_end": 1_000}
    assert MetricState.from_json(readable).history == [(990, 1.0), (1_000, 2.0)]
    state = MetricState.from_json({**readable, "history": history})
    assert state.history == []
    assert (state.last, state.last_at_ms) == (2.0, 1_000)


def test_a_baseline_written_before_the_cusum_keeps_what_it_learned() -> None:
    older = MetricState.from_json({"baseline": [40, 1.5, 0.01, 0.2, 0]})
    assert (older.count, older.level, older.deviation, older.cusum_up, older.cusum_down) == (
        40,
        1.5,
        0.2,
        0,
        0,
    )
    now = MetricState.from_json({"baseline": [40, 1.5, 0.01, 0.2, 0, 3.5, 0.0]})
    assert (now.count, now.cusum_up, now.cusum_down) == (40, 3.5, 0.0)
    assert MetricState.from_json({"baseline": [40, 1.5, 0.01, 0.2, 0, -1.0, 0.0]}).count == 0
    assert MetricState.from_json({"baseline": [40, 1.5, 0.01, 0.2, 0, 3.5]}).count == 0


def test_state_without_newer_parts_keeps_the_parts_it_has() -> None:
    profile = station()
    state = DeviceDetectorState()
    DETECTION.evaluate(profile, readings_of(profile, levels(4.7)), state)
    stored = state.to_json()
    del stored["metrics"]["currentLevel"]["history"]
    reloaded = DeviceDetectorState.from_json(stored)
    assert reloaded.open_alarms == {"threshold.currentLevel": "critical"}
    assert reloaded.last_ts == state.last_ts


# Device settings


def test_device_settings_win_over_domain_defaults() -> None:
    lower = station({"currentLevel": {"warn_above": 2.0}})
    assert summary(DETECTION.evaluate(lower, readings_of(lower, levels(2.5)), DeviceDetectorState())) == [
        ("threshold.currentLevel", True, "medium")
    ]
    default = station()
    assert DETECTION.evaluate(default, readings_of(default, levels(2.5)), DeviceDetectorState()) == []
    no_crit = station({"currentLevel": {"crit_above": None}})
    assert summary(DETECTION.evaluate(no_crit, readings_of(no_crit, levels(4.7)), DeviceDetectorState())) == [
        ("threshold.currentLevel", True, "medium")
    ]
    off = station({"currentLevel": {"warn_above": None, "crit_above": None}})
    assert DETECTION.evaluate(off, readings_of(off, levels(4.7)), DeviceDetectorState()) == []


def test_switching_a_rule_off_resolves_its_open_alarm() -> None:
    state = DeviceDetectorState()
    DETECTION.evaluate(station(), readings_of(station(), levels(4.7)), state)
    off = station({"currentLevel": {"warn_above": None, "crit_above": None}})
    later = readings_of(off, levels(4.7), start=START + timedelta(minutes=1))
    assert summary(DETECTION.evaluate(off, later, state)) == [("threshold.currentLevel", False, None)]
    assert state.open_alarms == {}


def test_offline_finding() -> None:
    profile = station()
    down = offline_finding(profile, at=START, active=True)
    assert (down.rule, down.active, down.severity, down.repeats, down.metric) == (
        "offline",
        True,
        "medium",
        1,
        None,
    )
    assert (
        down.message_vi
        == "Thiết bị Trạm Phan Đình Phùng (Ba Đình, Hà Nội) mất kết nối: không còn nhận được dữ liệu"
    )
    up = offline_finding(profile, at=START, active=False)
    assert (up.active, up.severity) == (False, None)
    assert up.message_en == "Device Trạm Phan Đình Phùng (Ba Đình, Hà Nội) is back online"


def test_fractions_read_as_percentages() -> None:
    profile = station(domain="waste", device_id="hn-waste-1", name="Thùng rác Hàng Bài")
    findings = DETECTION.evaluate(
        profile, readings_of(profile, [{"fillingLevel": 0.853}]), DeviceDetectorState()
    )
    assert findings[0].message_vi.endswith("là 85,3%, vượt ngưỡng cảnh báo 80%")
    assert findings[0].message_en.endswith("is 85.3%, above the warning limit 80%")


# Flood correlation by zone

CORRELATOR = DistrictFloodCorrelator()
# The zone of a station registered with a district and lying in no area.
BA_DINH = FloodZone("district:ha-noi:Ba Đình", None, "Ba Đình", "Ba Đình")


def signal_of(profile: DeviceProfile, values: Sequence[Mapping[str, float]]) -> StationSignal | None:
    state = DeviceDetectorState()
    DETECTION.evaluate(profile, readings_of(profile, values, every_s=30), state)
    return CORRELATOR.station_signal(profile, state)


def wet(rise_per_reading: float = 0.01, rain: float = 25.0) -> list[dict[str, float]]:
    return [{"currentLevel": 1.0 + rise_per_reading * step, "rainfall": rain} for step in range(30)]


def test_two_stations_with_rain_and_rising_water_raise_one_district_finding() -> None:
    signals = [signal_of(station(device_id=f"hn-flood-00{i}", name=f"Trạm {i}"), wet()) for i in (1, 2, 3)]
    assert all(s is not None and s.raining and s.rising for s in signals)
    now = START + timedelta(minutes=15)
    finding = CORRELATOR.evaluate(
        city="ha-noi", zone=BA_DINH, signals=[s for s in signals if s], active=False, now=now
    )
    assert finding is not None
    assert (finding.subject, finding.rule, finding.device_id, finding.active, finding.severity) == (
        "district:ha-noi:Ba Đình",
        "flood.district",
        None,
        True,
        "high",
    )
    assert finding.value == 3 and finding.threshold == 2
    assert finding.message_vi == (
        "Nguy cơ ngập úng diện rộng tại Ba Đình (Hà Nội): 3 trạm đang có mưa và nước dâng"
        " (Trạm 1, Trạm 2, Trạm 3)"
    )
    assert finding.message_en.startswith(
        "Flood risk across Ba Đình (Hà Nội): 3 stations report rain and rising water"
    )


def test_one_station_alone_or_rain_without_rise_is_not_a_district_flood() -> None:
    now = START + timedelta(minutes=15)
    one = signal_of(station(device_id="a"), wet())
    dry_rise = signal_of(station(device_id="b"), wet(rain=0.0))
    rain_only = signal_of(station(device_id="c"), wet(rise_per_reading=0.0))
    assert one is not None and dry_rise is not None and rain_only is not None
    assert not dry_rise.raining and dry_rise.rising
    assert rain_only.raining and not rain_only.rising
    assert (
        CORRELATOR.evaluate(
            city="ha-noi", zone=BA_DINH, signals=[one, dry_rise, rain_only], active=False, now=now
        )
        is None
    )


def test_stale_signals_are_ignored() -> None:
    signals = [signal_of(station(device_id=f"s{i}"), wet()) for i in (1, 2)]
    later = START + timedelta(hours=2)
    assert (
        CORRELATOR.evaluate(
            city="ha-noi", zone=BA_DINH, signals=[s for s in signals if s], active=False, now=later
        )
        is None
    )


def test_critical_when_a_station_is_past_its_danger_level() -> None:
    deep = signal_of(
        station(device_id="a"), [{"currentLevel": 4.6 + 0.001 * i, "rainfall": 40.0} for i in range(5)]
    )
    other = signal_of(station(device_id="b"), wet())
    assert deep is not None and other is not None and deep.level_severity == "critical" and deep.rising
    finding = CORRELATOR.evaluate(
        city="ha-noi",
        zone=BA_DINH,
        signals=[deep, other],
        active=False,
        now=START + timedelta(minutes=15),
    )
    assert finding is not None and finding.severity == "critical"


def test_the_district_recovers_only_when_no_station_qualifies() -> None:
    now = START + timedelta(minutes=15)
    qualifying = signal_of(station(device_id="a"), wet())
    calm = signal_of(station(device_id="b"), wet(rise_per_reading=0.0, rain=0.0))
    assert qualifying is not None and calm is not None
    assert (
        CORRELATOR.evaluate(city="ha-noi", zone=BA_DINH, signals=[qualifying, calm], active=True, now=now)
        is None
    )
    recovered = CORRELATOR.evaluate(city="ha-noi", zone=BA_DINH, signals=[calm], active=True, now=now)
    assert recovered is not None and not recovered.active and recovered.severity is None
    assert "đã qua" in recovered.message_vi and "has passed" in recovered.message_en
    assert CORRELATOR.evaluate(city="ha-noi", zone=BA_DINH, signals=[calm], active=False, now=now) is None


def test_a_station_in_an_area_is_judged_in_its_catchment_and_the_alarm_names_its_areas() -> None:
    def in_catchment(device_id: str) -> DeviceProfile:
        return DeviceProfile.of(
            id=device_id,
            city="ha-noi",
            domain="flood",
            name=f"Trạm {device_id}",
            district="Ba Đình",
            thresholds={},
            zone_area="ha-noi.catchment.to-lich",
            zone_name_vi="Lưu vực sông Tô Lịch",
            zone_name_en="To Lich river catchment",
        )

    profiles = [in_catchment(device_id) for device_id in ("a", "b", "c")]
    zone = profiles[0].zone
    assert zone == FloodZone(
        "area:ha-noi.catchment.to-lich",
        "ha-noi.catchment.to-lich",
        "Lưu vực sông Tô Lịch",
        "To Lich river catchment",
    )
    # Only flood stations have a zone; a district without an area is the zone of older releases.
    assert station(domain="grid", device_id="g").zone is None
    assert station().zone == BA_DINH and station(district=None).zone is None
    signals = [signal_of(profile, wet() if profile.id != "c" else wet(rain=0.0)) for profile in profiles]
    finding = (
        CORRELATOR.evaluate(
            city="ha-noi",
            zone=zone,
            signals=[s for s in signals if s],
            active=False,
            now=START + timedelta(minutes=15),
            station_areas={
                "a": ["ha-noi.catchment.to-lich", "ha-noi.ward.ba-dinh"],
                "b": ["ha-noi.catchment.to-lich", "ha-noi.ward.cau-giay"],
                "c": ["ha-noi.catchment.to-lich", "ha-noi.ward.lang"],
            },
        )
        if zone is not None
        else None
    )
    assert finding is not None and finding.subject == "area:ha-noi.catchment.to-lich"
    # The zone and the wards of the stations that raised it (not the dry one's).
    assert finding.areas == ("ha-noi.catchment.to-lich", "ha-noi.ward.ba-dinh", "ha-noi.ward.cau-giay")
    assert finding.district == "Lưu vực sông Tô Lịch"  # the deprecated alias names the zone
    assert finding.message_vi.startswith(
        "Nguy cơ ngập úng diện rộng tại Lưu vực sông Tô Lịch (Hà Nội): 2 trạm"
    )
    assert finding.message_en.startswith("Flood risk across To Lich river catchment (Hà Nội): 2 stations")


def test_station_signals_round_trip_and_exist_only_for_flood_stations_of_a_zone() -> None:
    signal = signal_of(station(), wet())
    assert signal is not None
    assert StationSignal.from_json(json.loads(json.dumps(signal.to_json()))) == signal
    with pytest.raises(ValueError):
        StationSignal.from_json({"at": "2026-11-20T01:00:00+00:00"})
    assert signal_of(station(district=None), wet()) is None
    assert CORRELATOR.station_signal(station(), DeviceDetectorState()) is None
    assert signal_of(grid_meter(), [{"voltage": 230.0}]) is None
