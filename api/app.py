"""The FastAPI application: what it owns while it runs (storage, device accounts, the live events
hub), error answers as problem+json, compression, and the routers of `api.routes`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES

from api import problems
from api.auth import KeyCache
from api.device_accounts import DeviceAccounts
from api.limits import RequestLimits
from api.page import add_page_routes
from api.params import check_time_query_parameters, reject_unknown_query_parameters
from api.problems import PROBLEM, TOO_MANY_REQUESTS
from api.rate_limits import RateLimiter, RateLimitMiddleware, policies_of
from api.routes import (
    agencies,
    alarms,
    api_keys,
    areas,
    audit,
    dead_letters,
    devices,
    export,
    health,
    incidents,
    maintenance,
    public,
    regions,
    rules,
    screens,
    stream,
    webhooks,
)
from api.stream.hub import EventHub
from api.view_cache import ViewCache
from ioc_core.exports import MEDIA_TYPES
from ioc_core.settings import Settings
from ioc_core.storage import Database

log = logging.getLogger(__name__)

_DESCRIPTION = (
    "Operations-center API: devices, latest state, series, alarms, GIS layers, live events."
    " Every error is RFC 9457 problem+json. Keys go in `Authorization: Bearer KEY` or `X-API-Key`."
)


@asynccontextmanager
async def _storage(app: FastAPI, settings: Settings, database: Database | None) -> AsyncIterator[None]:
    if database is not None:
        app.state.database = database
        yield
        return
    async with Database(
        settings.database_url.get_secret_value(),
        timeout_s=settings.api_timeout_s,
        sealer=settings.sealer(),
    ) as owned:
        app.state.database = owned
        log.info("API ready on storage tier %s", owned.tier)
        yield


@asynccontextmanager
async def _device_accounts(
    app: FastAPI, settings: Settings, accounts: DeviceAccounts | None
) -> AsyncIterator[None]:
    app.state.accounts = accounts
    if accounts is not None or settings.mqtt_admin_url is None:
        yield
        return
    async with DeviceAccounts(settings.mqtt_admin_url.get_secret_value()) as owned:
        app.state.accounts = owned
        yield


def _lifespan(
    settings: Settings, database: Database | None, accounts: DeviceAccounts | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Storage, then device accounts, then the hub; closed in the reverse order."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with (
            _storage(app, settings, database),
            _device_accounts(app, settings, accounts),
            EventHub(settings) as hub,
        ):
            app.state.event_hub = hub
            yield

    return lifespan


def create_app(
    settings: Settings, *, database: Database | None = None, accounts: DeviceAccounts | None = None
) -> FastAPI:
    """Build the app. With `database` or `accounts` given, the caller owns their lifetime (tests,
    `ioc up`); otherwise device accounts are on when IOC_MQTT_ADMIN_URL is set. The database made
    here needs IOC_SECRETS_KEY (webhook signing secrets are stored sealed with it): without it the
    app does not start (`ioc api` refuses before it builds the app)."""
    app = FastAPI(
        title="IOC streaming backend",
        version="0.1.0",
        description=_DESCRIPTION,
        # FastAPI's own pages load their scripts from a public CDN: `add_page_routes` serves /docs
        # from vendored files instead, and ReDoc is off (it would need the same, and inline styles).
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan(settings, database, accounts),
        responses={
            **{status: PROBLEM for status in (400, 401, 403, 408, 413, 422, 500)},
            429: TOO_MANY_REQUESTS,
            503: {
                **PROBLEM,
                "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
            },
        },
        dependencies=[Depends(reject_unknown_query_parameters), Depends(check_time_query_parameters)],
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.api_key_cache_s)
    app.state.view_cache = ViewCache()
    app.state.export_slots = export.ExportSlots(settings.api_max_exports)
    problems.install(app)
    # Views that screens poll compress themselves once per version; this covers the rest but
    # Parquet, whose pages are compressed already.
    app.add_middleware(
        GZipMiddleware,
        minimum_size=1024,
        compresslevel=6,
        exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, MEDIA_TYPES["parquet"]),
    )
    # Within the rate limits: the request limits count what the rate limits let through.
    app.add_middleware(RequestLimits, settings=settings)
    # Outermost (added last): a request over its limit costs no routing, no key query, no work.
    app.state.rate_limiter = RateLimiter(settings.api_rate_limit_buckets)
    app.add_middleware(
        RateLimitMiddleware,
        state=app.state,
        limiter=app.state.rate_limiter,
        policies=policies_of(settings),
    )
    for module in (
        screens,
        devices,
        api_keys,
        public,
        webhooks,
        stream,
        health,
        alarms,
        dead_letters,
        audit,
        export,
        areas,
        regions,
        rules,
        maintenance,
        incidents,
        agencies,
    ):
        app.include_router(module.router)
    add_page_routes(app, settings)
    return app
