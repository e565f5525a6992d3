"""Grafana dashboards for the operations centre's planners, generated from the domain modules so a
new domain appears in them without editing JSON by hand.

    .venv/bin/python -m ioc.grafana [--out deploy/grafana/dashboards]

Two dashboards, both reading the community tier's rollups (`readings_<domain>_1h`, `_1m`) through
the read-only role `ioc_reader` and the provisioned datasource `ioc-timescaledb`:

- `city-overview.json`: per city, devices online and offline and open alarms per domain, and for
  each domain's metrics the city-wide hourly average, from the hourly rollup;
- `device-series.json`: one device's metrics from the minute rollup, re-bucketed to the panel's
  resolution (Grafana's `$__interval_ms`), for the device chosen by city, domain and id.

The queries use Grafana's PostgreSQL macros (`$__timeFilter`, `$__interval_ms`) and the dashboard
variables `$city`, `$domain`, `$device`; `tests/integration/test_grafana.py` runs every one of
them against a real community server as `ioc_reader`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ioc_core.domains import BATTERY, DOMAINS, Domain, Metric
from ioc_core.storage.tiers import ROLLUPS

DATASOURCE = {"type": "grafana-postgresql-datasource", "uid": "ioc-timescaledb"}
DASHBOARDS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
_HOURLY = next(rollup for rollup in ROLLUPS if rollup.suffix == "1h")
_MINUTELY = next(rollup for rollup in ROLLUPS if rollup.suffix == "1m")
_PANEL_WIDTH, _PANEL_HEIGHT = 12, 8


def _watched(domain: Domain) -> list[Metric]:
    # The battery is a maintenance figure, not the city's: the device dashboard shows it.
    return [metric for metric in domain.metrics if metric is not BATTERY]


def _average(column: str, alias: str) -> str:
    return f'sum(r.{column}_sum) / nullif(sum(r.{column}_count), 0) AS "{alias}"'


def city_average_sql(domain: Domain, metric: Metric) -> str:
    """The city-wide hourly average of one metric, from the hourly rollup."""
    return (
        f"SELECT r.bucket AS time, {_average(metric.column, metric.label_en)}\n"
        f"FROM {_HOURLY.view(domain)} r JOIN devices d ON d.id = r.device_id\n"
        "WHERE d.city = '$city' AND $__timeFilter(r.bucket)\n"
        "GROUP BY r.bucket ORDER BY r.bucket"
    )


def device_series_sql(domain: Domain) -> str:
    """Every metric of one device, from the minute rollup, in buckets of the panel's resolution."""
    averages = ",\n    ".join(_average(metric.column, metric.label_en) for metric in domain.metrics)
    return (
        "SELECT time_bucket(make_interval(secs => greatest($__interval_ms, 60000) / 1000.0), r.bucket)"
        " AS time,\n    "
        f"{averages}\n"
        f"FROM {_MINUTELY.view(domain)} r\n"
        "WHERE r.device_id = '$device' AND $__timeFilter(r.bucket)\n"
        "GROUP BY 1 ORDER BY 1"
    )


DEVICES_BY_DOMAIN_SQL = (
    'SELECT d.domain AS "Domain",\n'
    "    count(*) FILTER (WHERE s.status = 'online') AS \"Online\",\n"
    "    count(*) FILTER (WHERE s.status = 'offline') AS \"Offline\",\n"
    "    count(*) FILTER (WHERE coalesce(s.status, 'unknown') = 'unknown') AS \"Never heard\"\n"
    "FROM devices d LEFT JOIN device_state s ON s.device_id = d.id\n"
    "WHERE d.city = '$city'\n"
    "GROUP BY d.domain ORDER BY d.domain"
)
OPEN_ALARMS_SQL = (
    'SELECT a.domain AS "Domain", a.severity AS "Severity", count(*) AS "Open alarms"\n'
    "FROM alarms a\n"
    "WHERE a.city = '$city' AND a.state <> 'resolved'\n"
    "GROUP BY a.domain, a.severity ORDER BY a.domain, a.severity"
)
CITIES_SQL = "SELECT DISTINCT city FROM devices ORDER BY city"
DEVICES_SQL = "SELECT id FROM devices WHERE city = '$city' AND domain = '$domain' ORDER BY id"


