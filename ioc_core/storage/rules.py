"""Rules at run time: the overrides of a domain's default rules for a city, an area or a device,
the rules version processors watch, and what a back-test reads of a device's history.

Every change takes the one `rules_version` row's lock first and stamps the override with the
counter's new value, so changes are ordered, a stale `If-Match` is told apart from a current one,
and a version is never reused (an override removed and made again does not return to an old one).
Which overrides apply to a device, and in which order, is read with its profile
(`storage.devices`, `RULE_LAYERS_SQL`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from ioc_core.domains import get_domain
from ioc_core.errors import ConflictError, NotFoundError, ValidationError
from ioc_core.rules import AREA_SOURCE_PREFIX, CITY_SOURCE, DEVICE_SOURCE
from ioc_core.storage.pool import Connection, Pool, Transaction
from ioc_core.storage.schema import area_size_sql, ident

RuleLevel = Literal["city", "area", "device"]
RULE_LEVELS: tuple[RuleLevel, ...] = ("city", "area", "device")

_COLUMNS = "level, scope_id, domain, rules, version, updated_by, updated_at"

# The overrides that apply to device `d` (a `devices` row), as a JSON array of [source, rules] in
# the order they are laid over the defaults: the city's, then those of the areas the device lies
# in, the largest area first (by bounding box, as the flood zones are chosen; sizes alike to
# 1e-8 square degrees tie, and then the smaller id comes later), then the device's own. Later
# ones win key by key, so where two areas disagree the smallest holds, then the smaller id.
# Without any override at all (most deployments, most of the time) the per-device lookups are
# skipped: the EXISTS is evaluated once per statement.
RULE_LAYERS_SQL = f"""CASE WHEN NOT EXISTS (SELECT 1 FROM rule_overrides) THEN '[]'::jsonb ELSE coalesce((
    SELECT jsonb_agg(jsonb_build_array(o.source, o.rules) ORDER BY o.rank, o.size DESC, o.area DESC)
    FROM (
        SELECT '{CITY_SOURCE}' AS source, r.rules, 0 AS rank, 0::numeric AS size, '' AS area
        FROM rule_overrides r
        WHERE r.level = 'city' AND r.scope_id = d.city AND r.domain = d.domain
        UNION ALL
        SELECT '{AREA_SOURCE_PREFIX}' || a.id, r.rules, 1,
               {area_size_sql("a")}, a.id
        FROM device_areas m
        JOIN areas a ON a.id = m.area_id
        JOIN rule_overrides r ON r.level = 'area' AND r.scope_id = a.id AND r.domain = d.domain
        WHERE m.device_id = d.id
        UNION ALL
        SELECT '{DEVICE_SOURCE}', r.rules, 2, 0, ''
        FROM rule_overrides r
        WHERE r.level = 'device' AND r.scope_id = d.id AND r.domain = d.domain
    ) o), '[]'::jsonb) END"""


@dataclass(frozen=True, slots=True)
class RuleScope:
    """Where an override applies: a city's, an area's or a device's devices of one domain."""

    level: RuleLevel
    id: str
    domain: str

    @property
    def key(self) -> str:
        """The override's name in the audit log: `city:ha-noi:flood`, `area:ID:water`, `device:ID`."""
        return f"device:{self.id}" if self.level == "device" else f"{self.level}:{self.id}:{self.domain}"


@dataclass(frozen=True, slots=True)
class RuleOverride:
    scope: RuleScope
    rules: dict[str, dict[str, float | None]]
    version: int
    updated_by: str
    updated_at: datetime


def _override_of(row: asyncpg.Record) -> RuleOverride:
    return RuleOverride(
        scope=RuleScope(row["level"], row["scope_id"], row["domain"]),
        rules=row["rules"],
        version=row["version"],
        updated_by=row["updated_by"],
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True, slots=True)
class StoredReading:
    ts: datetime
    metrics: dict[str, float]


