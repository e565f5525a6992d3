"""Runs the API under uvicorn as a component with `start()`/`stop()`."""

from __future__ import annotations

import asyncio

from api.app import create_app
from ioc_core.http import HttpServer
from ioc_core.settings import Settings
from ioc_core.storage import Database


class ApiServer(HttpServer):
    def __init__(self, settings: Settings, *, database: Database | None = None) -> None:
        self._app = create_app(settings, database=database)
        super().__init__(
            self._app,
            host=settings.api_host,
            port=settings.api_port,
            name="API",
            max_header_bytes=settings.api_max_header_bytes,
            client_timeout_s=settings.api_client_timeout_s,
            max_connections=settings.api_max_connections,
            tls=settings.api_tls,
        )

    async def wait(self) -> None:
        """Until the server ends by itself or the live-event hub fails for good (raised here)."""
        hub = getattr(self._app.state, "event_hub", None)
        if hub is None:
            await super().wait()
            return
        waits = [asyncio.ensure_future(super().wait()), asyncio.ensure_future(hub.wait())]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in waits:
                task.cancel()

    async def live_events_connected(self, timeout_s: float) -> bool:
        """Wait until `/v1/stream` can serve (the hub follows the events), at most `timeout_s`."""
        hub = getattr(self._app.state, "event_hub", None)
        return hub is not None and await hub.until_connected(timeout_s)

    async def stop(self) -> None:
        # uvicorn waits for open responses to finish before the app's shutdown runs, and event
        # streams never finish by themselves: end them first.
        hub = getattr(self._app.state, "event_hub", None)
        if hub is not None:
            hub.close_streams()
        await super().stop()
