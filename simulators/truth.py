"""The ground truth of a scenario run: every incident it injected, and what the system should make
of it, written as JSON Lines (one incident per line; a `normal` run writes an empty file).

An incident is one of:

- `expected: "alarm"`: the alarms in `expected_rules` (each at least `expected_severity`) on the
  subject (`device_id`; for a zone's flood alarm `area`, the catchment or ward, or `district` for a
  city whose areas are not stored), raised within `detect_within_s`
  seconds of `started_at`; `allowed_rules` are side effects that may be raised on the same subject
  (a level rising fast enough for its rate rule, say) and are not false alarms;
- `expected: "dead_letter"`: `count` messages on `topic` rejected with reason code `reason`;
- `expected: "stored_once"`: a message sent twice, stored as one reading at `ts`;
- `expected: "stored_late"`: a reading older than the device's latest, stored at `ts` but raising
  nothing (`expected_rules` is empty) and not moving the latest state backwards.

Times are RFC 3339 in UTC, on the clock the readings carry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from ioc_core.alarms import area_subject, district_subject

Expected = Literal["alarm", "dead_letter", "stored_once", "stored_late"]


@dataclass
class Incident:
    scenario: str
    kind: str
    city: str
    domain: str
    expected: Expected
    started_at: datetime
    device_id: str | None = None
    district: str | None = None
    area: str | None = None
    metric: str | None = None
    expected_rules: list[str] = field(default_factory=list)
    expected_severity: str | None = None
    allowed_rules: list[str] = field(default_factory=list)
    reason: str | None = None
    topic: str | None = None
    count: int | None = None
    ts: str | None = None
    seq: int | None = None
    ended_at: datetime | None = None
    detect_within_s: float | None = None
    detail: str = ""

    @property
    def subject(self) -> str:
        """The subject of the alarm expected: the device, else the zone."""
        if self.device_id is not None:
            return self.device_id
        if self.area is not None:
            return area_subject(self.area)
        return district_subject(self.city, self.district or "")

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["started_at"] = self.started_at.isoformat()
        body["ended_at"] = self.ended_at.isoformat() if self.ended_at is not None else None
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Incident:
        values = dict(body)
        values["started_at"] = datetime.fromisoformat(values["started_at"])
        if values.get("ended_at"):
            values["ended_at"] = datetime.fromisoformat(values["ended_at"])
        return cls(**values)


def write_truth(path: Path, incidents: Iterable[Incident]) -> None:
    """Write the incidents to `path` (replacing it) in one go, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for incident in sorted(incidents, key=lambda i: (i.started_at, i.kind, i.device_id or "")):
            out.write(json.dumps(incident.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")
    partial.replace(path)


def read_truth(path: Path) -> list[Incident]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Incident.from_json(json.loads(line)) for line in lines if line.strip()]
