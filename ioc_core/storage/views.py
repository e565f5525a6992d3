"""Read-side SQL of the operations API: latest state, GIS layers, summaries, cities, API keys.

Screens poll these every few seconds, so they read the registry and the latest-state table only,
never the readings, and the heavy ones build their JSON inside PostgreSQL: one text value comes
back instead of ten thousand records to convert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ioc_core.alarms import Alarm
from ioc_core.storage.severity import severity_rank_sql

# Filters shared by the queries below: $1 cities (NULL = every), $2 domains (NULL = every).
_SCOPE = "($1::text[] IS NULL OR d.city = ANY($1)) AND ($2::text[] IS NULL OR d.domain = ANY($2))"

# The ids of the areas a device `d` lies in (see storage.areas), in id order.
DEVICE_AREAS = (
    "coalesce((SELECT array_agg(da.area_id ORDER BY da.area_id) FROM device_areas da"
    " WHERE da.device_id = d.id), '{}') AS areas"
)


def in_areas(parameter: str) -> str:
    """Whether device `d` lies in one of the areas of a `text[]` parameter (null: no filter)."""
    return (
        f"({parameter}::text[] IS NULL OR EXISTS (SELECT 1 FROM device_areas da"
        f" WHERE da.device_id = d.id AND da.area_id = ANY({parameter})))"
    )


# Versions of the (city, domain) pairs in scope, as one string: what an ETag is made of.
STATE_VERSIONS_SQL = """
SELECT coalesce(string_agg(city || '/' || domain || '=' || version, ',' ORDER BY city, domain), '')
FROM state_versions
WHERE ($1::text[] IS NULL OR city = ANY($1)) AND ($2::text[] IS NULL OR domain = ANY($2))
"""

# Locks the pairs' rows in one order, at the end of a transaction, so concurrent writers neither
# deadlock nor hold the lock long; a committed change is always a new number.
BUMP_STATE_VERSIONS_SQL = """
INSERT INTO state_versions AS v (city, domain, version)
SELECT u.city, u.domain, nextval('state_version_seq')
FROM unnest($1::text[], $2::text[]) AS u (city, domain)
ORDER BY u.city, u.domain
ON CONFLICT (city, domain) DO UPDATE SET version = excluded.version, changed_at = now()
"""

# $3 the last device id of the previous page (NULL on the first), $4 page size, $5 area ids or
# NULL. One row more than the page is read to tell whether another page follows.
STATE_PAGE_SQL = f"""
WITH page AS (
    SELECT d.id, d.city, d.domain, d.lat, d.lon, coalesce(s.status, 'unknown') AS status, s.ts,
           coalesce(s.metrics, '{{}}'::jsonb) AS metrics, {DEVICE_AREAS},
           row_number() OVER (ORDER BY d.id) AS n
    FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
    WHERE {_SCOPE} AND ($3::text IS NULL OR d.id > $3) AND {in_areas("$5")}
    ORDER BY d.id
    LIMIT $4 + 1
)
SELECT count(*) FILTER (WHERE n <= $4) AS n, max(id) FILTER (WHERE n <= $4) AS last_id,
       count(*) > $4 AS more,
       coalesce(json_agg(json_build_object(
           'device_id', id, 'city', city, 'domain', domain, 'status', status, 'ts', ts,
           'metrics', metrics, 'location', json_build_object('lat', lat, 'lon', lon), 'areas', areas
       ) ORDER BY id) FILTER (WHERE n <= $4), '[]')::text AS items
FROM page
"""

_SEVERITY_RANK = severity_rank_sql("a.severity")

# Worst open alarm per device, and the open district alarm of each district.
_OPEN_ALARMS = f"""
    SELECT a.device_id, count(*) AS n,
           (array_agg(a.severity ORDER BY {_SEVERITY_RANK} DESC))[1] AS worst
    FROM alarms a
    WHERE a.state <> 'resolved' AND NOT a.suppressed AND a.device_id IS NOT NULL
    GROUP BY a.device_id
"""
# Worst open area-wide alarm over each device: a zone's flood alarm reaches the devices in any of
# its areas; one of older releases, with no areas, the devices of its city's `district`.
_AREA_ALARMS = f"""
    SELECT m.device_id, (array_agg(a.severity ORDER BY {_SEVERITY_RANK} DESC))[1] AS worst
    FROM alarms a JOIN device_areas m ON m.area_id = ANY(a.areas)
    WHERE a.state <> 'resolved' AND NOT a.suppressed AND a.device_id IS NULL
    GROUP BY m.device_id
