"""An ASGI app served by uvicorn inside our event loop, as a component with `start()`/`stop()`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn

from ioc_core.component import Component
from ioc_core.errors import ServiceUnavailableError

log = logging.getLogger(__name__)


class HttpServer(Component):
    def __init__(self, app: Any, *, host: str, port: int, name: str) -> None:
        # No proxy headers: uvicorn would otherwise take X-Forwarded-For from loopback peers for the
        # client's address, which any local client can write. No trusted-proxy setting exists, so
        # the address (in the audit log, say) is always the connection's peer.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._host, self._port, self._name = host, port, name
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name=f"{self._name}-http")
        while not self._server.started:
            if self._task.done():
                await self.stop()
                raise ServiceUnavailableError(
                    f"{self._name} could not listen on {self._host}:{self._port} (see the log above)"
                )
            await asyncio.sleep(0.05)
        log.info("%s listening on http://%s:%d", self._name, self._host, self._port)

    async def _serve(self) -> None:
        # uvicorn exits the process when it cannot bind; here that is a failed start instead.
        with contextlib.suppress(SystemExit):
            await self._server.serve()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def wait(self) -> None:
        """Until the server ends by itself; cancelling this wait does not stop the server."""
        if self._task is not None:
            await asyncio.wait([self._task])
