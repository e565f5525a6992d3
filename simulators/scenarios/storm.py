"""`storm`: rain builds over the city, heaviest over some catchments (or wards outside any);
flood stations rise past
their alert and danger levels, feeders sag, traffic stands still on flooded roads; then the water
recedes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from ioc_core.alarms import DISTRICT_FLOOD_RULE
from ioc_core.domains import DOMAINS
from ioc_core.rules import MetricRules, rules_for
from simulators.fleet import SimulatedDevice
from simulators.scenarios.base import Scenario, ramp
from simulators.truth import Incident

_FLOOD, _GRID, _TRAFFIC = "flood", "grid", "traffic"


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

    # Peak rain over the zones (catchments, or wards outside any) the storm sits on (mm/h: a
    # tropical downpour, past the alert at 50 and short of the 100 that is critical) and over the
    # rest of the city.
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
        # Flood stations are correlated by zone, so the storm sits on zones: water gathers by
        # catchment, and a catchment's wards flood together.
        stations: dict[str, list[SimulatedDevice]] = defaultdict(list)
        for device in fleet:
            if device.domain.name == _FLOOD:
                stations[_zone(device)].append(device)
        candidates = [z for z, devices in stations.items() if len(devices) >= self.min_stations]
        self.heavy = set(candidates[: max(1, len(candidates) // 2)]) if candidates else set()
        self.stations = {z: stations[z] for z in self.heavy}
        self.rain_peak = {}
        for zone in dict.fromkeys(_zone(device) for device in fleet):
            peak = self.HEAVY_RAIN_MM_H if zone in self.heavy else self.LIGHT_RAIN_MM_H
            self.rain_peak[zone] = self.rng.uniform(*peak)
        self._surge: dict[str, float] = {}
        self._crossings: dict[tuple[str, str], _Crossing] = {}
        self._latest: dict[str, tuple[float, float]] = {}  # station → (rain, level)
        self._zone_incidents: dict[str, Incident] = {}
        for device in fleet:
            if _zone(device) in self.heavy and device.domain.name in (_FLOOD, _GRID, _TRAFFIC):
                self._watch(device)

    def check(self, duration_s: float | None) -> None:
        super().check(duration_s)
        if not self.heavy:
            raise ValueError(
                f"scenario storm needs {self.min_stations} flood stations in one catchment or ward:"
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
        heavy = _zone(device) in self.heavy
        rain = self.rain(progress) * self.rain_peak.get(_zone(device), 0.0)
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
        if device.domain.name == _FLOOD and _zone(device) in self.heavy:
            self._latest[device.id] = (metrics["rainfall"], metrics["currentLevel"])
            self._judge_zone(_zone(device), at)

    def _judge_zone(self, zone: str, at: datetime) -> None:
        """The zone's flood alarm is due once enough of its stations are both in heavy rain and
        past their alert level (the correlation also counts a fast rise, which comes earlier)."""
        qualifying = []
        for station in self.stations[zone]:
            latest = self._latest.get(station.id)
            if latest is None:
                continue
            limits = rules_for(station.domain, station.thresholds)["currentLevel"]
            rain, level = latest
            if rain >= self.rain_at_least and limits.warn_above is not None and level > limits.warn_above:
                qualifying.append(station)
        incident = self._zone_incidents.get(zone)
        if incident is None and len(qualifying) >= self.min_stations:
            first = qualifying[0]
            self._zone_incidents[zone] = Incident(
                scenario=self.name,
                kind="district_flood",
                city=first.city,
                domain=_FLOOD,
                expected="alarm",
                started_at=at,
                area=first.zone,
                district=None if first.zone is not None else first.district,
                expected_rules=[DISTRICT_FLOOD_RULE],
                # High while its stations are past their alert levels; critical comes with the
                # first station past its danger level, that station's own incident (in a storm of
                # three hours, tens of minutes later).
                expected_severity="high",
                detect_within_s=self.detect_within(3),
                detail=f"{len(qualifying)} stations of {zone} in heavy rain and past their alert level",
            )
        elif incident is not None and incident.ended_at is None and not qualifying:
            incident.ended_at = at

    def incidents(self) -> list[Incident]:
        found = [i for crossing in self._crossings.values() for i in crossing.incidents()]
        return [*found, *self._zone_incidents.values()]


def _zone(device: SimulatedDevice) -> str:
    """The zone a device's flood correlation counts it in: its area, else its registered ward."""
    return device.zone if device.zone is not None else device.district


def _blend(normal: float, target: float, weight: float) -> float:
    return normal + weight * (target - normal)