"""
_DISTRICT_ALARMS = f"""
    SELECT a.city, a.district, (array_agg(a.severity ORDER BY {_SEVERITY_RANK} DESC))[1] AS worst
    FROM alarms a
    WHERE a.state <> 'resolved' AND NOT a.suppressed AND a.device_id IS NULL AND a.district IS NOT NULL
      AND a.areas IS NULL
    GROUP BY a.city, a.district
"""
_WORST_AREA_ALARM = (
    f"CASE WHEN dsa.worst IS NULL OR {severity_rank_sql('zsa.worst')} >= {severity_rank_sql('dsa.worst')}"
    " THEN coalesce(zsa.worst, dsa.worst) ELSE dsa.worst END"
)

# $3 bbox as [min lon, min lat, max lon, max lat] or NULL.
_BBOX = "($3::float8[] IS NULL OR (d.lon BETWEEN $3[1] AND $3[3] AND d.lat BETWEEN $3[2] AND $3[4]))"

# An RFC 7946 FeatureCollection's features: [lon, lat] points with the latest state.
LAYER_SQL = f"""
SELECT count(*) AS n, coalesce(json_agg(json_build_object(
    'type', 'Feature',
    'id', d.id,
    'geometry', json_build_object('type', 'Point', 'coordinates', json_build_array(d.lon, d.lat)),
    'properties', json_build_object(
        'id', d.id, 'name', d.name, 'city', d.city, 'domain', d.domain, 'district', d.district,
        'status', coalesce(s.status, 'unknown'), 'ts', s.ts, 'last_seen', s.last_seen,
        'metrics', coalesce(s.metrics, '{{}}'::jsonb),
        'alarm_severity', a.worst, 'open_alarms', coalesce(a.n, 0),
        'area_alarm_severity', {_WORST_AREA_ALARM},
        'district_alarm_severity', {_WORST_AREA_ALARM},
        'areas', coalesce((SELECT array_agg(m.area_id ORDER BY m.area_id) FROM device_areas m
                           WHERE m.device_id = d.id), '{{}}')
    )
) ORDER BY d.id), '[]')::text AS features
FROM devices d
LEFT JOIN device_state s ON s.device_id = d.id
LEFT JOIN ({_OPEN_ALARMS}) a ON a.device_id = d.id
LEFT JOIN ({_AREA_ALARMS}) zsa ON zsa.device_id = d.id
LEFT JOIN ({_DISTRICT_ALARMS}) dsa ON dsa.city = d.city AND dsa.district = d.district
WHERE {_SCOPE} AND {_BBOX} AND {in_areas("$4")}
"""

# $3 status filter or NULL, $4 bbox or NULL, $5 last id of the previous page, $6 page size,
# $7 area ids or NULL.
DEVICE_PAGE_SQL = f"""
SELECT d.id, d.city, d.domain, d.name, d.district, d.lat, d.lon, d.thresholds, d.created_at,
       coalesce(s.status, 'unknown') AS status, s.last_seen, s.ts, s.metrics, {DEVICE_AREAS}
FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
WHERE {_SCOPE}
  AND ($3::text IS NULL OR coalesce(s.status, 'unknown') = $3)
  AND ($4::float8[] IS NULL OR (d.lon BETWEEN $4[1] AND $4[3] AND d.lat BETWEEN $4[2] AND $4[4]))
  AND ($5::text IS NULL OR d.id > $5)
  AND {in_areas("$7")}
ORDER BY d.id
LIMIT $6
"""

# The rules an alarm broke: its reasons, and its own rule should a writer have left them out.
_REASONS = "(a.reasons || jsonb_build_object(a.rule, true))"

# What the summary's figures are computed from: every device in scope with its open alarms.
SUMMARY_DEVICES_SQL = f"""
SELECT d.id, d.domain, coalesce(s.status, 'unknown') AS status, coalesce(s.metrics, '{{}}'::jsonb) AS metrics,
       d.thresholds,
       coalesce((SELECT array_agg(r.rule || '|' || coalesce(a.metric, ''))
                 FROM alarms a, jsonb_object_keys({_REASONS}) AS r (rule)
                 WHERE a.device_id = d.id AND a.state <> 'resolved'
                   AND NOT a.suppressed), '{{}}') AS open_alarms
