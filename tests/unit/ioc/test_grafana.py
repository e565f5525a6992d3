"""The Grafana dashboards in deploy/ are what the generator makes from the domain modules."""

from __future__ import annotations

import json

from ioc.grafana import DASHBOARDS_DIR, dashboards, render
from ioc_core.domains import DOMAINS


def test_the_dashboards_in_the_repository_are_the_generated_ones() -> None:
    # After a change to a domain or to the generator: python -m ioc.grafana
    generated = dashboards()
    assert sorted(p.name for p in DASHBOARDS_DIR.glob("*.json")) == sorted(generated)
    for name, dashboard in generated.items():
        assert (DASHBOARDS_DIR / name).read_text(encoding="utf-8") == render(dashboard), name


def test_every_domain_has_its_panels() -> None:
    overview, device = dashboards()["city-overview.json"], dashboards()["device-series.json"]
    sql = json.dumps(overview)
    for domain in DOMAINS.values():
        assert f"FROM {domain.table}_1h r" in sql
        assert f"FROM {domain.table}_1m r" in json.dumps(device)
    ids = [panel["id"] for panel in overview["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in device["templating"]["list"]] == ["city", "domain", "device"]
