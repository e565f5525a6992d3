"""Token buckets, one per API key or client address, in a table of bounded size.

A bucket holds up to `burst` tokens and gains `rate` a second; a request takes one or is refused.
Time comes from the clock the table is given, so tests drive it by hand. A bucket that has filled
up again behaves exactly like one that was never made, which is what lets idle ones go.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

# Refilled buckets dropped per new bucket at most, so that one request after a long quiet spell
# never pays for sweeping the whole table (the size cap holds meanwhile).
_SWEEP_PER_INSERT = 64


class Policy:
    """A named limit, with its `RateLimit-Policy` item (draft-ietf-httpapi-ratelimit-headers-12).

    The item says `q` = `burst` requests per window of `w` = burst / rate seconds, which states
    both the burst and the sustained rate in the draft's terms."""

    __slots__ = ("burst", "name", "policy_header", "rate")

    def __init__(self, name: str, *, rate: float, burst: int) -> None:
        if not name.isascii() or not name.isalpha():
            raise ValueError(f"a policy name is a few letters, not {name!r}")
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"policy {name}: rate must be positive and burst at least 1")
        self.name = name
        self.rate = float(rate)
        self.burst = burst
        window_s = max(1, round(burst / rate))
        self.policy_header = f'"{name}";q={burst};w={window_s}'.encode()

    def limit_header(self, decision: Decision) -> bytes:
        """The `RateLimit` item: `a` requests available now, effective window `w` seconds."""
        return f'"{self.name}";a={decision.available};w={decision.window_s}'.encode()

    def __repr__(self) -> str:
        return f"Policy({self.name!r}, rate={self.rate:g}/s, burst={self.burst})"


class Decision(NamedTuple):
    """`allowed`, and what the client may know: `available` whole requests left now; `window_s`
    seconds until the bucket is full again (allowed) or until the next request may pass (refused,
    equal to `retry_after_s`); `newly_limited` on the first refusal after a request passed.
    (A named tuple: one is made per request, and it is the cheapest immutable record.)"""

    allowed: bool
    available: int
    window_s: int
    retry_after_s: int = 0
    newly_limited: bool = False


class _Bucket:
    __slots__ = ("full_at", "limited", "tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now
        self.full_at = now
        self.limited = False


class RateLimiter:
    """The buckets of one process, least recently used first. At most `max_buckets` are kept:
    buckets that have refilled are dropped as new ones come; past the cap the least recently used
    goes even if it has not refilled (its owner then starts again from a full bucket)."""

    def __init__(self, max_buckets: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._max = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()
        # Buckets dropped before they had refilled, because the table was full.
        self.evicted = 0
        self.refused: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, policy: Policy) -> Decision:
        """Take one token from `key`'s bucket under `policy`, or say how long until one is there."""
        return self._take(key, policy, spend=True)

    def check(self, key: Hashable, policy: Policy) -> Decision:
        """As `take` would decide, without taking the token when there is one."""
        return self._take(key, policy, spend=False)

    def _take(self, key: Hashable, policy: Policy, *, spend: bool) -> Decision:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = _Bucket(float(policy.burst), now)
        else:
            self._buckets.move_to_end(key)
        elapsed = now - bucket.updated
        tokens = bucket.tokens
        if elapsed > 0:
            tokens = min(float(policy.burst), tokens + elapsed * policy.rate)
            bucket.updated = now
        if tokens >= 1:
            if spend:
                tokens -= 1
            bucket.tokens = tokens
            bucket.limited = False
            refill_s = (policy.burst - tokens) / policy.rate
            bucket.full_at = now + refill_s
            return Decision(True, int(tokens), max(1, math.ceil(refill_s)))
        bucket.tokens = tokens
        bucket.full_at = now + (policy.burst - tokens) / policy.rate
        newly_limited = not bucket.limited
        bucket.limited = True
        self.refused[policy.name] += 1
        wait_s = max(1, math.ceil((1 - tokens) / policy.rate))
        return Decision(False, 0, wait_s, retry_after_s=wait_s, newly_limited=newly_limited)

    def _make_room(self, now: float) -> None:
        buckets = self._buckets
        for _ in range(_SWEEP_PER_INSERT):
            if not buckets:
                break
            oldest_key = next(iter(buckets))
            if buckets[oldest_key].full_at > now:
                break
            del buckets[oldest_key]
        if len(buckets) >= self._max:
            buckets.popitem(last=False)
            self.evicted += 1