FROM devices d LEFT JOIN device_state s ON s.device_id = d.id
WHERE {_SCOPE} AND ($3::text IS NULL OR d.city = $3) AND {in_areas("$4")}
"""

# The devices in scope lying in areas $3, each with the ids of those areas it lies in, its open
# alarms' rules and its worst open alarm: what each area's state on a screen is computed from.
AREA_DEVICES_SQL = f"""
SELECT d.id, d.domain, coalesce(s.status, 'unknown') AS status, coalesce(s.metrics, '{{}}'::jsonb) AS metrics,
       d.thresholds,
       coalesce((SELECT array_agg(r.rule || '|' || coalesce(x.metric, ''))
                 FROM alarms x, jsonb_object_keys(x.reasons || jsonb_build_object(x.rule, true)) AS r (rule)
                 WHERE x.device_id = d.id AND x.state <> 'resolved'
                   AND NOT x.suppressed), '{{}}') AS open_alarms,
       coalesce((SELECT array_agg(x.state || '|' || x.severity) FROM alarms x
                 WHERE x.device_id = d.id AND x.state <> 'resolved'
                   AND NOT x.suppressed), '{{}}') AS alarm_states,
       m.areas
FROM (SELECT device_id, array_agg(area_id ORDER BY area_id) AS areas
      FROM device_areas WHERE area_id = ANY($3::text[]) GROUP BY device_id) m
JOIN devices d ON d.id = m.device_id
LEFT JOIN device_state s ON s.device_id = d.id
WHERE {_SCOPE}
"""

# The open area-wide alarms (a zone's flood alarm) over areas $3, once per area of $3 each
# concerns: they count in those areas' state beside their devices' own alarms.
AREA_ALARMS_SQL = """
SELECT u.area_id, a.domain, a.state, a.severity
FROM alarms a, unnest(a.areas) AS u (area_id)
WHERE a.state <> 'resolved' AND NOT a.suppressed AND a.device_id IS NULL AND a.areas && $3::text[]
  AND u.area_id = ANY($3::text[])
  AND ($1::text[] IS NULL OR a.city = ANY($1)) AND ($2::text[] IS NULL OR a.domain = ANY($2))
"""

# $4 area ids or NULL: alarms of devices in one of them, and area-wide alarms over one of them.
SUMMARY_ALARMS_SQL = """
SELECT a.domain, a.state, a.severity, count(*) AS n
FROM alarms a
WHERE a.state <> 'resolved' AND NOT a.suppressed
  AND ($1::text[] IS NULL OR a.city = ANY($1)) AND ($2::text[] IS NULL OR a.domain = ANY($2))
  AND ($3::text IS NULL OR a.city = $3)
  AND ($4::text[] IS NULL OR a.areas && $4 OR EXISTS (SELECT 1 FROM device_areas m
                                      WHERE m.device_id = a.device_id AND m.area_id = ANY($4)))
GROUP BY a.domain, a.state, a.severity
"""

CITIES_SQL = f"""
SELECT d.city, count(*) AS devices, avg(d.lat) AS lat, avg(d.lon) AS lon,
       min(d.lon) AS min_lon, min(d.lat) AS min_lat, max(d.lon) AS max_lon, max(d.lat) AS max_lat
FROM devices d
WHERE {_SCOPE} AND {in_areas("$3")}
GROUP BY d.city
ORDER BY d.city
"""

API_KEY_COLUMNS = "id, name, role, cities, domains, created_by, created_at, revoked_at, regions, areas"

# A key as authentication sees it: its `cities` are those it names with those of its regions (an
# empty list when its regions are gone: it then sees nothing, never everything).
EFFECTIVE_KEY_COLUMNS = """
    k.id, k.name, k.role, k.domains, k.created_by, k.created_at, k.revoked_at, k.regions, k.areas,
    CASE WHEN k.regions IS NULL THEN k.cities
         ELSE ARRAY(SELECT c FROM unnest(k.cities) AS c
                    UNION SELECT c FROM regions r, unnest(r.cities) AS c WHERE r.id = ANY(k.regions)
                    ORDER BY 1) END AS cities