def _target(sql: str, fmt: str) -> dict[str, Any]:
    return {
        "refId": "A",
        "datasource": DATASOURCE,
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": sql,
    }


def _panel(
    panel_id: int,
    title: str,
    sql: str,
    *,
    kind: str = "timeseries",
    unit: str = "",
    x: int = 0,
    y: int = 0,
    width: int = _PANEL_WIDTH,
) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": _PANEL_HEIGHT, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [_target(sql, "time_series" if kind == "timeseries" else "table")],
    }


def _row(panel_id: int, title: str, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }


def _query_variable(name: str, label: str, sql: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": sql,
        "definition": sql,
        "refresh": 1,
        "sort": 1,
        "includeAll": False,
        "multi": False,
        "current": {},
        "options": [],
    }


def _dashboard(
    uid: str, title: str, variables: list[dict[str, Any]], panels: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["ioc"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "1m",
        "time": {"from": "now-7d", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": panels,
    }


def _unit(metric: Metric) -> str:
    # Grafana's own unit ids where one fits; otherwise the domain's unit as a suffix.
    known = {
        "fraction": "percentunit",
        "°C": "celsius",
        "V": "volt",
        "Hz": "hertz",
        "kW": "kwatt",
        "km/h": "velocitykmh",
    }
    if metric.unit in known:
        return known[metric.unit]
    return f"suffix: {metric.unit}" if metric.unit else ""


def city_overview() -> dict[str, Any]:
    panels = [
        _panel(1, "Devices by domain", DEVICES_BY_DOMAIN_SQL, kind="table", x=0, y=0),
        _panel(2, "Open alarms", OPEN_ALARMS_SQL, kind="table", x=_PANEL_WIDTH, y=0),
    ]
    y, panel_id = _PANEL_HEIGHT, 3
    for domain in DOMAINS.values():
        panels.append(_row(panel_id, f"{domain.title_en} · {domain.title_vi}", y))
        panel_id, y = panel_id + 1, y + 1
        for index, metric in enumerate(_watched(domain)):
            x = (index % 2) * _PANEL_WIDTH
            title = f"{metric.label_en} · {metric.label_vi} (city average, hourly)"
            panels.append(
                _panel(panel_id, title, city_average_sql(domain, metric), unit=_unit(metric), x=x, y=y)
            )
            panel_id += 1
            if x:
                y += _PANEL_HEIGHT
        if len(_watched(domain)) % 2:
            y += _PANEL_HEIGHT
    variables = [_query_variable("city", "City", CITIES_SQL)]
    return _dashboard("ioc-city-overview", "IOC · City overview", variables, panels)


def device_series() -> dict[str, Any]:
    panels = [
        _panel(
            index + 1,
            f"{domain.title_en} · {domain.title_vi}: $device",
            device_series_sql(domain),
            y=index * _PANEL_HEIGHT,
            width=24,
        )
        for index, domain in enumerate(DOMAINS.values())
    ]
    domains = ",".join(DOMAINS)
    variables = [
        _query_variable("city", "City", CITIES_SQL),
        {
            "name": "domain",
            "label": "Domain",
            "type": "custom",
            "query": domains,
            "current": {},
            "options": [],
            "includeAll": False,
            "multi": False,
        },
        _query_variable("device", "Device", DEVICES_SQL),
    ]
    return _dashboard("ioc-device-series", "IOC · Device series", variables, panels)


def dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards by file name."""
    return {"city-overview.json": city_overview(), "device-series.json": device_series()}


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="write the Grafana dashboards generated from the domains")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="directory to write them to")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, dashboard in dashboards().items():
        (args.out / name).write_text(render(dashboard), encoding="utf-8")
        sys.stdout.write(f"{args.out / name}\n")


if __name__ == "__main__":
    main()
