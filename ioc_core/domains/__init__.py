"""The registry of domains. Each domain is one module of this package that defines `DOMAIN`;
adding a domain means adding its module, nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from ioc_core.domains.base import BATTERY, Domain, Metric
from ioc_core.rules import MetricRules

__all__ = ["BATTERY", "DOMAINS", "Domain", "Metric", "MetricRules", "get_domain"]


# Modules of this package that say what a domain is, rather than being one.
_NOT_DOMAINS = frozenset({"base", "units"})


def _discover() -> dict[str, Domain]:
    found: dict[str, Domain] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name in _NOT_DOMAINS:
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        domain = getattr(module, "DOMAIN", None)
        if not isinstance(domain, Domain):
            raise TypeError(f"domain module {module.__name__} must define DOMAIN = Domain(...)")
        if domain.name != module_info.name:
            raise ValueError(f"module {module.__name__} defines domain {domain.name!r}; names must match")
        found[domain.name] = domain
    return found


DOMAINS: dict[str, Domain] = _discover()


def get_domain(name: str) -> Domain | None:
    return DOMAINS.get(name)