class RuleStore:
    """Every query about rule overrides, over a started pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def version(self) -> int:
        """The rules version: it moves whenever any override is stored or removed."""
        row = await self._pool.fetchrow("SELECT version FROM rules_version")
        return int(row["version"]) if row is not None else 0

    async def get(self, scope: RuleScope) -> RuleOverride:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM rule_overrides WHERE level = $1 AND scope_id = $2 AND domain = $3",
            scope.level,
            scope.id,
            scope.domain,
        )
        if row is None:
            raise NotFoundError(f"no {scope.domain} rules are set for {scope.level} {scope.id!r}")
        return _override_of(row)

    async def put(
        self,
        scope: RuleScope,
        rules: Mapping[str, Mapping[str, float | None]],
        *,
        updated_by: str,
        expected_version: int | None = None,
        within: Transaction | None = None,
    ) -> tuple[RuleOverride, RuleOverride | None]:
        """Store the override of `scope`, replacing the one there; (the stored one, the one it
        replaced or None). With `expected_version`, only when the current one has that version
        (ConflictError otherwise, also when there is none). The area or device must exist."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            version = await connection.fetchval(
                "UPDATE rules_version SET version = version + 1 RETURNING version"
            )
            previous = await _current(connection, scope)
            _check_expected(scope, previous, expected_version)
            try:
                row = await connection.fetchrow(
                    "INSERT INTO rule_overrides AS o"
                    " (level, scope_id, domain, rules, version, updated_by, area_id, device_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (level, scope_id, domain) DO UPDATE SET rules = excluded.rules,"
                    " version = excluded.version, updated_by = excluded.updated_by, updated_at = now()"
                    f" RETURNING {_COLUMNS}",
                    scope.level,
                    scope.id,
                    scope.domain,
                    dict(rules),
                    version,
                    updated_by,
                    scope.id if scope.level == "area" else None,
                    scope.id if scope.level == "device" else None,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise NotFoundError(f"{scope.level} {scope.id!r} not found") from exc
            except asyncpg.DeadlockDetectedError as exc:
                # The area or device is being removed at this moment (its overrides go with it).
                raise ConflictError(
                    f"{scope.level} {scope.id!r} changed while its rules were stored; try again"
                ) from exc
        assert row is not None
        return _override_of(row), previous

    async def delete(
        self, scope: RuleScope, *, expected_version: int | None = None, within: Transaction | None = None
    ) -> RuleOverride:
        """Remove the override of `scope` (the rules version moves, see the schema's trigger);
        the removed one. With `expected_version`, only when it has that version."""
        async with self._pool.joined(within) as transaction:
            connection = transaction.connection
            # The counter's lock first, as a change takes it, or the two would wait on each other.
            await connection.execute("SELECT version FROM rules_version FOR UPDATE")
            current = await _current(connection, scope)
            if current is None:
                raise NotFoundError(f"no {scope.domain} rules are set for {scope.level} {scope.id!r}")
            _check_expected(scope, current, expected_version)
            await connection.execute(
                "DELETE FROM rule_overrides WHERE level = $1 AND scope_id = $2 AND domain = $3",
                scope.level,
                scope.id,
                scope.domain,
            )
        return current

    async def device_history(
        self, device_id: str, domain: str, start: datetime, end: datetime
    ) -> list[StoredReading]:
        """A device's stored readings over [start, end), oldest first, for back-testing rules."""
        known = get_domain(domain)
        if known is None:
            raise ValidationError(f"unknown domain {domain!r}")
        columns = ", ".join(ident(m.column) for m in known.metrics)
        rows = await self._pool.fetch(
            f"SELECT ts, {columns} FROM {ident(known.table)}"
            " WHERE device_id = $1 AND ts >= $2 AND ts < $3 ORDER BY ts",
            device_id,
            start,
            end,
        )
        return [
            StoredReading(
                ts=row["ts"],
                metrics={m.name: float(row[m.column]) for m in known.metrics if row[m.column] is not None},
            )
            for row in rows
        ]


async def _current(connection: Connection, scope: RuleScope) -> RuleOverride | None:
    row = await connection.fetchrow(
        f"SELECT {_COLUMNS} FROM rule_overrides WHERE level = $1 AND scope_id = $2 AND domain = $3"
        " FOR UPDATE",
        scope.level,
        scope.id,
        scope.domain,
    )
    return _override_of(row) if row is not None else None


def _check_expected(scope: RuleScope, current: RuleOverride | None, expected: int | None) -> None:
    if expected is None:
        return
    if current is None:
        raise ConflictError(
            f"the {scope.domain} rules of {scope.level} {scope.id!r} were expected at version {expected};"
            " none are set"
        )
    if current.version != expected:
        raise ConflictError(
            f"the {scope.domain} rules of {scope.level} {scope.id!r} are at version {current.version},"
            f" not {expected}: read them again and retry"
        )
