"""What detection knows about a device: where it is and the rules that apply to each of its metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import orjson

from ioc_core.alarms import area_subject, district_subject
from ioc_core.domains import get_domain
from ioc_core.domains.base import Domain
from ioc_core.places import place_label
from ioc_core.rules import MetricRules, RuleLayer, device_layers, layered_rules, rules_for


@dataclass(frozen=True, slots=True)
class FloodZone:
    """Where a flood station is correlated with its neighbours: the catchment containing it, else
    its ward (an area), else the `district` it was registered with."""

    subject: str  # the zone's alarm subject: area:{id}, or district:{city}:{district}
    area_id: str | None
    name_vi: str
    name_en: str

    @classmethod
    def of_district(cls, city: str, district: str) -> FloodZone:
        """The zone of a station in no catchment or ward: the district it was registered with."""
        return cls(district_subject(city, district), None, district, district)


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
        overrides: Sequence[RuleLayer] = (),
    ) -> DeviceProfile:
        """A device as registered; a domain this version does not know leaves it without rules.
        `zone_area` is the area a flood station is correlated in (see `FloodZone`); `overrides`
        are the rule overrides that apply to it, in order (see `ioc_core.rules.device_layers`)."""
        known = get_domain(domain)
        if known is None:
            rules: Mapping[str, MetricRules] = {}
        elif not thresholds and not overrides:
            rules = _defaults_of(domain)
        elif not overrides:
            rules = rules_for(known, thresholds)
        else:
            rules = _layered(known, device_layers(overrides, thresholds))
        zone: FloodZone | None = None
        if domain == _FLOOD_DOMAIN and zone_area is not None:
            name_vi = zone_name_vi or zone_area
            zone = FloodZone(area_subject(zone_area), zone_area, name_vi, zone_name_en or name_vi)
        elif domain == _FLOOD_DOMAIN and district:
            zone = FloodZone.of_district(city, district)
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


# Devices that share their overrides (a city's or an area's, with no settings of their own) share
# one read-only rules mapping, as devices without any share their domain's: a city override
# applied to 100,000 devices is one mapping, and detection plans it once (it keys its plans by
# the mapping). Bounded: profiles are read again after every rules change, and old combinations
# are dropped when the cache is full.
_SHARED_RULES: dict[bytes, Mapping[str, MetricRules]] = {}
_SHARED_RULES_KEPT = 4096


def _layered(domain: Domain, layers: Sequence[RuleLayer]) -> Mapping[str, MetricRules]:
    if any(layer.is_device_own for layer in layers):
        return layered_rules(domain, layers)
    key = orjson.dumps(
        [domain.name, [[layer.source, layer.settings] for layer in layers]], option=orjson.OPT_SORT_KEYS
    )
    rules = _SHARED_RULES.get(key)
    if rules is None:
        if len(_SHARED_RULES) >= _SHARED_RULES_KEPT:
            _SHARED_RULES.clear()
        rules = _SHARED_RULES[key] = MappingProxyType(layered_rules(domain, layers))
    return rules
