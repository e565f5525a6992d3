"""Maintenance windows: planned outages of a device, an area, a city's domain or a whole city, one-off
or recurring (an RFC 5545 RRULE). Inside a window alarms are recorded but `suppressed` (no webhook,
no escalation, not in the screens' open-alarm figures) and silence raises no offline alarm; when the
window ends, what persists raises normally.

This module is pure: the request and answer shapes, and the expansion of a window into its
occurrences (`occurrences`), which the store keeps so that the processor answers "is this device
inside a window at t" in SQL. A rule must be bounded (COUNT or UNTIL), have at most
`MAX_OCCURRENCES` occurrences and none starting later than `MAX_HORIZON` after the first, and a
window may last at most `MAX_DURATION`: anything else is refused (422), not truncated.
"""

from __future__ import annotations

import itertools
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from dateutil.rrule import rrule, rrulestr
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from ioc_core.areas import AREA_ID_PATTERN
from ioc_core.domains import DOMAINS
from ioc_core.errors import ValidationError

MAX_OCCURRENCES = 1000
MAX_HORIZON = timedelta(days=5 * 366)
MAX_DURATION = timedelta(days=366)
# What a window's times may be: sane years, far from where time arithmetic overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
ALLOWED_FREQUENCIES = ("DAILY", "WEEKLY", "MONTHLY", "YEARLY")
# A rule whose parts never match (FREQ=DAILY;INTERVAL=7;BYDAY=MO from a Tuesday) makes the
# expansion search to the year 9999, seconds of CPU: callers expand in a thread and give up, with
# a 422, after this long.
EXPANSION_TIMEOUT_S = 2.0

WindowTarget = Literal["device", "area", "domain", "city"]

_CITY = r"^[a-z0-9-]{1,32}$"
_DEVICE_ID = r"^[A-Za-z0-9_.-]{1,64}$"
_WINDOW_ID = re.compile(r"mw_[0-9a-f]{16}")
WINDOW_ID_PATTERN = _WINDOW_ID
# One RRULE value (with or without its `RRULE:` name); DTSTART comes from `start`, and other
# iCalendar lines (RDATE, EXDATE) are not taken.
_RRULE_TEXT = re.compile(r"(?i)^(RRULE:)?[A-Z0-9=;,:+\-]{1,500}$")

CityName = Annotated[str, StringConstraints(pattern=_CITY)]
DeviceId = Annotated[str, StringConstraints(pattern=_DEVICE_ID)]
AreaId = Annotated[str, StringConstraints(pattern=f"^{AREA_ID_PATTERN.pattern}$")]


def _known_domain(value: str) -> str:
    if value not in DOMAINS:
        raise ValueError(f"{value!r} is not a domain; known: {', '.join(DOMAINS)}")
    return value


DomainName = Annotated[str, AfterValidator(_known_domain)]


def new_window_id() -> str:
    return "mw_" + secrets.token_hex(8)


class WindowTiming(BaseModel):
    """When a window applies: `start`/`end` of the whole one-off window or of the first occurrence
    of a recurring one."""

    start: AwareDatetime
    end: AwareDatetime
    rrule: str | None = Field(
        default=None,
        max_length=500,
        description="RFC 5545 RRULE value (e.g. `FREQ=WEEKLY;BYDAY=SA;COUNT=4`); each occurrence starts"
        " at a time the rule gives, counted from `start`, and lasts `end - start`. It must end: COUNT"
        f" or UNTIL, at most {MAX_OCCURRENCES} occurrences, none later than five years after `start`",
    )


