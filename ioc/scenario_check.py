"""`ioc detect --scenario`: a simulated city lives through a scenario in simulated time, its
messages validated as the gateway validates them and judged by the processor's own detectors
(per device, and flood correlation by zone), and what they raised is scored against the
scenario's ground truth: precision, recall and time-to-detect per incident.

No service runs: a three-hour storm over 200 devices replays in seconds, so rules and detector
changes can be tried against every scenario before a drill. What it leaves out is the pipeline's
own delay (queues, batches, the database), which `tests/integration/test_scenarios.py` measures
end to end, and silence-based offline detection (a will's `offline` status is replayed).

Alarms are kept as the store keeps them (`ioc_core.alarms`: one open alarm per subject and alarm
key, whose reasons are the rules it broke), so an excursion that breaks three rules counts once.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.inbox import InboundMessage
from ioc_core.alarms import OFFLINE_RULE, Finding
from ioc_core.errors import RejectedMessage
from ioc_core.models import DeviceRoute
from ioc_core.rules import severity_rank
from ioc_core.telemetry import Reading, StatusReport, parse_topic, validate
from processors.detection import (
    DeviceDetection,
    DeviceDetectorState,
    DeviceProfile,
    DistrictFloodCorrelator,
    StationSignal,
    offline_finding,
)
from simulators.fleet import SimulatedDevice, build_fleet
from simulators.scenarios import SCENARIOS, Scenario
from simulators.truth import Incident


@dataclass
class ReplayedAlarm:
    """One alarm as the store would hold it: opened once, with every rule it broke."""

    subject: str
    key: str
    opened_at: datetime
    reasons: dict[str, str] = field(default_factory=dict)  # rule -> worst severity
    active: set[str] = field(default_factory=set)
    closed_at: datetime | None = None


class AlarmBook:
    """Findings applied as `ioc_core.storage.alarms.apply_findings` applies them, in memory, with
    when each (subject, rule) first reached each severity."""

    def __init__(self) -> None:
        self.alarms: list[ReplayedAlarm] = []
        self._open: dict[tuple[str, str], ReplayedAlarm] = {}
        self.reached: dict[tuple[str, str], list[tuple[datetime, str]]] = {}

    def is_open(self, subject: str, key: str) -> bool:
        return (subject, key) in self._open

    def apply(self, findings: Sequence[Finding]) -> None:
        for finding in findings:
            alarm = self._open.get(finding.key)
            if finding.active:
                severity = finding.severity or "medium"
                if alarm is None:
                    alarm = ReplayedAlarm(subject=finding.subject, key=finding.key[1], opened_at=finding.at)
                    self.alarms.append(alarm)
                    self._open[finding.key] = alarm
                known = alarm.reasons.get(finding.rule)
                if known is None or severity_rank(severity) > severity_rank(known):
                    alarm.reasons[finding.rule] = severity
                alarm.active.add(finding.rule)
                self.reached.setdefault((finding.subject, finding.rule), []).append((finding.at, severity))
            elif alarm is not None and finding.rule in alarm.reasons:
                alarm.active.discard(finding.rule)
                if not alarm.active:
                    alarm.closed_at = finding.at
                    del self._open[finding.key]


@dataclass(frozen=True)
class IncidentResult:
    incident: Incident
    subject: str
    # Seconds from the incident's start to the last of its expected rules at its severity; None
    # when one never got there.
    time_to_detect_s: float | None

    @property
    def in_time(self) -> bool:
        budget = self.incident.detect_within_s
        return self.time_to_detect_s is not None and (budget is None or self.time_to_detect_s <= budget)


@dataclass(frozen=True)
class ScenarioScore:
    scenario: str
    city: str
    devices: int
    readings: int
    rejected: int
    results: list[IncidentResult]
    alarms: list[ReplayedAlarm]
    unexplained: list[ReplayedAlarm]
    # Incidents about ingestion (dead letters, repeats, late readings): not the detectors' to find.
    not_detection: int

    @property
    def recall(self) -> float | None:
        return sum(r.in_time for r in self.results) / len(self.results) if self.results else None

    @property
    def precision(self) -> float | None:
        if not self.alarms:
            return None
        return (len(self.alarms) - len(self.unexplained)) / len(self.alarms)

    @property
    def median_time_to_detect_s(self) -> float | None:
        times = [r.time_to_detect_s for r in self.results if r.time_to_detect_s is not None]
        return statistics.median(times) if times else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "city": self.city,
            "devices": self.devices,
            "readings": self.readings,
            "rejected": self.rejected,
            "incidents": len(self.results),
            "detected_in_time": sum(r.in_time for r in self.results),
            "alarms": len(self.alarms),
            "unexplained_alarms": len(self.unexplained),
            "precision": _rounded(self.precision),
            "recall": _rounded(self.recall),
            "median_time_to_detect_s": _rounded(self.median_time_to_detect_s),
            "not_detection_incidents": self.not_detection,
        }


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def device_profile(device: SimulatedDevice) -> DeviceProfile:
    """The device as the processor knows it once registered (with its per-station limits)."""
    return DeviceProfile.of(
        id=device.id,
        city=device.city,
        domain=device.domain.name,
        name=device.name,
        district=device.district,
        thresholds=device.thresholds,
        zone_area=device.zone,
    )


class ScenarioReplay:
    """One scenario over one fleet in simulated time: every device reports every
    `len(fleet) / rate` seconds for `duration_s` seconds from `start`, staggered as the runner
    staggers them."""

    def __init__(
        self,
        fleet: list[SimulatedDevice],
        scenario: Scenario,
        *,
        rate: float,
        duration_s: float,
        start: datetime,
        detection: DeviceDetection | None = None,
    ) -> None:
        self.fleet = fleet
        self.scenario = scenario
        self.interval_s = len(fleet) / rate
        self.duration_s = duration_s
        self.start = start
        self.detection = detection or DeviceDetection()
        self.correlator = DistrictFloodCorrelator()
        self.book = AlarmBook()
        self.profiles = {device.id: device_profile(device) for device in fleet}
        self.routes = {
            device.id: DeviceRoute(id=device.id, city=device.city, domain=device.domain.name)
            for device in fleet
        }
        self.states = {device.id: DeviceDetectorState() for device in fleet}
        self.signals: dict[str, dict[str, StationSignal]] = {}
        self.powered_off: set[str] = set()
        self.readings = 0
        self.rejected = 0

    def run(self) -> list[Incident]:
        """Replay the whole scenario; returns its ground truth."""
        fleet, scenario = self.fleet, self.scenario
        scenario.begin(self.start)
        for at, index in self._due():
            progress = min((at - self.start).total_seconds() / self.duration_s, 1.0)
            self._switch_power(progress, at)
            device = fleet[index]
            if device.id in self.powered_off:
                continue
            for send in scenario.readings(device, at, progress):
                self._receive(
                    InboundMessage(send.topic, send.payload, mid=0, qos=1, received_at=at, retain=send.retain)
                )
        end = self.start + timedelta(seconds=self.duration_s)
        scenario.finish(end)
        return scenario.incidents()

    def _due(self) -> Iterator[tuple[datetime, int]]:
        count, interval = len(self.fleet), self.interval_s
        due = [(interval * index / count, index) for index in range(count)]
        heapq.heapify(due)
        while due[0][0] < self.duration_s:
            offset, index = heapq.heappop(due)
            yield self.start + timedelta(seconds=offset), index
            heapq.heappush(due, (offset + interval, index))

    def _switch_power(self, progress: float, at: datetime) -> None:
        off, on = self.scenario.power(progress)
        for devices, powered in ((off, False), (on, True)):
            if not devices:
                continue
            for device in devices:
                if powered:
                    self.powered_off.discard(device.id)
                else:
                    # The broker publishes the device's last will the moment its connection drops.
                    self.powered_off.add(device.id)
                    self.book.apply([offline_finding(self.profiles[device.id], at=at, active=True)])
            self.scenario.powered(devices, on=powered, at=at)
            if powered:
                # Each device says `online` as it reconnects.
                for device in devices:
                    self.book.apply([offline_finding(self.profiles[device.id], at=at, active=False)])

    def _receive(self, message: InboundMessage) -> None:
        try:
            address = parse_topic(message.topic)
            records = validate(message, address, self.routes.get(address.device_id))
        except RejectedMessage:
            self.rejected += 1
            return
        for record in records:
            profile = self.profiles[record.device_id]
            if isinstance(record, StatusReport):
                if record.status in ("offline", "online"):
                    active = record.status == "offline"
                    self.book.apply([offline_finding(profile, at=message.received_at, active=active)])
                continue
            if isinstance(record, Reading):
                self.readings += 1
                self._judge(profile, record)

    def _judge(self, profile: DeviceProfile, reading: Reading) -> None:
        state = self.states[profile.id]
        findings = self.detection.evaluate(profile, [reading], state)
        self.book.apply(findings)
        # A reading is a sign of life: the processor resolves an open offline alarm with it.
        if self.book.is_open(profile.id, OFFLINE_RULE):
            self.book.apply([offline_finding(profile, at=reading.ts, active=False)])
        signal = self.correlator.station_signal(profile, state)
        zone = profile.zone
        if signal is None or zone is None:
            return
        stations = self.signals.setdefault(zone.subject, {})
        stations[profile.id] = signal
        finding = self.correlator.evaluate(
            city=profile.city,
            zone=zone,
            signals=list(stations.values()),
            active=self.book.is_open(zone.subject, "flood.district"),
            now=reading.ts,
        )
        if finding is not None:
            self.book.apply([finding])


def score(replay: ScenarioReplay, incidents: Sequence[Incident]) -> ScenarioScore:
    """How the replay's alarms match the ground truth."""
    book = replay.book
    results: list[IncidentResult] = []
    explained: dict[str, set[str]] = {}
    not_detection = 0
    for incident in incidents:
        subject = incident.subject
        explained.setdefault(subject, set()).update(incident.expected_rules, incident.allowed_rules)
        if incident.expected != "alarm":
            not_detection += 1
            continue
        wanted = incident.expected_severity or "low"
        times: list[float] = []
        for rule in incident.expected_rules:
            reached = [
                at
                for at, severity in book.reached.get((subject, rule), [])
                if severity_rank(severity) >= severity_rank(wanted)
                and at >= incident.started_at - timedelta(seconds=replay.interval_s)
            ]
            if not reached:
                times = []
                break
            times.append(max((min(reached) - incident.started_at).total_seconds(), 0.0))
        results.append(IncidentResult(incident, subject, max(times) if times else None))
    unexplained = [
        alarm for alarm in book.alarms if not set(alarm.reasons) <= explained.get(alarm.subject, set())
    ]
    fleet = replay.fleet
    return ScenarioScore(
        scenario=replay.scenario.name,
        city=fleet[0].city,
        devices=len(fleet),
        readings=replay.readings,
        rejected=replay.rejected,
        results=results,
        alarms=book.alarms,
        unexplained=unexplained,
        not_detection=not_detection,
    )


