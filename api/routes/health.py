"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from api.auth import MetricsReader
from api.deps import Accounts, Db, Limiter
from api.problems import PROBLEM
from ioc_core.errors import IocError
from ioc_core.metrics import CONTENT_TYPE, Metric, render
from ioc_core.supervision import public_description

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
    storage_tier: str | None = None


@router.get("/health", response_model=Health, summary="Liveness: the process answers.")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    summary="Readiness: every dependency answers (200) or not (503).",
    responses={503: {"model": Readiness}},
)
async def ready(database: Db, accounts: Accounts) -> Any:
    try:
        await database.ping()
    except IocError as exc:
        # Which dependency, never where it is: /ready needs no key.
        body = Readiness(status="unavailable", checks={"database": public_description(exc)})
        return JSONResponse(body.model_dump(), status_code=503)
    checks = {"database": "ok"}
    if accounts is not None:
        # Reading goes on without the broker; only registration and credential changes wait.
        checks["device_accounts"] = f"unavailable: {accounts.problem}" if accounts.problem else "ok"
    return Readiness(
        status="ok" if all(v == "ok" for v in checks.values()) else "degraded",
        checks=checks,
        storage_tier=str(database.tier) if database.tier else None,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (a metrics key, or an admin key without a scope limit).",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}}, 401: PROBLEM, 403: PROBLEM},
)
async def metrics(database: Db, limiter: Limiter, principal: MetricsReader) -> Response:
    dead = Metric("ioc_dead_letters_total", "counter", "rejected messages stored, by reason")
    for reason, count in sorted((await database.dead_letters.counts()).items()):
        dead.add(count, reason=reason)
    devices = Metric("ioc_devices", "gauge", "registered devices, by status")
    for status, count in sorted((await database.status.counts()).items()):
        devices.add(count, status=status)
    deliveries = Metric("ioc_webhook_deliveries", "gauge", "webhook deliveries kept, by state")
    for state, count in sorted((await database.webhooks.delivery_counts()).items()):
        deliveries.add(count, state=state)
    refused = Metric("ioc_api_rate_limited_total", "counter", "requests this API process refused with 429")
    for policy, count in sorted(limiter.refused.items()):
        refused.add(count, policy=policy)
    buckets = Metric("ioc_api_rate_limit_buckets", "gauge", "rate-limit buckets this API process keeps")
    buckets.add(len(limiter))
    return Response(render([dead, devices, deliveries, refused, buckets]), media_type=CONTENT_TYPE)
