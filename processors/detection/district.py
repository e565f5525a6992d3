"""Flood correlation by zone: rain and rising water at several stations of one zone at once.

A station's zone is the drainage catchment (lưu vực) that contains it, else its ward, else the
`district` it was registered with (`profile.FloodZone`): water gathers by catchment, so stations of
one catchment flooding together is one event, whichever wards they stand in. A zone's stations are
spread over bus partitions, so possibly over processors. Each processor therefore derives a small
signal per station from that station's detector state and stores it with its zone; the zone's
signals are read back together and judged here, giving one alarm per zone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ioc_core.alarms import DISTRICT_FLOOD_RULE, Finding
from ioc_core.domains import get_domain
from ioc_core.rules import DistrictCorrelation
from processors.detection.messages import zone_flood_texts
from processors.detection.profile import DeviceProfile, FloodZone
from processors.detection.state import DeviceDetectorState, MetricState, epoch_ms

DISTRICT_FLOOD_SEVERITY = "high"
DISTRICT_FLOOD_CRIT_SEVERITY = "critical"
LEVEL_WARN_SEVERITY = "medium"
_FLOOD_DOMAIN = "flood"


@dataclass(frozen=True, slots=True)
class StationSignal:
    """One station's part in its zone's flood picture, as of its newest reading."""

    device_id: str
    at: datetime
    raining: bool
    rising: bool
    level: float | None
    level_severity: str | None
    name: str | None = None
    rainfall: float | None = None

    @property
    def qualifies(self) -> bool:
        return self.raining and self.rising

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "at": self.at.isoformat(),
            "raining": self.raining,
            "rising": self.rising,
            "level": self.level,
            "level_severity": self.level_severity,
            "name": self.name,
            "rainfall": self.rainfall,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> StationSignal:
        """Raises ValueError when the station or the instant is missing or unreadable; optional parts
        that are missing read as absent."""
        try:
            device_id = body["device_id"]
            at = datetime.fromisoformat(body["at"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a station signal: {exc}") from exc
        if not isinstance(device_id, str) or at.tzinfo is None:
            raise ValueError("a station signal needs a device_id and an instant with a UTC offset")
        level, rainfall = body.get("level"), body.get("rainfall")
        severity, name = body.get("level_severity"), body.get("name")
        return cls(
            device_id=device_id,
            at=at,
            raining=body.get("raining") is True,
            rising=body.get("rising") is True,
            level=float(level) if isinstance(level, int | float) and not isinstance(level, bool) else None,
            level_severity=severity if isinstance(severity, str) else None,
            name=name if isinstance(name, str) else None,
            rainfall=(
                float(rainfall)
                if isinstance(rainfall, int | float) and not isinstance(rainfall, bool)
                else None
            ),
        )


class DistrictFloodCorrelator:
    """Judges a zone from its stations' signals. Pure: the caller stores and gathers the signals."""

    def __init__(self, correlation: DistrictCorrelation | None = None) -> None:
        if correlation is None:
            flood = get_domain(_FLOOD_DOMAIN)
            correlation = flood.correlation if flood is not None else None
        if correlation is None:
            raise ValueError("the flood domain declares no district correlation")
        self.correlation = correlation

    def station_signal(self, profile: DeviceProfile, state: DeviceDetectorState) -> StationSignal | None:
        """The station's signal as of its newest reading; None for a device that is not a flood
        station of some zone, or has not reported yet."""
        if profile.domain != _FLOOD_DOMAIN or profile.zone is None or state.last_ts is None:
            return None
        correlation = self.correlation
        newest_ms = epoch_ms(state.last_ts)
        fresh_ms = round(correlation.fresh_s * 1000)
        rainfall = _recent(state.metrics.get(correlation.rain_metric), newest_ms, fresh_ms)
        level_state = state.metrics.get(correlation.level_metric)
        level = _recent(level_state, newest_ms, fresh_ms)
        rules = profile.rules.get(correlation.level_metric)
        level_severity: str | None = None
        rising = False
        if level is not None and level_state is not None and level_state.last_at_ms is not None:
            if rules is not None and rules.crit_above is not None and level > rules.crit_above:
                level_severity = DISTRICT_FLOOD_CRIT_SEVERITY
            elif rules is not None and rules.warn_above is not None and level > rules.warn_above:
                level_severity = LEVEL_WARN_SEVERITY
            since = level_state.last_at_ms - round(correlation.window_s * 1000)
            earlier = [value for at_ms, value in level_state.history if at_ms >= since]
            risen = bool(earlier) and level - min(earlier) >= correlation.rise_at_least
            rising = risen or level_severity is not None
        return StationSignal(
            device_id=profile.id,
            at=state.last_ts,
            raining=rainfall is not None and rainfall >= correlation.rain_at_least,
            rising=rising,
            level=level,
            level_severity=level_severity,
            name=profile.name,
            rainfall=rainfall,
        )

    def evaluate(
        self,
        *,
        city: str,
        zone: FloodZone,
        signals: Sequence[StationSignal],
        active: bool,
        now: datetime,
        station_areas: Mapping[str, Sequence[str]] | None = None,
    ) -> Finding | None:
        """An active finding while enough fresh stations qualify (a repeat when `active` already);
        an inactive one once none does and the zone's alarm is `active`; otherwise None.
        `station_areas` gives the areas each station lies in: an active finding concerns the zone's
        area and those of its qualifying stations (a ward office sees its catchment's alarm)."""
        correlation = self.correlation
        oldest = now - timedelta(seconds=correlation.fresh_s)
        newest_by_station: dict[str, StationSignal] = {}
        for signal in signals:
            if signal.at < oldest:
                continue
            known = newest_by_station.get(signal.device_id)
            if known is None or signal.at > known.at:
                newest_by_station[signal.device_id] = signal
        fresh = sorted(newest_by_station.values(), key=lambda signal: signal.device_id)
        qualifying = [signal for signal in fresh if signal.qualifies]
        if len(qualifying) >= correlation.min_stations:
            critical = any(signal.level_severity == DISTRICT_FLOOD_CRIT_SEVERITY for signal in fresh)
            names = [signal.name or signal.device_id for signal in qualifying]
            areas = {zone.area_id} if zone.area_id is not None else set()
            for signal in qualifying:
                areas.update((station_areas or {}).get(signal.device_id, ()))
            return self._finding(
                city=city,
                zone=zone,
                active=True,
                severity=DISTRICT_FLOOD_CRIT_SEVERITY if critical else DISTRICT_FLOOD_SEVERITY,
                value=float(len(qualifying)),
                repeats=1,
                at=max(signal.at for signal in qualifying),
                texts=zone_flood_texts(zone.name_vi, zone.name_en, city, names, active=True),
                areas=tuple(sorted(areas)),
            )
        if active and not qualifying:
            return self.passed(zone, city=city, at=max((signal.at for signal in fresh), default=now))
        return None

    def passed(self, zone: FloodZone, *, city: str, at: datetime) -> Finding:
        """The inactive finding that resolves the zone's open alarm."""
        return self._finding(
            city=city,
            zone=zone,
            active=False,
            severity=None,
            value=0.0,
            repeats=0,
            at=at,
            texts=zone_flood_texts(zone.name_vi, zone.name_en, city, [], active=False),
            areas=(),
        )

    def _finding(
        self,
        *,
        city: str,
        zone: FloodZone,
        active: bool,
        severity: str | None,
        value: float,
        repeats: int,
        at: datetime,
        texts: tuple[str, str],
        areas: tuple[str, ...],
    ) -> Finding:
        return Finding(
            subject=zone.subject,
            device_id=None,
            city=city,
            domain=_FLOOD_DOMAIN,
            # Deprecated alias, read for one more release: the zone's name.
            district=zone.name_vi,
            rule=DISTRICT_FLOOD_RULE,
            metric=None,
            active=active,
            severity=severity,
            value=value,
            threshold=float(self.correlation.min_stations),
            repeats=repeats,
            at=at,
            message_vi=texts[0],
            message_en=texts[1],
            areas=areas,
        )


def _recent(metric: MetricState | None, newest_ms: int, fresh_ms: int) -> float | None:
    """The metric's latest value, unless the device has reported without it for too long."""
    if metric is None or metric.last is None or metric.last_at_ms is None:
        return None
    return metric.last if newest_ms - metric.last_at_ms <= fresh_ms else None