def replay_scenario(
    scenario: str,
    *,
    city: str,
    devices: int,
    rate: float,
    duration_s: float,
    places: str | None = None,
    seed: int = 7,
    start: datetime | None = None,
    detection: DeviceDetection | None = None,
) -> ScenarioScore:
    """Replay `scenario` over `devices` devices of `city` (laid out on `places`' map) and score it;
    raises ValueError for a scenario or fleet that cannot show it."""
    behaviour = SCENARIOS.get(scenario)
    if behaviour is None:
        raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(sorted(SCENARIOS))}")
    fleet = build_fleet(city, devices, places=places or city, seed=seed)
    story = behaviour(fleet, interval_s=devices / rate, seed=seed)
    story.check(duration_s)
    replay = ScenarioReplay(
        fleet,
        story,
        rate=rate,
        duration_s=duration_s,
        start=start or datetime.now(UTC).replace(microsecond=0),
        detection=detection,
    )
    incidents = replay.run()
    return score(replay, incidents)


def report_lines(result: ScenarioScore) -> list[str]:
    """The score as a table of incidents and a summary, for a terminal."""
    columns = f"{'incident':<22} {'subject':<40} {'rules':<30} {'severity':<9}"
    lines = [f"{columns} {'ttd_s':>7} {'budget_s':>8}  in time"]
    for r in result.results:
        incident = r.incident
        ttd = f"{r.time_to_detect_s:.1f}" if r.time_to_detect_s is not None else "missed"
        budget = f"{incident.detect_within_s:.1f}" if incident.detect_within_s is not None else "-"
        lines.append(
            f"{incident.kind:<22} {r.subject:<40} {','.join(incident.expected_rules):<30}"
            f" {incident.expected_severity or '-':<9} {ttd:>7} {budget:>8}  {'yes' if r.in_time else 'NO'}"
        )
    for alarm in result.unexplained:
        lines.append(
            f"unexplained alarm: {alarm.subject} {sorted(alarm.reasons)} at {alarm.opened_at.isoformat()}"
        )
    summary = result.as_dict()
    lines.append(
        f"{summary['scenario']} over {summary['devices']} devices of {summary['city']}:"
        f" {summary['readings']} readings ({summary['rejected']} rejected);"
        f" recall {_text(summary['recall'])} ({summary['detected_in_time']} of {summary['incidents']}"
        f" incidents in time), precision {_text(summary['precision'])}"
        f" ({summary['alarms'] - summary['unexplained_alarms']} of {summary['alarms']} alarms explained),"
        f" median time-to-detect {_text(summary['median_time_to_detect_s'])} s;"
        f" {summary['not_detection_incidents']} incidents are ingestion's, not detection's"
    )
    return lines


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"
