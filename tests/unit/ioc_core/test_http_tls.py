"""The HTTP server serves HTTPS with a certificate and key from files (IOC_API_TLS_*), and refuses
a pair that does not load."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ioc_core.errors import ConfigurationError
from ioc_core.http import HttpServer
from tests.certificates import make_server_certificate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.url.scheme)


async def test_https_with_the_certificate_from_files(tmp_path: Path) -> None:
    made = make_server_certificate(tmp_path)
    port = free_port()
    app = Starlette(routes=[Route("/", hello)])
    async with HttpServer(app, host="127.0.0.1", port=port, name="tls", tls=(made.cert_file, made.key_file)):
        trusted = ssl.create_default_context(cafile=str(made.ca_file))
        async with httpx.AsyncClient(verify=trusted, timeout=5) as client:
            response = await client.get(f"https://localhost:{port}/")
            assert (response.status_code, response.text) == (200, "https")
        # A client that does not trust the certificate's CA does not get through.
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://localhost:{port}/")
        # Nor does plain HTTP on the TLS port.
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(f"http://127.0.0.1:{port}/")


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    made = make_server_certificate(tmp_path / "one")
    other = make_server_certificate(tmp_path / "other")
    with pytest.raises(ConfigurationError, match="IOC_API_TLS_CERT_FILE"):
        HttpServer(Starlette(), host="127.0.0.1", port=0, name="tls", tls=(made.cert_file, other.key_file))
