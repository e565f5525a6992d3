"""What happens in a simulated city, and the ground truth of it.

A scenario decides, for every reading a device is due to send, what goes on the wire, and which
devices lose or regain power; it notes each incident it causes (`simulators.truth.Incident`). Its
timeline is laid over the run: `progress` goes from 0 at the start to 1 at the end, so the same
storm takes a minute in a test and three hours in a drill. Readings always carry the real time.

- `normal`: every device behaves as its domain's sampler says; no incident.
- `storm`: rain builds over the city, heaviest over some districts, where flood stations rise
  past their alert and then danger levels (and the district's flood alarm follows), the feeders
  running the drainage pumps sag, and traffic comes to a standstill on flooded roads; then the
  water recedes.
- `outage`: one distribution feeder fails and every device on it (its meters, the water works it
  powers) goes silent at once, its connection dropped so the broker publishes its last will; the
  feeder comes back later and the devices reconnect.
- `bad-devices`: a few devices misbehave once each (malformed and oversized payloads, values out of
  range or not finite, unknown metrics, bad and future timestamps, a device on another domain's
  topic, an unregistered device, a bad status), one sends a message twice, one sends a stale
  reading after newer ones, and one device's clock runs twelve minutes ahead all along.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ioc_core.alarms import DISTRICT_FLOOD_RULE, OFFLINE_RULE
from ioc_core.domains import DOMAINS
from ioc_core.domains.base import smoothstep
from ioc_core.rules import MetricRules, rules_for
from ioc_core.telemetry import (
    MAX_PAYLOAD_BYTES,
    REASON_BAD_STATUS,
    REASON_BAD_TIMESTAMP,
    REASON_DEVICE_MISMATCH,
    REASON_FUTURE_TIMESTAMP,
    REASON_MALFORMED,
    REASON_NOT_FINITE,
    REASON_OUT_OF_RANGE,
    REASON_TOO_LARGE,
    REASON_UNKNOWN_DEVICE,
    REASON_UNKNOWN_METRIC,
    TOPIC_ROOT,
)
from simulators.fleet import SimulatedDevice
from simulators.truth import Incident

# Time the pipeline may take from a reading's arrival to its alarm or dead letter, on top of the
# reporting interval of the device (a crossing is seen with the reading that crosses).
PIPELINE_ALLOWANCE_S = 10.0
# Fewest readings each device must send during a scenario for its timeline to show.
MIN_READINGS = 15

_FLOOD, _GRID, _TRAFFIC = "flood", "grid", "traffic"


@dataclass(frozen=True)
class Send:
    """One message on the wire. `via`: the device whose connection carries it (default: the sender)."""

    topic: str
    payload: bytes
    retain: bool = False
    via: str | None = None


def ramp(progress: float, start: float, end: float) -> float:
    """0 before `start`, 1 after `end`, smooth in between."""
    return smoothstep((progress - start) / (end - start))


class Scenario:
    """`normal`: every device as its domain's sampler says. The base of the others."""

    name = "normal"

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        self.fleet = fleet
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.started_at: datetime | None = None
        self._incidents: list[Incident] = []

    def check(self, duration_s: float | None) -> None:
        """Raise ValueError (with what to change) when the fleet or run cannot show the scenario."""
        if self.name == "normal":
            return
        if duration_s is None:
            raise ValueError(f"scenario {self.name} needs a --duration")
        if duration_s / self.interval_s < MIN_READINGS:
            rate = MIN_READINGS * len(self.fleet) / duration_s
            raise ValueError(
                f"scenario {self.name} needs every device to report at least {MIN_READINGS} times:"
                f" raise --rate to {math.ceil(rate)} or more, or lengthen --duration"
            )

    def begin(self, at: datetime) -> None:
        self.started_at = at

    def power(self, progress: float) -> tuple[list[SimulatedDevice], list[SimulatedDevice]]:
        """Devices to power off and on now."""
        return [], []

    def powered(self, devices: list[SimulatedDevice], *, on: bool, at: datetime) -> None:
        """Told once the devices from `power` have lost or regained power."""

    def readings(self, device: SimulatedDevice, at: datetime, progress: float) -> list[Send]:
        """What the device sends when its reading is due."""
        metrics = self.overlay(device, device.sample(at), at, progress)
        return [Send(device.topic, device.payload(at, metrics))]

    def overlay(
        self, device: SimulatedDevice, metrics: dict[str, float], at: datetime, progress: float
    ) -> dict[str, float]:
        return metrics

    def finish(self, at: datetime) -> None:
        """The run is over at `at`."""

    def incidents(self) -> list[Incident]:
        return list(self._incidents)

    def detect_within(self, readings: float = 2) -> float:
        return round(readings * self.interval_s + PIPELINE_ALLOWANCE_S, 1)


