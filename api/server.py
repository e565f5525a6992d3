"""Runs the API under uvicorn as a component with `start()`/`stop()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Self

import uvicorn

from api.app import create_app
from ioc_core.errors import ServiceUnavailableError
from ioc_core.settings import Settings
from ioc_core.storage import Database

log = logging.getLogger(__name__)


class ApiServer:
    def __init__(self, settings: Settings, *, database: Database | None = None) -> None:
        config = uvicorn.Config(
            create_app(settings, database=database),
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._settings = settings
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="api-server")
        while not self._server.started:
            if self._task.done():
                await self.stop()
                raise ServiceUnavailableError(
                    f"API could not start on {self._settings.api_host}:{self._settings.api_port} "
                    "(port taken or database unreachable; see the log above)"
                )
            await asyncio.sleep(0.05)
        log.info("API listening on http://%s:%d", self._settings.api_host, self._settings.api_port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self._task
        self._task = None

    async def wait(self) -> None:
        """Until the server ends by itself; cancelling this wait does not stop the server."""
        if self._task is not None:
            await asyncio.wait([self._task])
