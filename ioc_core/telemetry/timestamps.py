"""Device timestamps: RFC 3339 text or epoch numbers, and the window of times accepted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ioc_core.errors import RejectedMessage
from ioc_core.telemetry.reasons import REASON_BAD_TIMESTAMP, REASON_FUTURE_TIMESTAMP
from ioc_core.telemetry.values import excerpt, finite_float

MAX_FUTURE_SKEW = timedelta(minutes=5)
# Epoch numbers above this are milliseconds (1e11 s is the year 5138).
_EPOCH_MS_THRESHOLD = 1e11
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def parse_timestamp(value: Any, *, now: datetime) -> datetime:
    """RFC 3339 with an offset, or epoch seconds or milliseconds."""
    if isinstance(value, bool):
        raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must be RFC 3339 text or an epoch number")
    if isinstance(value, int | float):
        number = finite_float(value)
        if number is None:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {excerpt(value)} is not a finite epoch number")
        seconds = number / 1000 if abs(number) >= _EPOCH_MS_THRESHOLD else number
        try:
            ts = datetime.fromtimestamp(seconds, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {excerpt(value)} is out of range") from exc
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError as exc:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value[:40]!r} is not RFC 3339") from exc
        if ts.tzinfo is None:
            raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must carry a UTC offset (e.g. +07:00 or Z)")
        try:
            ts = ts.astimezone(UTC)
        except OverflowError as exc:  # 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
            raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {value[:40]!r} is out of range") from exc
    else:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, "ts must be RFC 3339 text or an epoch number")
    return check_time(ts, now=now)


def check_time(ts: datetime, *, now: datetime) -> datetime:
    if ts > now + MAX_FUTURE_SKEW:
        raise RejectedMessage(REASON_FUTURE_TIMESTAMP, f"ts {ts.isoformat()} is more than 5 minutes ahead")
    if ts < _EARLIEST:
        raise RejectedMessage(REASON_BAD_TIMESTAMP, f"ts {ts.isoformat()} is before 2000")
    return ts
