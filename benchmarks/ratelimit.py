"""What the API's rate limiter costs per request (pure; no services needed).

    .venv/bin/python -m benchmarks.ratelimit [--requests 20000] [--rounds 7]

Drives the real app (`api.app.create_app`) as uvicorn would, one ASGI call per request, for
`GET /health`: without the limiter (the baseline: the same app with `RateLimitMiddleware` taken
out), and with it for a request without a key (the client address's bucket), the settings' admin
key, and a database key found in the key cache (SHA-256 of the key, then its bucket). Limits are
set high enough that nothing is refused there; a last run measures refusals (429) instead. Runs
alternate, and each figure is the median of the rounds. Also times `RateLimiter.take` alone on one
hot bucket and on a table at its cap, every request a new client (eviction on every take).

Prints one JSON line: microseconds per request for each path, the limiter's cost (with minus
without) and the ratio to the baseline. The baseline leaves out uvicorn's HTTP parsing and the
network, so against a real request the ratio is smaller still.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from api.app import create_app
from api.auth import KeyCache, Principal
from api.rate_limits import Policy, RateLimiter, RateLimitMiddleware, policies_of
from ioc_core.access import hash_key
from ioc_core.settings import RateLimit, Settings

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
VIEWER_KEY = "bench-viewer-key-0123456789abcdef"
_LIMITER_CLASS: Any = RateLimitMiddleware
_HIGH = RateLimit(rate=1_000_000, burst=1_000_000)


def build_app(*, limited: bool, limits: RateLimit = _HIGH) -> FastAPI:
    settings = Settings(
        admin_api_key=SecretStr(ADMIN_KEY),
        api_key_cache_s=3600,
        api_rate_limit_viewer=limits,
        api_rate_limit_operator=limits,
        api_rate_limit_admin=limits,
        api_rate_limit_anonymous=limits,
    )
    app = create_app(settings)
    if not limited:
        # Before the first request, which is when Starlette builds its middleware stack.
        app.user_middleware = [m for m in app.user_middleware if m.cls is not _LIMITER_CLASS]
    cache: KeyCache = app.state.key_cache
    cache.put(hash_key(VIEWER_KEY), Principal(name="wall", role="viewer", key_id="bench-viewer"))
    return app


def scope_of(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/health",
        "raw_path": b"/health",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), *headers],
        "client": ("198.51.100.7", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def per_request_us(app: Any, headers: list[tuple[bytes, bytes]], requests: int) -> dict[str, Any]:
    """CPU microseconds per request through `app` (process time, so that other programs on the
    machine do not count), and the statuses it answered."""
    template = scope_of(headers)
    statuses: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    started = time.process_time()
    for _ in range(requests):
        await app(dict(template), receive, send)
    elapsed = time.process_time() - started
    return {"us": elapsed / requests * 1e6, "statuses": statuses}


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that does nothing, to time the middleware on its own."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def take_us(limiter: RateLimiter, keys: Callable[[int], object], policy: Policy, takes: int) -> float:
    started = time.perf_counter()
    for n in range(takes):
        limiter.take(keys(n), policy)
    return (time.perf_counter() - started) / takes * 1e6


def limiter_alone(takes: int) -> dict[str, float]:
    policy = Policy("viewer", rate=1_000_000, burst=1_000_000)
    hot = take_us(RateLimiter(100_000), lambda n: ("key", "hot"), policy, takes)
    full = RateLimiter(10_000)
    for n in range(10_000):
        full.take(("address", f"warm-{n}"), Policy("anonymous", rate=0.001, burst=10))
    churn = take_us(full, lambda n: ("address", f"new-{n}"), Policy("anonymous", rate=0.001, burst=10), takes)
    return {"take_hot_bucket_us": round(hot, 2), "take_new_bucket_table_full_us": round(churn, 2)}


PATHS: dict[str, list[tuple[bytes, bytes]]] = {
    "no_key": [],
    "settings_admin_key": [(b"x-api-key", ADMIN_KEY.encode())],
    "cached_database_key": [(b"authorization", f"Bearer {VIEWER_KEY}".encode())],
}


async def paired_rounds(
    apps: dict[str, Any],
    runs: list[tuple[str, str, list[tuple[bytes, bytes]]]],
    *,
    requests: int,
    rounds: int,
    ratio: bool,
) -> dict[str, Any]:
    """Each round times every run back to back; a run's figure is the median over rounds of its
    time, and of its difference to (and ratio over) the round's `baseline`: paired, so that the
    machine's drift between rounds cancels."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    statuses: dict[str, dict[int, int]] = {}
    for _ in range(rounds):
        for name, app, headers in runs:
            run = await per_request_us(apps[app], headers, requests)
            times[name].append(run["us"])
            statuses[name] = run["statuses"]
    base = times["baseline"]
    result: dict[str, Any] = {"baseline_us": round(statistics.median(base), 2)}
    for name, values in times.items():
        if name == "baseline":
            continue
        pairs = list(zip(values, base, strict=True))
        result[name] = {
            "us": round(statistics.median(values), 2),
            "limiter_cost_us": round(statistics.median(v - b for v, b in pairs), 2),
            "statuses": statuses[name],
        }
        if ratio:
            result[name]["ratio_to_baseline"] = round(statistics.median(v / b for v, b in pairs), 3)
    return result


async def measure(requests: int, rounds: int) -> dict[str, Any]:
    apps: dict[str, Any] = {
        "app": build_app(limited=False),
        "limited app": build_app(limited=True),
        "refusing app": build_app(limited=True, limits=RateLimit(rate=0.001, burst=1)),
        "bare": bare_app,
    }
    limited_app: FastAPI = apps["limited app"]
    apps["bare, limited"] = RateLimitMiddleware(
        bare_app,
        state=limited_app.state,
        limiter=RateLimiter(100_000),
        policies=policies_of(limited_app.state.settings),
    )
    for app in apps.values():  # warm-up: middleware stacks, routes' caches
        await per_request_us(app, [], 200)
    through_app = [("baseline", "app", []), *((n, "limited app", h) for n, h in PATHS.items())]
    through_app.append(("refused_429", "refusing app", []))
    alone = [("baseline", "bare", []), *((n, "bare, limited", h) for n, h in PATHS.items())]
    return {
        "through_the_app": await paired_rounds(
            apps, through_app, requests=requests, rounds=rounds, ratio=True
        ),
        # Against an app that does nothing, a ratio means nothing: the cost alone.
        "middleware_alone": await paired_rounds(apps, alone, requests=requests, rounds=rounds, ratio=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2_000, help="requests per run")
    parser.add_argument("--rounds", type=int, default=31, help="rounds, each running every path once")
    args = parser.parse_args()
    result = {
        "requests_per_run": args.requests,
        "rounds": args.rounds,
        **asyncio.run(measure(args.requests, args.rounds)),
        **limiter_alone(args.requests * 10),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
