"""The gateway's view of the device registry: a cache, refreshed in the background, so that
validation costs no database query per message.
"""

from __future__ import annotations

import logging
import time

from ioc_core.models import DeviceRoute
from ioc_core.storage import Database
from ioc_core.supervision import Supervisor

log = logging.getLogger(__name__)

# Devices read per query when the registry is refreshed.
_REFRESH_PAGE = 5_000


class DeviceRegistry:
    def __init__(
        self, database: Database, supervisor: Supervisor, *, refresh_s: float, miss_ttl_s: float = 5.0
    ) -> None:
        self._database = database
        self._supervisor = supervisor
        self._refresh_s = refresh_s
        self._miss_ttl_s = miss_ttl_s
        self._routes: dict[str, DeviceRoute] = {}
        # Unknown ids are remembered briefly so a flood of junk ids costs one query each per TTL,
        # while a device registered a moment ago is found within the TTL.
        self._misses: dict[str, float] = {}

    async def start(self) -> None:
        await self.refresh()
        # The cached routes stay valid while a refresh fails: the gateway goes on with them.
        self._supervisor.every("registry refresh", self._refresh_s, self.refresh, blocking=False)

    async def refresh(self) -> None:
        # Page by page: the whole fleet in one query (rows decoded and routes built in one go) held
        # the gateway's event loop, and every message behind it, for a good part of a second each
        # refresh at 100,000 devices. A device registered meanwhile is found by `lookup` anyway.
        routes: dict[str, DeviceRoute] = {}
        after = ""
        while True:
            page = await self._database.devices.routes_after(after, _REFRESH_PAGE)
            for route in page:
                known = self._routes.get(route.id)
                # Unchanged routes are kept, not replaced: fewer new objects for the collector.
                routes[route.id] = known if known == route else route
            if len(page) < _REFRESH_PAGE:
                break
            after = page[-1].id
        self._routes = routes
        self._misses.clear()
        log.debug("device registry holds %d devices", len(self._routes))

    async def lookup(self, device_id: str) -> DeviceRoute | None:
        route = self._routes.get(device_id)
        if route is not None:
            return route
        missed_at = self._misses.get(device_id)
        now = time.monotonic()
        if missed_at is not None and now - missed_at < self._miss_ttl_s:
            return None
        route = await self._database.devices.route(device_id)
        if route is None:
            if len(self._misses) > 100_000:
                self._misses.clear()
            self._misses[device_id] = now
        else:
            self._routes[device_id] = route
        return route

    def __len__(self) -> int:
        return len(self._routes)
