"""`ioc detect --rules RULES.json --device ID`: a proposed rule set back-tested on a device's stored
history before it is saved. The device's readings of the last days are replayed through the
processor's detectors twice, with the rules in force and with the proposed ones, and the alarms
each would have raised are counted and listed.

The proposed rules are judged as the device's override (`PUT /v1/rules?device=ID` with the same
body): laid over everything else in force for it, replacing an override it already has. Each
reading is one batch, with the detector state round-tripped through its stored JSON between
readings as the processor's database holds it (see `processors.replay`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from ioc_core.alarms import Finding
from ioc_core.domains import Domain, get_domain
from ioc_core.errors import NotFoundError, ValidationError
from ioc_core.models import Thresholds
from ioc_core.rules import DEVICE_SOURCE, RuleLayer, device_layers, layered_rules, settings_problems
from ioc_core.settings import Settings
from ioc_core.storage import Database, DeviceProfileRow
from ioc_core.storage.rules import StoredReading
from ioc_core.telemetry import Reading
from processors.detection import DeviceDetection, DeviceDetectorState, DeviceProfile

_THRESHOLDS = TypeAdapter(Thresholds)
# As far back as one replay reaches: a year of a device's readings is at most a few hundred
# thousand rows in memory.
_MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class RaisedAlarm:
    at: datetime
    rule: str
    metric: str | None
    severity: str | None
    value: float | None
    threshold: float | None

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True, slots=True)
class BacktestResult:
    device_id: str
    domain: str
    start: datetime
    end: datetime
    readings: int
    current: list[RaisedAlarm]
    proposed: list[RaisedAlarm]

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "domain": self.domain,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "readings": self.readings,
            "current": {"alarms": len(self.current), "raised": [a.as_dict() for a in self.current]},
            "proposed": {"alarms": len(self.proposed), "raised": [a.as_dict() for a in self.proposed]},
        }


def read_rules(path: Path, domain: Domain) -> dict[str, dict[str, float | None]]:
    """The proposed rules in `path`, checked as `PUT /v1/rules` checks them."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"{path} is not JSON: {exc}") from None
    try:
        parsed = _THRESHOLDS.validate_python(document)
    except PydanticValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValidationError(f"{path}: {where or 'the document'}: {first['msg']}") from None
    rules = {metric: {str(key): value for key, value in keys.items()} for metric, keys in parsed.items()}
    problems = settings_problems(domain, rules, name="rules")
    if problems:
        raise ValidationError(f"{path}: {problems[0][1]}")
    if not rules:
        raise ValidationError(f"{path}: the rules name no metric")
    return rules


def _profiles(
    row: DeviceProfileRow, domain: Domain, proposed: Mapping[str, Mapping[str, float | None]]
) -> tuple[DeviceProfile, DeviceProfile]:
    """The device as the processor judges it now, and as it would with `proposed` as its override."""
    current = DeviceProfile.of(
        id=row.id,
        city=row.city,
        domain=row.domain,
        name=row.name,
        district=row.district,
        thresholds=row.thresholds,
        overrides=row.rule_layers,
    )
    others = [layer for layer in row.rule_layers if layer.source != DEVICE_SOURCE]
    layers = [*device_layers(others, row.thresholds), RuleLayer(DEVICE_SOURCE, proposed)]
    return current, dataclasses.replace(current, rules=layered_rules(domain, layers))


def replay_history(profile: DeviceProfile, history: Sequence[StoredReading]) -> list[RaisedAlarm]:
    """The new alarms `profile`'s rules raise over `history` (repeats of an open one not counted)."""
    detection = DeviceDetection()
    stored = orjson.dumps(DeviceDetectorState().to_json())
    raised: list[RaisedAlarm] = []
    for seq, item in enumerate(history):
        state = DeviceDetectorState.from_json(orjson.loads(stored))
        open_before = state.open_alarm_keys
        reading = Reading(
            device_id=profile.id,
            city=profile.city,
            domain=profile.domain,
            ts=item.ts,
            seq=seq,
            metrics=item.metrics,
            received_at=item.ts,
        )
        findings: list[Finding] = detection.evaluate(profile, [reading], state)
        stored = orjson.dumps(state.to_json())
        raised.extend(
            RaisedAlarm(f.at, f.rule, f.metric, f.severity, f.value, f.threshold)
            for f in findings
            if f.active and f.key[1] not in open_before
        )
    return raised


async def backtest(
    settings: Settings, device_id: str, rules_path: Path, *, days: float, now: datetime | None = None
) -> BacktestResult:
    if not 0 < days <= _MAX_DAYS:
        raise ValidationError(f"--days must be more than 0 and at most {_MAX_DAYS}, not {days:g}")
    end = now or datetime.now(tz=UTC)
    start = end - timedelta(days=days)
    async with Database(settings.database_url.get_secret_value(), max_size=2) as database:
        rows = await database.devices.profiles([device_id])
        if not rows:
            raise NotFoundError(f"device {device_id!r} not found")
        row = rows[0]
        domain = get_domain(row.domain)
        if domain is None:
            raise ValidationError(f"device {device_id!r} is of a domain this version does not know")
        proposed = read_rules(rules_path, domain)
        history = await database.rules.device_history(device_id, row.domain, start, end)
    current, candidate = _profiles(row, domain, proposed)
    return BacktestResult(
        device_id=device_id,
        domain=row.domain,
        start=start,
        end=end,
        readings=len(history),
        current=replay_history(current, history),
        proposed=replay_history(candidate, history),
    )


def report_lines(result: BacktestResult) -> list[str]:
    lines = [
        f"device {result.device_id} ({result.domain}): {result.readings} readings from"
        f" {result.start.isoformat(timespec='seconds')} to {result.end.isoformat(timespec='seconds')}"
    ]
    for name, raised in (("current", result.current), ("proposed", result.proposed)):
        lines.append(f"{name} rules: {len(raised)} alarms")
        lines.extend(
            f"  {a.at.isoformat(timespec='seconds')}  {a.rule}  {a.severity}  value {a.value}"
            + (f"  limit {a.threshold}" if a.threshold is not None else "")
            for a in raised
        )
    return lines