# -- storm -------------------------------------------------------------------------------------

# What crossing a limit of a metric is called in the ground truth: (above or below, crit?) → kind.
_CROSSING_KINDS = {
    ("currentLevel", False): "water_level_alert",
    ("currentLevel", True): "water_level_danger",
    ("rainfall", False): "heavy_rain",
    ("rainfall", True): "torrential_rain",
    ("voltage", False): "feeder_voltage_sag",
    ("voltage", True): "feeder_voltage_collapse",
    ("averageVehicleSpeed", False): "traffic_standstill",
    ("averageVehicleSpeed", True): "traffic_standstill",
    ("occupancy", False): "road_blocked",
    ("occupancy", True): "road_blocked",
}


@dataclass
class _Crossing:
    """Watches the readings a scenario publishes for one metric of one device, noting when they
    first pass its warn and crit limits and when they are back inside."""

    device: SimulatedDevice
    metric: str
    rules: MetricRules
    allowed: list[str]
    warn: Incident | None = None
    crit: Incident | None = None
    done: bool = False

    def observe(self, value: float, at: datetime, scenario: Scenario) -> None:
        rules = self.rules
        beyond_warn = _beyond(value, rules.warn_above, rules.warn_below)
        beyond_crit = _beyond(value, rules.crit_above, rules.crit_below)
        if beyond_warn or beyond_crit:
            if self.warn is None and not self.done:
                self.warn = self._incident(False, at, value, scenario)
            if beyond_crit and self.crit is None and not self.done:
                self.crit = self._incident(True, at, value, scenario)
            return
        if self.warn is not None and not self.done and _back_inside(value, rules):
            for incident in (self.warn, self.crit):
                if incident is not None:
                    incident.ended_at = at
            self.done = True

    def _incident(self, critical: bool, at: datetime, value: float, scenario: Scenario) -> Incident:
        rules = self.rules
        if critical:
            above, below = rules.crit_above, rules.crit_below
        else:
            above, below = rules.warn_above, rules.warn_below
        limit = above if above is not None and value > above else below
        device = self.device
        return Incident(
            scenario=scenario.name,
            kind=_CROSSING_KINDS.get((self.metric, critical), f"{self.metric}_limit"),
            city=device.city,
            domain=device.domain.name,
            expected="alarm",
            started_at=at,
            device_id=device.id,
            district=device.district,
            metric=self.metric,
            expected_rules=[f"threshold.{self.metric}"],
            expected_severity="critical" if critical else "medium",
            allowed_rules=self.allowed,
            detect_within_s=scenario.detect_within(),
            detail=f"{self.metric} {value:g} past the station's {'danger' if critical else 'alert'} limit"
            f" {limit}",
        )

    def incidents(self) -> list[Incident]:
        return [i for i in (self.warn, self.crit) if i is not None]


def _beyond(value: float, above: float | None, below: float | None) -> bool:
    return (above is not None and value > above) or (below is not None and value < below)