class WindowIn(WindowTiming):
    """A new window: exactly one target (`device_id`, `area`, `domain` with `city`, or `city`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "area": "hp-feeder-07",
                    "start": "2026-12-13T22:00:00+07:00",
                    "end": "2026-12-14T04:00:00+07:00",
                    "rrule": "FREQ=WEEKLY;BYDAY=SA;COUNT=4",
                    "reason": "Bảo trì trạm biến áp / substation maintenance",
                }
            ]
        },
    )

    device_id: DeviceId | None = None
    area: AreaId | None = None
    domain: DomainName | None = Field(default=None, description="with `city`: that city's devices of it")
    city: CityName | None = None
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one_target(self) -> WindowIn:
        self.target  # noqa: B018 - raises when the target is ambiguous
        return self

    @property
    def target(self) -> WindowTarget:
        named = [
            name
            for name, value in (("device_id", self.device_id), ("area", self.area), ("city", self.city))
            if value is not None
        ]
        if self.domain is not None and self.city is None:
            raise ValueError("`domain` needs `city`: a window covers one city's devices of a domain")
        if len(named) != 1:
            raise ValueError("name exactly one target: `device_id`, `area`, `domain` with `city`, or `city`")
        if named[0] == "device_id":
            return "device"
        if named[0] == "area":
            return "area"
        return "domain" if self.domain is not None else "city"


class WindowPatch(BaseModel):
    """A change: the times (re-checked together), the rule (null removes it) or the reason. The
    target cannot change: make a new window."""

    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    rrule: str | None = Field(default=None, max_length=500)
    reason: str | None = Field(default=None, min_length=1, max_length=500)


class MaintenanceWindow(BaseModel):
    id: str
    target: WindowTarget
    device_id: str | None
    area: str | None
    domain: str | None
    city: str | None
    start: datetime
    end: datetime
    rrule: str | None
    reason: str
    owner: str | None = Field(description="the name of the API key that made it")
    occurrences: int = Field(
        description="how many times the window applies (an occurrence a change cut short counts too)"
    )
    last_end: datetime = Field(description="when its last occurrence ends")
    active: bool = Field(description="true while one of its occurrences is under way")
    created_at: datetime
    updated_at: datetime


def normalised_rule(text: str) -> str:
    """The RRULE value without its `RRULE:` name, upper-cased."""
    if not _RRULE_TEXT.fullmatch(text):
        raise ValidationError("`rrule` must be one RFC 5545 RRULE value, like FREQ=DAILY;COUNT=5")
    return text.upper().removeprefix("RRULE:")


def occurrences(start: datetime, end: datetime, rule_text: str | None) -> list[tuple[datetime, datetime]]:
    """The (start, end) of each occurrence of a window, first first. Raises `ValidationError` for an
    end not after the start, an over-long window, or a rule that is invalid or unbounded or yields
    too many occurrences or any too far ahead."""
    try:
        return _occurrences(start, end, rule_text)
    except OverflowError as exc:
        # Near the ends of the calendar (year 1 or 9999) the rule's horizon is out of reach.
        raise ValidationError("the window lies too close to the ends of the calendar") from exc


def _occurrences(start: datetime, end: datetime, rule_text: str | None) -> list[tuple[datetime, datetime]]:
    if start.astimezone(UTC) < EARLIEST or end.astimezone(UTC) > LATEST:
        raise ValidationError(f"a window lies between {EARLIEST.year} and {LATEST.year}")
    if end <= start:
        raise ValidationError("`end` must be after `start`")
    duration = end - start
    if duration > MAX_DURATION:
        raise ValidationError(f"a window may last at most {MAX_DURATION.days} days")
    if rule_text is None:
        return [(start, end)]
    value = normalised_rule(rule_text)
    parts = {part.partition("=")[0] for part in value.split(";")}
    if "DTSTART" in parts:
        raise ValidationError("`rrule` takes no DTSTART: the window's `start` is its first occurrence")
    if not parts & {"COUNT", "UNTIL"}:
        raise ValidationError("`rrule` must end: give COUNT or UNTIL")
    frequency = dict(part.partition("=")[::2] for part in value.split(";")).get("FREQ")
    if frequency not in ALLOWED_FREQUENCIES:
        # A window repeating within the hour is no planned outage; and the finer the frequency,
        # the longer a rule that never matches takes to prove so (see EXPANSION_TIMEOUT_S).
        raise ValidationError(f"`rrule` FREQ must be one of {', '.join(ALLOWED_FREQUENCIES)}")
    try:
        rule = rrulestr(value, dtstart=start)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValidationError(f"`rrule` is not a valid RFC 5545 rule: {exc}") from exc
    if not isinstance(rule, rrule):
        raise ValidationError("`rrule` must be one RFC 5545 RRULE value")
    horizon = start + MAX_HORIZON
    offset = start - start.replace(microsecond=0)
    # RFC 5545: DTSTART is always the first occurrence, whether or not the rule matches it.
    starts = [start]
    try:
        for at in itertools.islice(rule, MAX_OCCURRENCES + 1):
            if at > horizon:
                raise ValidationError("`rrule` reaches more than five years past `start`")
            # The rule counts in whole seconds (dateutil drops DTSTART's microseconds).
            at += offset
            if at != start:
                starts.append(at)
    except (ValueError, OverflowError) as exc:
        raise ValidationError(f"`rrule` cannot be expanded: {exc}") from exc
    if len(starts) == 1:
        raise ValidationError("`rrule` repeats nothing after `start`; leave it out for a one-off window")
    if len(starts) > MAX_OCCURRENCES:
        raise ValidationError(f"`rrule` gives more than {MAX_OCCURRENCES} occurrences")
    starts.sort()
    return [(at, at + duration) for at in starts]
