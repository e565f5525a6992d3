"""Per-key and per-address rate limits of the API: the token buckets (`buckets`) and the ASGI
middleware that applies them to every request (`middleware`)."""

from api.rate_limits.buckets import Decision, Policy, RateLimiter
from api.rate_limits.middleware import ANONYMOUS, RateLimitMiddleware, address_bucket, policies_of

__all__ = [
    "ANONYMOUS",
    "Decision",
    "Policy",
    "RateLimitMiddleware",
    "RateLimiter",
    "address_bucket",
    "policies_of",
]