"""


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    name: str | None
    role: str
    cities: list[str] | None
    domains: list[str] | None
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None
    regions: list[str] | None = None
    areas: list[str] | None = None


@dataclass(frozen=True, slots=True)
class StatePage:
    """Items as a JSON array text, and the last device id on the page (None when empty)."""

    items_json: str
    count: int
    last_id: str | None
    more: bool


@dataclass(frozen=True, slots=True)
class SummaryDevice:
    id: str
    domain: str
    status: str
    metrics: dict[str, float]
    thresholds: dict[str, dict[str, float | None]]
    open_alarms: list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class AreaDevice:
    """A device as an area's state counts it: its summary inputs, the (state, severity) of each of
    its open alarms, and which of the areas asked for it lies in."""

    device: SummaryDevice
    areas: list[str]
    alarm_states: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CityRow:
    city: str
    devices: int
    lat: float
    lon: float
    bbox: tuple[float, float, float, float]


# Open alarms the public is warned of (CAP, `GET /v1/public/cap`), worst and newest first, with
# where they are: a device alarm's device; an area alarm's area (subject `area:{id}`, see
# `ioc_core.alarms.area_subject`) with the coded wards among the alarm's areas; or, for an old
# district alarm (and an area alarm whose area is gone), the registered devices of its domain in
# its district (or in the alarm's remaining areas). `{alarm_columns}` takes the alarm's own
# columns, as every alarm query reads them.
# $1, $2 the public (domain, rule) pairs (an alarm is public when one of its reasons is one);
# $3 severities; $4 a city or NULL; $5 one alarm id or NULL; $6 the most rows.
PUBLIC_ALARMS_SQL = f"""
SELECT {{alarm_columns}}, d.name AS device_name, d.lat, d.lon,
       p.lats AS district_lats, p.lons AS district_lons,
       z.id AS area_id, z.kind AS area_kind, z.name_vi AS area_name_vi, z.name_en AS area_name_en,
       z.code AS area_code, z.geometry AS area_geometry,
       w.ids AS ward_ids, w.codes AS ward_codes, w.names AS ward_names
FROM alarms a
LEFT JOIN devices d ON d.id = a.device_id
LEFT JOIN areas z
       ON a.device_id IS NULL AND starts_with(a.subject, 'area:') AND z.id = substr(a.subject, 6)
LEFT JOIN LATERAL (
    SELECT array_agg(x.lat ORDER BY x.id) AS lats, array_agg(x.lon ORDER BY x.id) AS lons
    FROM devices x
    WHERE a.device_id IS NULL AND z.id IS NULL AND x.city = a.city AND x.domain = a.domain
      AND CASE WHEN starts_with(a.subject, 'area:')
               THEN EXISTS (SELECT 1 FROM device_areas m
                            WHERE m.device_id = x.id AND m.area_id = ANY(a.areas))
               ELSE x.district = a.district END
) p ON true
LEFT JOIN LATERAL (
    SELECT array_agg(y.id ORDER BY y.code, y.id) AS ids, array_agg(y.code ORDER BY y.code, y.id) AS codes,
           array_agg(y.name_vi ORDER BY y.code, y.id) AS names
    FROM areas y
    WHERE z.id IS NOT NULL AND y.id = ANY(a.areas) AND y.kind = 'ward' AND y.code IS NOT NULL
) w ON true
WHERE a.state <> 'resolved'
  -- One raised inside a maintenance window warns nobody until it outlives the window.
  AND NOT a.suppressed
  AND EXISTS (SELECT 1 FROM jsonb_object_keys({_REASONS}) AS r (rule)
              JOIN unnest($1::text[], $2::text[]) AS pub (domain, rule)
                ON pub.domain = a.domain AND pub.rule = r.rule)
  AND a.severity = ANY($3::text[])
  AND ($4::text IS NULL OR a.city = $4)
  AND ($5::bigint IS NULL OR a.id = $5)
ORDER BY {_SEVERITY_RANK} DESC, a.id DESC
LIMIT $6
"""


@dataclass(frozen=True, slots=True)
class PublicWard:
    """A ward an area alarm concerns, with its official code (wards without one are left out)."""

    id: str
    code: str
    name_vi: str


@dataclass(frozen=True, slots=True)
class PublicArea:
    """The area an area alarm is about: its names, kind, official code (None without one), its
    geometry (a GeoJSON MultiPolygon, `[lon, lat]`), and the coded wards among the alarm's areas
    (its own too, when it is one), in code order."""

    id: str
    kind: str
    name_vi: str
    name_en: str | None
    code: str | None
    geometry: dict[str, object]
    wards: tuple[PublicWard, ...] = ()


@dataclass(frozen=True, slots=True)
class PublicAlarmRow:
    """An open public alarm with its place: the device's name and `(lat, lon)` (None when the device
    is gone); for an area alarm its area (None when the area is gone, or for any other alarm); for
    a district alarm, or an area alarm whose area is gone, the `(lat, lon)` of its stations."""

    alarm: Alarm
    device_name: str | None
    location: tuple[float, float] | None
    district_points: list[tuple[float, float]]
    area: PublicArea | None = None
