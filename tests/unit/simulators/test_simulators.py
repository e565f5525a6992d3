"""Simulated cities without any service: fleets and places, the daily shapes of the samplers,
scenario timelines and their ground truth (checked against the real detectors and the gateway's
validation), and load mode's wire format."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ioc.cli import build_parser
from ioc.scenario_check import device_profile
from ioc_core.alarms import Finding
from ioc_core.domains import DOMAINS
from ioc_core.errors import RejectedMessage
from ioc_core.rules import rules_for, severity_rank
from ioc_core.telemetry import Reading, parse_payload, parse_status, parse_topic
from processors.detection import DeviceDetection, DeviceDetectorState, DistrictFloodCorrelator
from simulators.cities import (
    CITIES,
    CITY_BOUNDS,
    LOW_STREET,
    RIVER,
    ROAD,
    SITE_KINDS,
)
from simulators.fleet import SimulatedDevice, build_fleet
from simulators.load import _Sender
from simulators.scenarios import SCENARIOS, BadDevices, Outage, Scenario, Send, Storm
from simulators.truth import read_truth, write_truth
from simulators.wire import WirePublisher, connect_packet, encode_topic, remaining_length
from tests.storm_story import STORM_STORY

LOCAL = timezone(timedelta(hours=7))
# A Wednesday.
DAY = datetime(2026, 7, 1, tzinfo=LOCAL)


def at_local(hour: float, day: datetime = DAY) -> datetime:
    return (day + timedelta(hours=hour)).astimezone(UTC)


# -- places and fleets -------------------------------------------------------------------------


def test_the_northern_triangle_and_da_nang_are_mapped_with_real_places() -> None:
    assert {"ha-noi", "hai-phong", "quang-ninh", "da-nang"} <= set(CITIES)
    names = {site.name for wards in CITIES.values() for ward in wards for site in ward.sites}
    for road in ("Giải Phóng", "Nguyễn Trãi", "Lạch Tray", "Trần Hưng Đạo"):
        assert any(road in name for name in names), road
    for river in ("Tô Lịch", "Sông Hồng", "Tam Bạc", "Sông Cấm", "Bạch Đằng"):
        assert any(river in name for name in names), river
    for city, wards in CITIES.items():
        # Every kind of place somewhere in the city, and a small fleet's wards have rivers or low
        # streets for its flood stations, and roads.
        assert {site.kind for ward in wards for site in ward.sites} == set(SITE_KINDS), city
        for ward in wards[:4]:
            kinds = {site.kind for site in ward.sites}
            assert ROAD in kinds and kinds & {RIVER, LOW_STREET}, (city, ward.name)
        # Site names tell a city's places apart.
        sites = [site.name for ward in wards for site in ward.sites]
        assert len(sites) == len(set(sites)), city


def test_domains_stand_at_kinds_of_place_the_maps_have() -> None:
    for domain in DOMAINS.values():
        assert domain.sites and set(domain.sites) <= set(SITE_KINDS), domain.name


def test_every_place_lies_in_its_city_and_near_its_ward() -> None:
    for city, wards in CITIES.items():
        bounds = CITY_BOUNDS[city]
        for ward in wards:
            assert bounds.contains(ward.lat, ward.lon), (city, ward.name)
            for site in ward.sites:
                assert bounds.contains(site.lat, site.lon), (city, site.name)
                km = _km(ward.lat, ward.lon, site.lat, site.lon)
                assert km < 6, (city, ward.name, site.name, km)


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    dy = (lat2 - lat1) * 111.0
    dx = (lon2 - lon1) * 111.0 * math.cos(math.radians(lat1))
    return math.hypot(dx, dy)


@pytest.mark.parametrize("city", sorted(CITIES))
def test_a_fleet_has_every_domain_inside_its_city(city: str) -> None:
    fleet = build_fleet(city, 60)
    assert {device.domain.name for device in fleet} == set(DOMAINS)
    assert len({device.id for device in fleet}) == 60
    bounds = CITY_BOUNDS[city]
    for device in fleet:
        assert bounds.contains(device.lat, device.lon), device
        assert device.topic == f"ioc/v1/{city}/{device.domain.name}/{device.id}/telemetry"
        registration = device.registration()
        assert registration.district == device.district and registration.thresholds == device.thresholds


def test_devices_stand_where_their_domain_says() -> None:
    fleet = build_fleet("hai-phong", 100)
    sites = {site.name: site for ward in CITIES["hai-phong"] for site in ward.sites}
    wards = {ward.name: ward for ward in CITIES["hai-phong"]}
    for device in fleet:
        ward = wards[device.district]
        if device.site == ward.name:
            # A ward without a place of the device's kind: around its centre.
            assert not [s for kind in device.domain.sites for s in ward.sites_of(kind)], device.id
            assert _km(ward.lat, ward.lon, device.lat, device.lon) < 2.5, device.id
        else:
            assert sites[device.site] in ward.sites, (device.id, device.site)
            assert sites[device.site].kind in device.domain.sites, (device.id, device.site)
    flood = [device for device in fleet if device.domain.name == "flood"]
    assert {sites[device.site].kind for device in flood if device.site in sites} <= {RIVER, LOW_STREET}
    # Where the tide reaches, the station's phase says so.
    tam_bac = [device for device in flood if "Tam Bạc" in device.site]
    assert tam_bac and all(device.phase > 0.4 for device in tam_bac)


def test_a_fleet_laid_on_another_map_keeps_its_own_city() -> None:
    fleet = build_fleet("test-city", 10, places="ha-noi")
    assert all(device.city == "test-city" and device.id.startswith("sim-test-city-") for device in fleet)
    assert all(CITY_BOUNDS["ha-noi"].contains(device.lat, device.lon) for device in fleet)
    with pytest.raises(ValueError, match="no map"):
        build_fleet("test-city", 10)


def test_the_same_seed_gives_the_same_fleet_and_readings() -> None:
    first, second = build_fleet("ha-noi", 30, seed=3), build_fleet("ha-noi", 30, seed=3)
    other = build_fleet("ha-noi", 30, seed=4)
    at = at_local(8)
    assert [(d.id, d.lat, d.lon, d.phase) for d in first] == [(d.id, d.lat, d.lon, d.phase) for d in second]
    assert [d.sample(at) for d in first] == [d.sample(at) for d in second]
    assert [(d.lat, d.lon) for d in first] != [(d.lat, d.lon) for d in other]


def test_small_fleets_have_pairs_of_flood_stations_in_a_ward() -> None:
    fleet = build_fleet("ha-noi", 20)
    per_ward: dict[str, int] = defaultdict(int)
    for device in fleet:
        if device.domain.name == "flood":
            per_ward[device.district] += 1
    assert max(per_ward.values()) >= 2


def test_grid_meters_and_water_works_hang_on_feeders() -> None:
    fleet = build_fleet("ha-noi", 50)
    for device in fleet:
        assert (device.feeder is not None) == (device.domain.name in ("grid", "water")), device.id
    feeders = defaultdict(set)
    for device in fleet:
        if device.feeder:
            feeders[device.feeder].add(device.domain.name)
    assert any(domains == {"grid", "water"} for domains in feeders.values())


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_station_limits_clear_a_stations_normal_days_with_room_to_spare(name: str) -> None:
    domain = DOMAINS[name]
    for phase in [i / 10 for i in range(10)] + [0.999]:
        thresholds = domain.station_thresholds(phase) if domain.station_thresholds else {}
        rules = rules_for(domain, thresholds)
        defaults = rules_for(domain, {})
        rng = random.Random(phase)
        # A fortnight, to see the spring tides.
        for step in range(14 * 24 * 4):
            sample = domain.sampler(rng, at_local(step / 4), phase)
            for metric, value in sample.items():
                for limits in (rules[metric], defaults[metric]):
                    margin = limits.hysteresis or 0.0
                    for above in (limits.warn_above, limits.crit_above):
                        assert above is None or value < above - margin, (name, phase, metric, value)
                    for below in (limits.warn_below, limits.crit_below):
                        assert below is None or value > below + margin, (name, phase, metric, value)
        for metric, limits in thresholds.items():
            warn, crit = limits.get("warn_above"), limits.get("crit_above")
            if warn is not None and crit is not None:
                assert crit > warn, (name, phase, metric)
            warn, crit = limits.get("warn_below"), limits.get("crit_below")
            if warn is not None and crit is not None:
                assert crit < warn, (name, phase, metric)


# -- the samplers' days ------------------------------------------------------------------------


def _mean(name: str, hour: float, phase: float = 0.5, day: datetime = DAY, n: int = 20) -> dict[str, float]:
    rng = random.Random(1)
    samples = [DOMAINS[name].sampler(rng, at_local(hour, day), phase) for _ in range(n)]
    return {metric: sum(s[metric] for s in samples) / n for metric in samples[0]}


def test_traffic_rush_hours_are_dense_and_slow_and_nights_empty() -> None:
    morning, evening, night, noon = (_mean("traffic", h) for h in (7.5, 17.75, 3.0, 12.0))
    for rush in (morning, evening):
        assert rush["intensity"] > 5 * night["intensity"]
        assert rush["intensity"] > 1.3 * noon["intensity"]
        assert rush["averageVehicleSpeed"] < 0.6 * night["averageVehicleSpeed"]
        assert rush["occupancy"] > 0.4 > night["occupancy"]
    sunday = DAY + timedelta(days=4)
    assert _mean("traffic", 7.5, day=sunday)["intensity"] < 0.8 * morning["intensity"]


def test_bins_fill_through_the_day_and_are_emptied_by_the_evening_round() -> None:
    phase = 0.5  # its round comes at 21:00
    levels = [_mean("waste", hour, phase)["fillingLevel"] for hour in range(6, 21)]
    assert all(later > earlier for earlier, later in itertools.pairwise(levels))
    before, after = _mean("waste", 20.9, phase)["fillingLevel"], _mean("waste", 21.2, phase)["fillingLevel"]
    assert before > 0.5 and after < 0.1
    # Little is thrown away at night.
    assert _mean("waste", 4.0, phase)["fillingLevel"] - _mean("waste", 1.0, phase)["fillingLevel"] < 0.05


def test_water_flow_has_its_night_minimum_and_pressure_its_night_maximum() -> None:
    night, morning, evening = (_mean("water", h) for h in (3.0, 6.5, 19.0))
    assert night["flow"] < 0.35 * morning["flow"] and night["flow"] < 0.4 * evening["flow"]
    assert night["pressure"] > morning["pressure"] + 0.5
    flows = {hour: _mean("water", hour)["flow"] for hour in range(24)}
    assert min(flows, key=flows.__getitem__) in range(0, 5)


def test_grid_load_follows_the_evening_peak_and_voltage_sags_with_it() -> None:
    night, noon, evening = (_mean("grid", h) for h in (4.0, 11.5, 20.0))
    assert evening["activePower"] > noon["activePower"] > night["activePower"] * 1.5
    assert evening["voltage"] < noon["voltage"] < night["voltage"]
    rng = random.Random(2)
    for minute in range(0, 24 * 60, 7):
        frequency = DOMAINS["grid"].sampler(rng, at_local(minute / 60), 0.5)["frequency"]
        assert 49.93 < frequency < 50.07


def test_flood_levels_follow_the_tide_near_the_sea_and_stay_put_inland() -> None:
    def fortnight_range(phase: float) -> float:
        levels = [_mean("flood", hour, phase, n=1)["currentLevel"] for hour in range(14 * 24)]
        return max(levels) - min(levels)

    # One high water a day, up to a metre and a half apart from the low at spring tides.
    assert fortnight_range(0.95) > 1.2
    assert fortnight_range(0.0) < 0.15
    rng = random.Random(3)
    rain = [DOMAINS["flood"].sampler(rng, at_local(h / 6), 0.5)["rainfall"] for h in range(144)]
    assert max(rain) < 3 and any(r == 0 for r in rain)


# -- scenarios, through the real detectors -----------------------------------------------------


class Drive:
    """Runs a scenario over a fleet on a synthetic clock (one reading per device per step), feeding
    what is sent through the gateway's parsing and the processors' detectors."""

    def __init__(
        self,
        scenario: Scenario,
        fleet: list[SimulatedDevice],
        *,
        steps: int,
        step_s: float = 1.0,
        start: datetime | None = None,
    ):
        self.scenario, self.fleet, self.steps, self.step_s = scenario, fleet, steps, step_s
        self.start = start or datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        self.detection = DeviceDetection()
        self.correlator = DistrictFloodCorrelator()
        self.states = {device.id: DeviceDetectorState() for device in fleet}
        self.profiles = {device.id: device_profile(device) for device in fleet}
        self.findings: list[Finding] = []
        self.sends: list[tuple[Send, datetime]] = []
        self.powered_off: set[str] = set()
        self._open: set[tuple[str, str]] = set()

    def run(self) -> None:
        self.scenario.begin(self.start)
        for step in range(self.steps):
            progress = step / self.steps
            at = self.start + timedelta(seconds=step * self.step_s)
            off, on = self.scenario.power(progress)
            if off:
                self.powered_off |= {d.id for d in off}
                self.scenario.powered(off, on=False, at=at)
            if on:
                self.powered_off -= {d.id for d in on}
                self.scenario.powered(on, on=True, at=at)
            touched: set[str] = set()
            for index, device in enumerate(self.fleet):
                if device.id in self.powered_off:
                    continue
                when = at + timedelta(milliseconds=index)
                for send in self.scenario.readings(device, when, progress):
                    self.sends.append((send, when))
                    touched |= self._detect(device, send, when)
            for subject in sorted(touched):
                self._judge_zone(subject, at)
        self.scenario.finish(self.start + timedelta(seconds=self.steps * self.step_s))

    def _detect(self, device: SimulatedDevice, send: Send, at: datetime) -> set[str]:
        if send.topic != device.topic:
            return set()
        try:
            measurements = parse_payload(send.payload, device.domain, received_at=at)
        except RejectedMessage:
            return set()
        readings = [
            Reading(device.id, device.city, device.domain.name, m.ts, m.seq, m.metrics, at)
            for m in measurements
        ]
        self._record(self.detection.evaluate(self.profiles[device.id], readings, self.states[device.id]))
        zone = self.profiles[device.id].zone
        return {zone.subject} if zone is not None else set()

    def _judge_zone(self, subject: str, at: datetime) -> None:
        signals = []
        zone = None
        for device in self.fleet:
            profile = self.profiles[device.id]
            if profile.zone is not None and profile.zone.subject == subject:
                zone = profile.zone
                signal = self.correlator.station_signal(profile, self.states[device.id])
                if signal is not None:
                    signals.append(signal)
        assert zone is not None
        finding = self.correlator.evaluate(
            city=self.fleet[0].city,
            zone=zone,
            signals=signals,
            active=(subject, "flood.district") in self._open,
            now=at,
        )
        if finding is not None:
            self._record([finding])

    def _record(self, findings: list[Finding]) -> None:
        for finding in findings:
            self.findings.append(finding)
            key = (finding.subject, finding.rule)
            if finding.active:
                self._open.add(key)
            else:
                self._open.discard(key)

    def worst(self, subject: str, rule: str) -> str | None:
        severities = [
            f.severity for f in self.findings if f.subject == subject and f.rule == rule and f.active
        ]
        return max(severities, key=severity_rank) if severities else None


# A fleet's first day starts at any hour: just before the morning rush, in its middle and before
# the evening peak (Vietnam's clock, UTC+7) are the hardest for a baseline that has seen no day.
@pytest.mark.parametrize("local_hour", [0, 6, 7, 16])
def test_normal_days_of_a_fleet_raise_nothing_through_the_detectors(local_hour: int) -> None:
    fleet = build_fleet("hai-phong", 40)
    start = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(hours=local_hour - 7)
    drive = Drive(Scenario(fleet, interval_s=120), fleet, steps=24 * 30, step_s=120, start=start)
    drive.run()
    assert drive.findings == []
    assert drive.scenario.incidents() == []


def test_a_storm_raises_what_its_truth_says_and_nothing_else() -> None:
    fleet = build_fleet("hai-phong", 40, places="hai-phong")
    storm = Storm(fleet, interval_s=1.0)
    storm.check(60)
    drive = Drive(storm, fleet, steps=60)
    drive.run()
    truth = storm.incidents()
    kinds = {incident.kind for incident in truth}
    assert kinds >= STORM_STORY
    for incident in truth:
        assert incident.expected == "alarm" and incident.ended_at is not None, incident
        (rule,) = incident.expected_rules
        worst = drive.worst(incident.subject, rule)
        assert worst is not None, f"no {rule} for {incident}"
        assert severity_rank(worst) >= severity_rank(incident.expected_severity), incident
    # Alert comes before danger at every flooded station.
    by_station: dict[str, dict[str, datetime]] = defaultdict(dict)
    for incident in truth:
        if incident.kind.startswith("water_level") and incident.device_id is not None:
            by_station[incident.device_id][incident.kind] = incident.started_at
    assert by_station and all(s["water_level_alert"] <= s["water_level_danger"] for s in by_station.values())
    explained: dict[str, set[str]] = defaultdict(set)
    for incident in truth:
        explained[incident.subject].update(incident.expected_rules, incident.allowed_rules)
    for finding in drive.findings:
        assert finding.rule in explained[finding.subject], finding
    # Each finding's alarm ends: resolved once the water has gone.
    assert not drive._open


def test_a_storm_needs_two_flood_stations_in_a_ward_and_enough_readings() -> None:
    with pytest.raises(ValueError, match="flood stations"):
        Storm(build_fleet("ha-noi", 5), interval_s=1).check(60)
    with pytest.raises(ValueError, match="--rate"):
        Storm(build_fleet("ha-noi", 40), interval_s=10).check(60)


def test_an_outage_silences_one_feeder_and_brings_it_back() -> None:
    fleet = build_fleet("ha-noi", 20)
    outage = Outage(fleet, interval_s=1.0)
    outage.check(40)
    drive = Drive(outage, fleet, steps=40)
    silent_steps: dict[str, int] = defaultdict(int)
    drive.run()
    truth = outage.incidents()
    victims = {incident.device_id for incident in truth}
    assert victims and {i.domain for i in truth} == {"grid", "water"}
    assert all(device.feeder == outage.feeder for device in fleet if device.id in victims)
    sent_by = defaultdict(list)
    for send, at in drive.sends:
        sent_by[send.topic].append(at)
    for incident in truth:
        assert incident.expected_rules == ["offline"] and incident.ended_at is not None
        assert incident.started_at < incident.ended_at
        topic = next(d.topic for d in fleet if d.id == incident.device_id)
        during = [at for at in sent_by[topic] if incident.started_at <= at < incident.ended_at]
        silent_steps[topic] = len(during)
    assert set(silent_steps.values()) == {0}, "a device without power sends nothing"
    assert drive.findings == []


def test_bad_devices_send_what_the_gateway_refuses_for_the_reasons_in_the_truth() -> None:
    fleet = build_fleet("quang-ninh", 25)
    bad = BadDevices(fleet, interval_s=1.0)
    bad.check(40)
    drive = Drive(bad, fleet, steps=40)
    drive.run()
    truth = bad.incidents()
    registry = {device.id: device for device in fleet}
    verdicts: dict[str, list[str]] = defaultdict(list)
    payloads: dict[tuple[str, str], int] = defaultdict(int)
    for send, at in drive.sends:
        verdicts[send.topic].append(_gateway_verdict(send, at, registry))
        if send.topic.endswith("/telemetry"):
            payloads[(send.topic, json.loads(send.payload)["ts"] if _is_json(send.payload) else "")] += 1
    for incident in truth:
        if incident.expected == "dead_letter":
            assert incident.topic is not None and incident.reason is not None
            refused = verdicts[incident.topic].count(incident.reason)
            assert refused >= (incident.count or 1), (incident.kind, verdicts[incident.topic])
        else:
            assert incident.topic is not None and incident.ts is not None
            assert payloads[(incident.topic, incident.ts)] == (2 if incident.expected == "stored_once" else 1)
    kinds = {incident.kind for incident in truth}
    assert {"clock_skew", "duplicate", "out_of_order", "malformed_payload", "unknown_device"} <= kinds
    skew = next(i for i in truth if i.kind == "clock_skew")
    assert skew.count == 40
    # The stale reading carries a value past its limits, and still raises nothing: it is late.
    assert drive.findings == []
    assert {v for vs in verdicts.values() for v in vs} - {"accepted"} == {i.reason for i in truth if i.reason}


def _is_json(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except ValueError:
        return False


def _gateway_verdict(send: Send, at: datetime, registry: dict[str, SimulatedDevice]) -> str:
    """What the gateway does with a message: `accepted`, or the reason it refuses it."""
    try:
        address = parse_topic(send.topic)
        device = registry.get(address.device_id)
        if device is None:
            return "unknown_device"
        if (device.city, device.domain.name) != (address.city, address.domain):
            return "device_mismatch"
        if address.kind == "status":
            parse_status(send.payload)
        else:
            parse_payload(send.payload, device.domain, received_at=at)
    except RejectedMessage as rejected:
        return rejected.reason
    return "accepted"


def test_every_scenario_is_offered_by_the_command() -> None:
    simulate = build_parser().parse_args(["simulate", "--city", "ha-noi", "--scenario", "bad-devices"])
    assert simulate.scenario == "bad-devices"
    for name in SCENARIOS:
        assert build_parser().parse_args(["simulate", "--city", "x", "--scenario", name]).scenario == name


def test_ground_truth_round_trips_through_json_lines(tmp_path: Path) -> None:
    fleet = build_fleet("hai-phong", 40)
    storm = Storm(fleet, interval_s=1.0)
    Drive(storm, fleet, steps=60).run()
    path = tmp_path / "truth" / "storm.jsonl"
    write_truth(path, storm.incidents())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(storm.incidents())
    first: dict[str, Any] = json.loads(lines[0])
    for key in (
        "scenario",
        "kind",
        "city",
        "domain",
        "expected",
        "expected_rules",
        "started_at",
        "detect_within_s",
    ):
        assert key in first
    assert read_truth(path) == sorted(
        storm.incidents(), key=lambda i: (i.started_at, i.kind, i.device_id or "")
    )
    write_truth(path, [])
    assert read_truth(path) == []


# -- load mode's wire --------------------------------------------------------------------------


def test_mqtt_remaining_length_and_connect_packet() -> None:
    assert remaining_length(0) == b"\x00"
    assert remaining_length(127) == b"\x7f"
    assert remaining_length(128) == b"\x80\x01"
    assert remaining_length(16383) == b"\xff\x7f"
    assert remaining_length(2_097_152) == b"\x80\x80\x80\x01"
    packet = connect_packet("sim-1", "user", "pw")
    assert packet[0] == 0x10 and packet[1] == len(packet) - 2
    assert packet[2:8] == b"\x00\x04MQTT" and packet[8] == 4 and packet[9] == 0x80 | 0x40 | 0x02
    assert encode_topic("a/b") == b"\x00\x03a/b"


def test_pubacks_are_counted_across_split_reads() -> None:
    publisher = WirePublisher.__new__(WirePublisher)
    publisher.acknowledged = 0
    publisher._inbox = bytearray()
    stream = b"\x40\x02\x00\x01" * 3 + b"\xd0\x00" + b"\x40\x02\x00\x04"
    for cut in (1, 5, 10):
        publisher._inbox += stream[:cut]
        publisher._parse()
        stream = stream[cut:]
    publisher._inbox += stream
    publisher._parse()
    assert publisher.acknowledged == 4 and not publisher._inbox


def test_load_messages_carry_their_own_ts_and_seq() -> None:
    device = build_fleet("ha-noi", 3)[2]
    sender = _Sender(device)
    at = datetime.now(UTC)
    bodies = [json.loads(sender.payload(at + timedelta(microseconds=i), second=7)) for i in range(3)]
    assert [body["seq"] for body in bodies] == [1, 2, 3]
    assert len({body["ts"] for body in bodies}) == 3
    for body in bodies:
        metrics = {k: v for k, v in body.items() if k not in ("ts", "seq")}
        parse_payload(json.dumps(body).encode(), device.domain, received_at=at)
        assert set(metrics) <= {m.name for m in device.domain.metrics}