def _back_inside(value: float, rules: MetricRules) -> bool:
    margin = rules.hysteresis or 0.0
    above = [x for x in (rules.warn_above, rules.crit_above) if x is not None]
    below = [x for x in (rules.warn_below, rules.crit_below) if x is not None]
    return not (above and value > min(above) - margin) and not (below and value < max(below) + margin)


class Storm(Scenario):
    name = "storm"

    # Peak rain over the districts the storm sits on (mm/h: a tropical downpour, past the alert at
    # 50 and short of the 100 that is critical) and over the rest of the city.
    HEAVY_RAIN_MM_H = (72.0, 85.0)
    LIGHT_RAIN_MM_H = (3.0, 7.0)
    # How far past its danger level the water reaches at the flooded stations (m).
    OVER_DANGER_M = 0.45
    # What the feeders running the drainage pumps sag to (V: past the 218.5 V alert, short of 207).
    SAGGED_VOLTAGE = 213.0
    # A flooded road: a crawl (past the 5 km/h alert, short of 2) and its lanes nearly full.
    STANDSTILL_KMH = 3.8
    STANDSTILL_OCCUPANCY = 0.85
    STANDSTILL_FLOW = 8.0

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        super().__init__(fleet, interval_s=interval_s, seed=seed)
        flood = DOMAINS[_FLOOD]
        correlation = flood.correlation
        self.min_stations = correlation.min_stations if correlation is not None else 2
        self.rain_at_least = correlation.rain_at_least if correlation is not None else 10.0
        stations: dict[str, list[SimulatedDevice]] = defaultdict(list)
        for device in fleet:
            if device.domain.name == _FLOOD:
                stations[device.district].append(device)
        candidates = [d for d, devices in stations.items() if len(devices) >= self.min_stations]
        self.heavy = set(candidates[: max(1, len(candidates) // 2)]) if candidates else set()
        self.stations = {d: stations[d] for d in self.heavy}
        self.rain_peak = {}
        for district in dict.fromkeys(device.district for device in fleet):
            peak = self.HEAVY_RAIN_MM_H if district in self.heavy else self.LIGHT_RAIN_MM_H
            self.rain_peak[district] = self.rng.uniform(*peak)
        self._surge: dict[str, float] = {}
        self._crossings: dict[tuple[str, str], _Crossing] = {}
        self._latest: dict[str, tuple[float, float]] = {}  # station → (rain, level)
        self._district_incidents: dict[str, Incident] = {}
        for device in fleet:
            if device.district in self.heavy and device.domain.name in (_FLOOD, _GRID, _TRAFFIC):
                self._watch(device)

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if not self.heavy:
            raise ValueError(
                f"scenario storm needs {self.min_stations} flood stations in one district:"
                f" use --devices {5 * self.min_stations} or more"
            )

    def _watch(self, device: SimulatedDevice) -> None:
        rules = rules_for(device.domain, device.thresholds)
        touched = {
            _FLOOD: ("currentLevel", "rainfall"),
            _GRID: ("voltage", "activePower"),
            _TRAFFIC: ("averageVehicleSpeed", "occupancy", "intensity"),
        }[device.domain.name]
        allowed = [f"{kind}.{metric}" for metric in touched for kind in ("rate", "zscore")]
        for metric in touched:
            if rules[metric].has_limits:
                self._crossings[(device.id, metric)] = _Crossing(device, metric, rules[metric], allowed)

    @staticmethod
    def rain(progress: float) -> float:
        return ramp(progress, 0.06, 0.38) * (1 - ramp(progress, 0.66, 0.86))

    @staticmethod
    def water(progress: float) -> float:
        return ramp(progress, 0.12, 0.55) * (1 - ramp(progress, 0.70, 0.86))

    def overlay(
        self, device: SimulatedDevice, metrics: dict[str, float], at: datetime, progress: float
    ) -> dict[str, float]:
        heavy = device.district in self.heavy
        rain = self.rain(progress) * self.rain_peak.get(device.district, 0.0)
        water = self.water(progress)
        domain = device.domain.name
        changed = dict(metrics)
        if domain == _FLOOD:
            gust = self.rng.uniform(0.92, 1.08)
            changed["rainfall"] = round(max(metrics["rainfall"], rain * gust), 2)
            if heavy:
                if device.id not in self._surge:
                    limits = rules_for(device.domain, device.thresholds)["currentLevel"]
                    top = (
                        limits.crit_above or limits.warn_above or metrics["currentLevel"]
                    ) + self.OVER_DANGER_M
                    self._surge[device.id] = top - metrics["currentLevel"]
                changed["currentLevel"] = round(metrics["currentLevel"] + water * self._surge[device.id], 3)
            else:
                changed["currentLevel"] = round(metrics["currentLevel"] + 0.08 * self.rain(progress), 3)
        elif domain == _GRID and heavy:
            voltage = metrics["voltage"]
            target = self.SAGGED_VOLTAGE + self.rng.gauss(0, 0.5)
            changed["voltage"] = round(voltage + water * (target - voltage), 1)
            changed["activePower"] = round(metrics["activePower"] * (1 + 0.3 * water), 1)
        elif domain == _TRAFFIC:
            if heavy:
                jam = min(1.0, 1.25 * water)
                speed = self.STANDSTILL_KMH + self.rng.gauss(0, 0.25)
                occupancy = self.STANDSTILL_OCCUPANCY + self.rng.gauss(0, 0.008)
                changed["averageVehicleSpeed"] = round(_blend(metrics["averageVehicleSpeed"], speed, jam), 1)
                changed["occupancy"] = round(_blend(metrics["occupancy"], occupancy, jam), 3)
                changed["intensity"] = round(_blend(metrics["intensity"], self.STANDSTILL_FLOW, jam), 1)
            else:
                # Rain slows a city down a little everywhere.
                wet = self.rain(progress)
                changed["averageVehicleSpeed"] = round(metrics["averageVehicleSpeed"] * (1 - 0.12 * wet), 1)
                changed["intensity"] = round(metrics["intensity"] * (1 - 0.08 * wet), 1)
        self._observe(device, changed, at)
        return changed

    def _observe(self, device: SimulatedDevice, metrics: dict[str, float], at: datetime) -> None:
        for metric, value in metrics.items():
            crossing = self._crossings.get((device.id, metric))
            if crossing is not None:
                crossing.observe(value, at, self)
        if device.domain.name == _FLOOD and device.district in self.heavy:
            self._latest[device.id] = (metrics["rainfall"], metrics["currentLevel"])
            self._judge_district(device.district, at)

    def _judge_district(self, district: str, at: datetime) -> None:
        """The district's flood alarm is due once enough of its stations are both in heavy rain and
        past their alert level (the correlation also counts a fast rise, which comes earlier)."""
        qualifying = []
        for station in self.stations[district]:
            latest = self._latest.get(station.id)
            if latest is None:
                continue
            limits = rules_for(station.domain, station.thresholds)["currentLevel"]
            rain, level = latest
            if rain >= self.rain_at_least and limits.warn_above is not None and level > limits.warn_above:
                qualifying.append(station)
        incident = self._district_incidents.get(district)
        if incident is None and len(qualifying) >= self.min_stations:
            city = qualifying[0].city
            self._district_incidents[district] = Incident(
                scenario=self.name,
                kind="district_flood",
                city=city,
                domain=_FLOOD,
                expected="alarm",
                started_at=at,
                district=district,
                expected_rules=[DISTRICT_FLOOD_RULE],
                # Its stations go past their danger levels as well.
                expected_severity="critical",
                detect_within_s=self.detect_within(3),
                detail=f"{len(qualifying)} stations of {district} in heavy rain and past their alert level",
            )
        elif incident is not None and incident.ended_at is None and not qualifying:
            incident.ended_at = at

    def incidents(self) -> list[Incident]:
        found = [i for crossing in self._crossings.values() for i in crossing.incidents()]
        return [*found, *self._district_incidents.values()]


def _blend(normal: float, target: float, weight: float) -> float:
    return normal + weight * (target - normal)


# -- outage ------------------------------------------------------------------------------------


class Outage(Scenario):
    name = "outage"

    FAILS_AT, RESTORED_AT = 0.3, 0.7

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        super().__init__(fleet, interval_s=interval_s, seed=seed)
        feeders: dict[str, list[SimulatedDevice]] = defaultdict(list)
        for device in fleet:
            if device.feeder is not None:
                feeders[device.feeder].append(device)
        # The feeder with the most on it, meters and pumps alike.
        ranked = sorted(feeders.items(), key=lambda item: -len(item[1]))
        self.feeder = ranked[0][0] if ranked else None
        self.victims = ranked[0][1] if ranked else []
        self._failed = self._restored = False
        self._failed_at: datetime | None = None
        self._restored_at: datetime | None = None

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if self.feeder is None:
            raise ValueError("scenario outage needs a grid meter or water works: use --devices 5 or more")

    def power(self, progress: float) -> tuple[list[SimulatedDevice], list[SimulatedDevice]]:
        if not self._failed and progress >= self.FAILS_AT:
            self._failed = True
            return list(self.victims), []
        if self._failed and not self._restored and progress >= self.RESTORED_AT:
            self._restored = True
            return [], list(self.victims)
        return [], []

    def powered(self, devices: list[SimulatedDevice], *, on: bool, at: datetime) -> None:
        if on:
            self._restored_at = at
        else:
            self._failed_at = at

    def incidents(self) -> list[Incident]:
        if self._failed_at is None:
            return []
        return [
            Incident(
                scenario=self.name,
                kind="feeder_outage",
                city=device.city,
                domain=device.domain.name,
                expected="alarm",
                started_at=self._failed_at,
                ended_at=self._restored_at,
                device_id=device.id,
                district=device.district,
                expected_rules=[OFFLINE_RULE],
                expected_severity="medium",
                # The broker publishes the last will at once: no waiting for silence.
                detect_within_s=PIPELINE_ALLOWANCE_S,
                detail=f"feeder {self.feeder} failed; the device lost power and its connection",
            )
            for device in self.victims
        ]


# -- bad devices -------------------------------------------------------------------------------

# Misbehaviours, each done once by one device, at this point of the run.
_ONCE = (
    ("malformed_payload", 0.15),
    ("out_of_range", 0.2),
    ("not_finite", 0.25),
    ("unknown_metric", 0.3),
    ("bad_timestamp", 0.35),
    ("future_timestamp", 0.4),
    ("payload_too_large", 0.45),
    ("device_mismatch", 0.5),
    ("unknown_device", 0.55),
    ("bad_status", 0.6),
    ("duplicate", 0.65),
    ("out_of_order", 0.7),
)
_REASONS = {
    "malformed_payload": REASON_MALFORMED,
    "out_of_range": REASON_OUT_OF_RANGE,
    "not_finite": REASON_NOT_FINITE,
    "unknown_metric": REASON_UNKNOWN_METRIC,
    "bad_timestamp": REASON_BAD_TIMESTAMP,
    "future_timestamp": REASON_FUTURE_TIMESTAMP,
    "payload_too_large": REASON_TOO_LARGE,
    "device_mismatch": REASON_DEVICE_MISMATCH,
    "unknown_device": REASON_UNKNOWN_DEVICE,
    "bad_status": REASON_BAD_STATUS,
    "clock_skew": REASON_FUTURE_TIMESTAMP,
}
CLOCK_SKEW = timedelta(minutes=12)
_FUTURE = timedelta(hours=1)
# A stale reading is stamped this long before the run began: older than anything the device sent.
_STALE_BY = timedelta(minutes=2)


@dataclass
class _Plan:
    kind: str
    at: float
    device: SimulatedDevice
    done: bool = False


@dataclass
class _Skew:
    device: SimulatedDevice
    incident: Incident | None = None
    sent: int = 0


class BadDevices(Scenario):
    name = "bad-devices"

    def __init__(self, fleet: list[SimulatedDevice], *, interval_s: float, seed: int = 7) -> None:
        super().__init__(fleet, interval_s=interval_s, seed=seed)
        # The skewed clock gets a device of its own (every reading of it is refused); the one-off
        # misbehaviours go round the others.
        self.skewed = _Skew(fleet[-1]) if len(fleet) > 1 else None
        others = fleet[:-1] if len(fleet) > 1 else fleet
        self.plans = [_Plan(kind, at, others[index % len(others)]) for index, (kind, at) in enumerate(_ONCE)]

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if len(self.fleet) < 2:
            raise ValueError("scenario bad-devices needs at least 2 devices")

    def readings(self, device: SimulatedDevice, at: datetime, progress: float) -> list[Send]:
        skewed = self.skewed
        if skewed is not None and device is skewed.device:
            return [self._skewed_reading(skewed, at)]
        sends: list[Send] = []
        for plan in self.plans:
            if plan.device is device and not plan.done and progress >= plan.at:
                plan.done = True
                sends.extend(self._misbehave(plan.kind, device, at))
        if not any(send.topic == device.topic and send.payload for send in sends):
            sends.append(Send(device.topic, device.next_payload(at)))
        return sends

    def _skewed_reading(self, skewed: _Skew, at: datetime) -> Send:
        device = skewed.device
        ahead = at + CLOCK_SKEW
        skewed.sent += 1
        if skewed.incident is None:
            skewed.incident = self._dead_letter("clock_skew", device, device.topic, at)
            skewed.incident.allowed_rules = [OFFLINE_RULE]
            skewed.incident.detail = (
                f"the device's clock runs {CLOCK_SKEW.total_seconds() / 60:g} minutes ahead: every"
                " reading is stamped in the future"
            )
        skewed.incident.count = skewed.sent
        return Send(device.topic, device.payload(ahead, device.sample(at)))

    def _misbehave(self, kind: str, device: SimulatedDevice, at: datetime) -> list[Send]:
        metrics = device.sample(at)
        bad = _bad_message(kind, device, at, metrics)
        if bad is not None:
            topic, payload = bad
            return [self._rejected(kind, device, topic, payload, at)]
        if kind == "unknown_device":
            ghost = f"{device.id}-ghost"
            topic = f"{TOPIC_ROOT}/{device.city}/{device.domain.name}/{ghost}/telemetry"
            incident = self._dead_letter(kind, device, topic, at)
            incident.device_id = ghost
            self._incidents.append(incident)
            body = {"ts": at.isoformat(), "seq": 1, **metrics}
            return [Send(topic, _json(body), via=device.id)]
        if kind == "bad_status":
            return [self._rejected(kind, device, device.status_topic, b"rebooting", at)]
        if kind == "duplicate":
            payload = device.payload(at, metrics)
            self._incidents.append(
                self._stored(kind, "stored_once", device, at, payload, "the same message sent twice")
            )
            return [Send(device.topic, payload), Send(device.topic, payload)]
        if kind == "out_of_order":
            stale_at = (self.started_at or at) - _STALE_BY
            payload = device.payload(stale_at, _past_limits(device, device.sample(stale_at)))
            self._incidents.append(
                self._stored(
                    kind,
                    "stored_late",
                    device,
                    at,
                    payload,
                    "a reading older than the device's latest, past its limits: stored, raising nothing",
                )
            )
            return [Send(device.topic, device.next_payload(at)), Send(device.topic, payload)]
        raise ValueError(f"unknown misbehaviour {kind!r}")

    def _rejected(self, kind: str, device: SimulatedDevice, topic: str, payload: bytes, at: datetime) -> Send:
        self._incidents.append(self._dead_letter(kind, device, topic, at))
        return Send(topic, payload)

    def _dead_letter(self, kind: str, device: SimulatedDevice, topic: str, at: datetime) -> Incident:
        return Incident(
            scenario=self.name,
            kind=kind,
            city=device.city,
            domain=device.domain.name,
            expected="dead_letter",
            started_at=at,
            device_id=device.id,
            district=device.district,
            reason=_REASONS[kind],
            topic=topic,
            count=1,
            detect_within_s=PIPELINE_ALLOWANCE_S,
            detail=f"rejected with reason {_REASONS[kind]}",
        )

    def _stored(
        self, kind: str, expected: Any, device: SimulatedDevice, at: datetime, payload: bytes, detail: str
    ) -> Incident:
        body = json.loads(payload)
        return Incident(
            scenario=self.name,
            kind=kind,
            city=device.city,
            domain=device.domain.name,
            expected=expected,
            started_at=at,
            device_id=device.id,
            district=device.district,
            topic=device.topic,
            ts=body["ts"],
            seq=body["seq"],
            count=1,
            detect_within_s=PIPELINE_ALLOWANCE_S,
            detail=detail,
        )

    def incidents(self) -> list[Incident]:
        skew = [self.skewed.incident] if self.skewed is not None and self.skewed.incident else []
        return [*self._incidents, *skew]


def _past_limits(device: SimulatedDevice, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with one pushed past its critical limit (still within the valid range)."""
    rules = rules_for(device.domain, device.thresholds)
    for metric in device.domain.metrics:
        limits = rules[metric.name]
        if limits.crit_above is not None and limits.crit_above < metric.maximum:
            past = limits.crit_above + min(1.0, (metric.maximum - limits.crit_above) / 2)
            return {**metrics, metric.name: past}
        if limits.crit_below is not None and limits.crit_below > metric.minimum:
            return {**metrics, metric.name: (limits.crit_below + metric.minimum) / 2}
    return metrics


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (Scenario, Storm, Outage, BadDevices)}


def _bad_message(
    kind: str, device: SimulatedDevice, at: datetime, metrics: dict[str, float]
) -> tuple[str, bytes] | None:
    """The topic and payload of a message the gateway must dead-letter as `kind` (None: not one)."""
    first = device.domain.metrics[0]
    if kind == "malformed_payload":
        whole = device.payload(at, metrics)
        return device.topic, whole[: len(whole) // 2]
    if kind == "out_of_range":
        wild = first.maximum + (first.maximum - first.minimum)
        return device.topic, device.payload(at, {first.name: wild})
    if kind == "not_finite":
        device.seq += 1
        return device.topic, f'{{"ts":"{at.isoformat()}","seq":{device.seq},"{first.name}":NaN}}'.encode()
    if kind == "unknown_metric":
        return device.topic, device.payload(at, {**metrics, "signalStrength": -71.0})
    if kind == "bad_timestamp":
        device.seq += 1
        return device.topic, _json({"ts": "hôm qua, 14 giờ", "seq": device.seq, **metrics})
    if kind == "future_timestamp":
        return device.topic, device.payload(at + _FUTURE, metrics)
    if kind == "payload_too_large":
        device.seq += 1
        body = {"ts": at.isoformat(), "seq": device.seq, **metrics, "log": "x" * MAX_PAYLOAD_BYTES}
        return device.topic, _json(body)
    if kind == "device_mismatch":
        other = next(name for name in sorted(DOMAINS) if name != device.domain.name)
        return f"{TOPIC_ROOT}/{device.city}/{other}/{device.id}/telemetry", device.payload(at, metrics)
    if kind == "bad_status":
        return device.status_topic, b"rebooting"
    return None
