"""What a domain is: its metrics with units, valid ranges and operator labels, default alarm
rules, the interval after which a silent device counts as offline, and how a simulated device behaves.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

from ioc_core.domains import units
from ioc_core.kpis import Kpi
from ioc_core.rules import DistrictCorrelation, MetricRules

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z][a-z])")


@dataclass(frozen=True)
class Metric:
    """One measured quantity; `name` is the wire name (FIWARE Smart Data Models spelling)."""

    name: str
    unit: str
    minimum: float
    maximum: float
    description: str
    label_en: str
    label_vi: str
    # How an operator reads it: decimals shown, and the unit in Vietnamese where it differs.
    decimals: int = 2
    unit_vi: str | None = None
    # The quantity follows the hours of the day (traffic, water demand, grid load): the statistical
    # detector learns each device's usual value for each hour, so the rush hour is normal and a
    # quiet rush hour is not.
    daily_cycle: bool = False

    @property
    def column(self) -> str:
        """The SQL column that stores it: snake case, so no identifier ever needs quoting."""
        return _CAMEL_BOUNDARY.sub("_", self.name).lower()

    def accepts(self, value: float) -> bool:
        return math.isfinite(value) and self.minimum <= value <= self.maximum

    def in_own_unit(self, value: float, unit: str) -> float | None:
        """`value`, given in `unit`, in the unit the metric is stored in; None when the unit is
        unknown or measures something else (see `ioc_core.domains.units`)."""
        conversion = units.conversion(self, unit)
        return None if conversion is None else conversion.apply(value)

    def accepted_units(self) -> list[str]:
        """The unit symbols a value of this metric may be given in."""
        return units.accepted_units(self)


# A simulated device's next metrics, from its own random stream, the wall-clock time
# (for daily cycles) and a per-device phase in [0, 1) that spreads devices apart.
Sampler = Callable[[random.Random, datetime, float], dict[str, float]]
# The alarm settings (a device's `thresholds`) a simulated device of the given phase registers
# with: limits fitted to the normal range its sampler gives that phase, as a utility fits each
# station's own limits to what that station normally sees.
StationThresholds = Callable[[float], dict[str, dict[str, float | None]]]

BATTERY = Metric(
    "batteryLevel",
    "fraction",
    0.0,
    1.0,
    "battery charge of the device",
    label_en="Battery level",
    label_vi="Mức pin",
)
# A device whose battery runs down needs a visit before it falls silent; the silence itself is the
# offline alarm, so a low battery is a warning, never critical.
BATTERY_RULES = MetricRules(warn_below=0.15, hysteresis=0.05)


# The categories of CAP 1.2 (`info/category`).
CapCategory = Literal[
    "Geo",
    "Met",
    "Safety",
    "Security",
    "Rescue",
    "Fire",
    "Health",
    "Env",
    "Transport",
    "Infra",
    "CBRNE",
    "Other",
]


@dataclass(frozen=True)
class PublicWarning:
    """Which of a domain's alarms the public is warned of, as CAP 1.2 alerts (`GET /v1/public/cap`),
    and how they are named there. Only open alarms of severity medium or worse are published."""

    category: CapCategory
    event_vi: str
    event_en: str
    # Alarm rules (`threshold.currentLevel`, `flood.district`, ...) that concern the public.
    rules: frozenset[str]


@dataclass(frozen=True)
class ChecklistStep:
    """One step of a standard operating procedure; `id` is stable, so a city's edited list and the
    ticks of open incidents keep meaning the same step."""

    id: str
    vi: str
    en: str


@dataclass(frozen=True)
class IncidentProcedure:
    """What an operations centre does with an incident of the domain (IBM IOC's standard
    operating procedure): the incident kind its alarms group into, how an incident of that kind is
    titled, how long an agency may leave an assignment unacknowledged before it escalates, and the
    checklist each incident starts with (a city may edit it through `/v1/procedures`)."""

    kind: str
    title_vi: str
    title_en: str
    escalate_after: timedelta
    checklist: tuple[ChecklistStep, ...]


@dataclass(frozen=True)
class Domain:
    name: str
    title_en: str
    title_vi: str
    metrics: tuple[Metric, ...]
    offline_after: timedelta
    sampler: Sampler
    default_rules: Mapping[str, MetricRules] = field(default_factory=dict)
    correlation: DistrictCorrelation | None = None
    # Headline figures of the domain's summary tile.
    kpis: tuple[Kpi, ...] = ()
    # A high or critical alarm nobody has acknowledged for this long is escalated to the agencies
    # whose webhooks ask for escalations.
    escalate_after: timedelta = timedelta(minutes=15)
    # Alarms the public is warned of; None: the domain's alarms stay with the operators.
    public_warning: PublicWarning | None = None
    # Where simulated devices of the domain stand, as kinds of place on a city's map ("road",
    # "river", "low_street", "market", "substation", "water_works"), most fitting first; a city
    # without such places gets them around its district centres.
    sites: tuple[str, ...] = ()
    # Per-station limits for simulated devices; None: the domain's default rules fit every station.
    station_thresholds: StationThresholds | None = None
    # The incident kind the domain's alarms group into and its standard operating procedure;
    # None: the domain's alarms open no incident by themselves.
    procedure: IncidentProcedure | None = None

    def __post_init__(self) -> None:
        if BATTERY not in self.metrics:
            object.__setattr__(self, "metrics", (*self.metrics, BATTERY))
        if BATTERY.name not in self.default_rules:
            object.__setattr__(self, "default_rules", {**self.default_rules, BATTERY.name: BATTERY_RULES})
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"domain {self.name} names a metric twice")
        unknown = set(self.default_rules) - set(names)
        if unknown:
            raise ValueError(f"domain {self.name} has rules for unknown metrics {sorted(unknown)}")
        if self.correlation is not None:
            missing = {self.correlation.rain_metric, self.correlation.level_metric} - set(names)
            if missing:
                raise ValueError(f"domain {self.name} correlates unknown metrics {sorted(missing)}")

    @property
    def table(self) -> str:
        return f"readings_{self.name}"

    def metric(self, name: str) -> Metric | None:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        return None


# Vietnam keeps one time zone, UTC+7, all year: daily rhythms follow its clock.
LOCAL_TIME = timezone(timedelta(hours=7))


def local_time(t: datetime) -> datetime:
    """`t` on the local clock; a naive `t` is taken as local already."""
    return t.astimezone(LOCAL_TIME) if t.tzinfo is not None else t


def local_hour(t: datetime) -> float:
    """The hour of the day on the local clock, 0 to 24."""
    local = local_time(t)
    return local.hour + local.minute / 60 + local.second / 3600 + local.microsecond / 3.6e9


def daily_cycle(t: datetime, peaks: tuple[float, ...], width_h: float = 1.5) -> float:
    """A 0..1 bump at each peak hour (local time of the reading), for rush hours and load curves."""
    hour = local_hour(t)
    level = 0.0
    for peak in peaks:
        distance = min(abs(hour - peak), 24 - abs(hour - peak))
        level = max(level, math.exp(-((distance / width_h) ** 2)))
    return level


def daytime(t: datetime, start_h: float, end_h: float, ramp_h: float = 1.0) -> float:
    """0 at night, rising smoothly to 1 over `ramp_h` hours from `start_h` and back to 0 from
    `end_h` (local hours, `start_h` < `end_h`): the part of the day a city is up and about."""
    hour = local_hour(t)

    def part(at: float) -> float:
        return smoothstep((at - start_h) / ramp_h) * (1 - smoothstep((at - end_h) / ramp_h))

    # An evening that fades out past midnight goes on fading after it, rather than dropping to
    # night at 00:00 (a feeder's load does not fall by a twentieth in ten seconds).
    return max(part(hour), part(hour + 24))


def smoothstep(x: float) -> float:
    """0 below 0, 1 above 1, an S-curve in between."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def clamp(value: float, metric: Metric) -> float:
    return min(max(value, metric.minimum), metric.maximum)
