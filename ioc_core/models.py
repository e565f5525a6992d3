"""Domain objects shared by the API, the storage layer and the tools."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator

from ioc_core.domains import DOMAINS
from ioc_core.rules import rule_value_problem
from ioc_core.telemetry import CITY_PATTERN, DEVICE_ID_PATTERN

DeviceStatus = Literal["online", "offline", "unknown"]
# The rule keys a device may set per metric (`ioc_core.rules.RULE_KEYS`); null switches that part off.
ThresholdKey = Literal[
    "warn_above",
    "crit_above",
    "warn_below",
    "crit_below",
    "hysteresis",
    "rise_above",
    "drop_above",
    "rate_window_s",
    "zscore",
    "zscore_floor",
    "flatline_s",
]
# Strict: JSON `true` or "3" is a mistake to point out, not a number to guess.
Thresholds = dict[str, dict[ThresholdKey, Annotated[float, Strict()] | None]]


class Location(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lat: float = Field(ge=-90, le=90, strict=True, description="WGS 84 latitude", examples=[21.0285])
    lon: float = Field(ge=-180, le=180, strict=True, description="WGS 84 longitude", examples=[105.8542])


class DeviceIn(BaseModel):
    """A device to register."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "hn-flood-001",
                    "city": "ha-noi",
                    "domain": "flood",
                    "name": "Trạm đo mực nước Phan Đình Phùng",
                    "district": "Ba Đình",
                    "location": {"lat": 21.0401, "lon": 105.8412},
                    "thresholds": {"currentLevel": {"warn_above": 3.0, "crit_above": 4.5}},
                }
            ]
        },
    )

    id: str = Field(pattern=f"^{DEVICE_ID_PATTERN.pattern}$", description="unique device id")
    city: str = Field(pattern=f"^{CITY_PATTERN.pattern}$", description="city slug, e.g. ha-noi")
    domain: str = Field(description=f"one of {', '.join(DOMAINS)}")
    name: str | None = Field(default=None, max_length=200)
    district: str | None = Field(default=None, max_length=100)
    location: Location
    thresholds: Thresholds = Field(
        default_factory=dict,
        description="per-metric alarm rules overriding the domain's defaults key by key: limits"
        " (warn_above, crit_above, warn_below, crit_below) and hysteresis, rate of change (rise_above,"
        " drop_above within rate_window_s), zscore and zscore_floor, flatline_s; null switches that"
        " detector off for the metric",
    )

    @model_validator(mode="after")
    def _check_domain_and_thresholds(self) -> Self:
        domain = DOMAINS.get(self.domain)
        if domain is None:
            raise ValueError(f"domain must be one of {', '.join(DOMAINS)}")
        for metric_name, limits in self.thresholds.items():
            metric = domain.metric(metric_name)
            if metric is None:
                raise ValueError(f"thresholds name {metric_name!r}, not a {domain.name} metric")
            for key, value in limits.items():
                problem = rule_value_problem(key, value)
                if problem is not None:
                    raise ValueError(f"thresholds.{metric_name}.{key} {problem}")
        return self


class LatestReading(BaseModel):
    ts: datetime
    metrics: dict[str, float]


class Device(BaseModel):
    """A registered device with its status and latest reading."""

    id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    location: Location
    thresholds: dict[str, dict[str, float | None]]
    status: DeviceStatus
    last_seen: datetime | None
    latest: LatestReading | None
    created_at: datetime
    areas: list[str] = Field(
        default_factory=list, description="ids of the areas (`/v1/areas`) the device lies in"
    )


class StateItem(BaseModel):
    """The latest reading of one device, as operations-center screens poll it."""

    device_id: str
    city: str
    domain: str
    status: DeviceStatus
    ts: datetime | None
    metrics: dict[str, float]
    location: Location
    areas: list[str] = Field(default_factory=list, description="ids of the areas the device lies in")


@dataclass(frozen=True, slots=True)
class DeviceRoute:
    """What the gateway needs to know to accept a device's telemetry. The gateway holds one per
    registered device: a slotted dataclass is a tenth of a pydantic model's size."""

    id: str
    city: str
    domain: str


class DeviceCredentials(BaseModel):
    """A device's MQTT username and password, and the client id its account is bound to. The
    password is shown once and never stored by us."""

    username: str = Field(examples=["hn-flood-001"])
    password: str = Field(description="keep it now: it cannot be read back, only replaced")
    client_id: str = Field(
        examples=["hn-flood-001"],
        description="the MQTT client id the device must connect with (its id); the broker refuses"
        " these credentials under any other",
    )


class RegisteredDevice(Device):
    """The answer to a registration: the device and, where the broker enforces device
    credentials, the device's MQTT credentials."""

    credentials: DeviceCredentials | None = Field(
        default=None,
        description="present only in this answer, and only where the broker enforces device credentials;"
        " the device connects with them and may publish only under ioc/v1/{city}/{domain}/{id}/",
    )


class DevicePatch(BaseModel):
    """Changes to a registered device. Fields given replace the stored ones (`thresholds` as a
    whole; `{}` returns to the domain's defaults); `name` and `district` may be null to clear them.
    A device's id, city and domain are fixed: they are in its topics and its credentials."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "Trạm đo mực nước Phan Đình Phùng (mới)",
                    "location": {"lat": 21.0402, "lon": 105.8411},
                },
                {"thresholds": {"currentLevel": {"warn_above": 2.8, "crit_above": 4.2}}},
            ]
        },
    )

    name: str | None = Field(default=None, max_length=200)
    district: str | None = Field(default=None, max_length=100)
    location: Location | None = None
    thresholds: Thresholds | None = None

    @model_validator(mode="after")
    def _check_required_fields_not_cleared(self) -> Self:
        for name in ("location", "thresholds"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


def city_list(value: list[str] | None) -> list[str] | None:
    """The cities of a scope or filter: slugs, sorted, each once; None (every city) stays None."""
    for city in value or ():
        if not CITY_PATTERN.fullmatch(city):
            raise ValueError(f"{city!r} is not a city slug ([a-z0-9-]{{1,32}})")
    return sorted(set(value)) if value is not None else None


def domain_list(value: list[str] | None) -> list[str] | None:
    """The domains of a scope or filter: known names, sorted, each once; None stays None."""
    for domain in value or ():
        if domain not in DOMAINS:
            raise ValueError(f"{domain!r} is not a domain; known: {', '.join(DOMAINS)}")
    return sorted(set(value)) if value is not None else None


# A scope's or filter's cities and domains, checked and in one order (None: every one).
CityList = Annotated[list[str] | None, AfterValidator(city_list)]
DomainList = Annotated[list[str] | None, AfterValidator(domain_list)]
