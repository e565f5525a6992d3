"""What detection knows about a device: where it is and the rules that apply to each of its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ioc_core.domains import get_domain
from ioc_core.places import place_label
from ioc_core.rules import MetricRules, rules_for


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    id: str
    city: str
    domain: str
    name: str | None
    district: str | None
    # The domain's defaults overridden by the device's own settings, by metric name.
    rules: Mapping[str, MetricRules]

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
    ) -> DeviceProfile:
        """A device as registered; a domain this version does not know leaves it without rules."""
        known = get_domain(domain)
        if known is None:
            rules: Mapping[str, MetricRules] = {}
        elif not thresholds:
            rules = _defaults_of(domain)
        else:
            rules = rules_for(known, thresholds)
        return cls(id=id, city=city, domain=domain, name=name, district=district, rules=rules)

    @property
    def place(self) -> str:
        return place_label(name=self.name, fallback=self.id, district=self.district, city=self.city)


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
