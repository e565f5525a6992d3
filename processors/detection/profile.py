"""What detection knows about a device: where it is and the rules that apply to each of its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ioc_core.alarms import area_subject, district_subject
from ioc_core.domains import get_domain
from ioc_core.places import place_label
from ioc_core.rules import MetricRules, rules_for


@dataclass(frozen=True, slots=True)
class FloodZone:
    """Where a flood station is correlated with its neighbours: the catchment containing it, else
    its ward (an area), else the `district` it was registered with."""

    subject: str  # the zone's alarm subject: area:{id}, or district:{city}:{district}
    area_id: str | None
    name_vi: str
    name_en: str


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    # The domain's defaults overridden by the device's own settings, by metric name.
    rules: Mapping[str, MetricRules]
    # A flood station's correlation zone; None for other devices and stations in no zone.
    zone: FloodZone | None = None

    @classmethod
    def of(
        cls,
        *,
        id: str,
        city: str,
        domain: str,
        name: str | None,
        district: str | None,
        thresholds: Mapping[str, Mapping[str, float | None]],
        zone_area: str | None = None,
        zone_name_vi: str | None = None,
        zone_name_en: str | None = None,
    ) -> DeviceProfile:
        """A device as registered; a domain this version does not know leaves it without rules.
        `zone_area` is the area a flood station is correlated in (see `FloodZone`)."""
        known = get_domain(domain)
        if known is None:
            rules: Mapping[str, MetricRules] = {}
        elif not thresholds:
            rules = _defaults_of(domain)
        else:
            rules = rules_for(known, thresholds)
        zone: FloodZone | None = None
        if domain == _FLOOD_DOMAIN and zone_area is not None:
            name_vi = zone_name_vi or zone_area
            zone = FloodZone(area_subject(zone_area), zone_area, name_vi, zone_name_en or name_vi)
        elif domain == _FLOOD_DOMAIN and district:
            zone = FloodZone(district_subject(city, district), None, district, district)
        return cls(id=id, city=city, domain=domain, name=name, district=district, rules=rules, zone=zone)

    @property
    def place(self) -> str:
        return place_label(name=self.name, fallback=self.id, district=self.district, city=self.city)


_FLOOD_DOMAIN = "flood"

# The rules of a device without thresholds of its own are its domain's, one read-only mapping
# shared by all such devices: a processor owning 100,000 devices holds five, not 100,000.
_DOMAIN_DEFAULTS: dict[str, Mapping[str, MetricRules]] = {}


def _defaults_of(domain: str) -> Mapping[str, MetricRules]:
    rules = _DOMAIN_DEFAULTS.get(domain)
    if rules is None:
        known = get_domain(domain)
        assert known is not None
        rules = _DOMAIN_DEFAULTS[domain] = MappingProxyType(rules_for(known, {}))
    return rules
