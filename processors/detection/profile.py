"""What detection knows about a device: where it is and the rules that apply to each of its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ioc_core.domains import get_domain
from ioc_core.places import place_label
from ioc_core.rules import MetricRules, rules_for


@dataclass(frozen=True)
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
        rules = rules_for(known, thresholds) if known is not None else {}
        return cls(id=id, city=city, domain=domain, name=name, district=district, rules=rules)

    @property
    def place(self) -> str:
        return place_label(name=self.name, fallback=self.id, district=self.district, city=self.city)
