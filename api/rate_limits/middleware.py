"""Rate limits on every request, before routing: one token bucket per API key (limits by role) and
one per client address for requests without a valid key. Over the limit the answer is 429
problem+json with `Retry-After`; every answer carries `RateLimit-Policy` and `RateLimit`
(draft-ietf-httpapi-ratelimit-headers-12). A request is one token whatever it does, so an event
stream costs one when it opens.

The buckets live in the process: N API processes together allow at most N times the limits.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Mapping

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import RESOLVED_PRINCIPAL, Principal, cached_principal, presented_key, principal_for_key
from api.problems import PROBLEM_MEDIA_TYPE
from api.rate_limits.buckets import Decision, Policy, RateLimiter
from ioc_core.settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# The problem type the draft registers for a request over its quota.
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
_SETTINGS_ADMIN_BUCKET = ("key", "IOC_ADMIN_API_KEY")


def policies_of(settings: Settings) -> dict[str, Policy]:
    """The limit of each role, and of requests without a key (`anonymous`)."""
    limits = {
        "viewer": settings.api_rate_limit_viewer,
        "operator": settings.api_rate_limit_operator,
        "admin": settings.api_rate_limit_admin,
        # A scraper asks every few seconds at most: a viewer's limit is ample.
        "metrics": settings.api_rate_limit_viewer,
        ANONYMOUS: settings.api_rate_limit_anonymous,
    }
    return {name: Policy(name, rate=limit.rate, burst=limit.burst) for name, limit in limits.items()}


@functools.lru_cache(maxsize=4096)
def address_bucket(host: str) -> tuple[str, str]:
    """The bucket of a client address: IPv4 as is, IPv6 by its /64 (what one subscriber gets, so
    hopping between its addresses gains nothing)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Not an address (a proxy's name for the client): bounded, since it is a table key.
        return ("address", host[:100])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return ("address", str(address.ipv4_mapped))
        return ("address", f"{ipaddress.IPv6Network((address, 64), strict=False).network_address}/64")
    return ("address", host)


def _host(scope: Scope) -> str:
    # The connection's peer: the servers run without uvicorn's proxy headers, so a forged
    # X-Forwarded-For cannot pick another client's bucket.
    client = scope.get("client")
    return str(client[0]) if client else ""


class RateLimitMiddleware:
    """Pure ASGI, so an event stream passes through untouched apart from its opening headers."""

    def __init__(self, app: ASGIApp, *, state: State, limiter: RateLimiter, policies: Mapping[str, Policy]):
        self.app = app
        self._state = state
        self._limiter = limiter
        self._policies = policies
        self._anonymous = policies[ANONYMOUS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy, decision = await self._decide(scope)
        if not decision.allowed:
            await _refuse(policy, decision, send)
            return
        extra = [(b"ratelimit-policy", policy.policy_header), (b"ratelimit", policy.limit_header(decision))]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)

    async def _decide(self, scope: Scope) -> tuple[Policy, Decision]:
        key = presented_key(scope["headers"])
        if key is None:
            return self._anonymous, self._take_address(scope)
        known, principal = cached_principal(self._state, key)
        if not known:
            # A key not seen lately costs a query. Keys that turn out not to be valid spend a bucket
            # of their own per address, under the anonymous limit, and once it is empty that
            # address gets no more queries: a stream of made-up keys costs the database a burst,
            # not a query per request. Requests without a key do not spend it, so a busy address
            # never keeps valid keys from being looked up.
            failed_lookups = ("failed key lookups", address_bucket(_host(scope))[1])
            refusal = self._limiter.check(failed_lookups, self._anonymous)
            if not refusal.allowed:
                return self._anonymous, refusal
            answered, principal = await self._look_up(scope, key)
            if answered and principal is None:
                self._limiter.take(failed_lookups, self._anonymous)
        if principal is None:
            return self._anonymous, self._take_address(scope)
        policy = self._policies[principal.role]
        bucket = ("key", principal.key_id) if principal.key_id else _SETTINGS_ADMIN_BUCKET
        decision = self._limiter.take(bucket, policy)
        if decision.newly_limited:
            log.warning("API key %s (%s) is over its rate limit %r", bucket[1], principal.name, policy)
        return policy, decision

    def _take_address(self, scope: Scope) -> Decision:
        bucket = address_bucket(_host(scope))
        decision = self._limiter.take(bucket, self._anonymous)
        if decision.newly_limited:
            log.info("client %s is over the rate limit of requests without a key", bucket[1])
        return decision

    async def _look_up(self, scope: Scope, key: str) -> tuple[bool, Principal | None]:
        """Whether the database answered, and who the key is (None: not a valid key)."""
        try:
            principal = await principal_for_key(self._state, key)
        except Exception:
            # The database is away (or worse): the route's own authentication meets the same
            # failure and answers it as problem+json (503 for an outage); until then this request
            # counts as one without a key.
            return False, None
        scope[RESOLVED_PRINCIPAL] = principal
        return True, principal


async def _refuse(policy: Policy, decision: Decision, send: Send) -> None:
    body = json.dumps(
        {
            "type": QUOTA_EXCEEDED,
            "title": "Too Many Requests",
            "status": 429,
            "detail": f"over the {policy.name} rate limit ({policy.rate:g} requests/s, bursts of"
            f" {policy.burst}); retry after {decision.retry_after_s} s",
            "violated-policies": [policy.name],
        }
    ).encode()
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(decision.retry_after_s).encode()),
        (b"ratelimit-policy", policy.policy_header),
        (b"ratelimit", policy.limit_header(decision)),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})
