"""Runs the API under uvicorn as a component with `start()`/`stop()`."""

from __future__ import annotations

from api.app import create_app
from ioc_core.http import HttpServer
from ioc_core.settings import Settings
from ioc_core.storage import Database


class ApiServer(HttpServer):
    def __init__(self, settings: Settings, *, database: Database | None = None) -> None:
        super().__init__(
            create_app(settings, database=database),
            host=settings.api_host,
            port=settings.api_port,
            name="API",
        )
