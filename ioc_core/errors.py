"""One error hierarchy for the whole system.

Every error says whether retrying the same operation later can succeed (`retriable`), so that
callers decide between backing off and dead-lettering without guessing from exception types.
"""

from __future__ import annotations


class IocError(Exception):
    """Base of every error raised on purpose by this project."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigurationError(IocError):
    """A setting is missing or malformed; fixing the environment is the only cure."""


class ServiceUnavailableError(IocError):
    """A dependency (broker, Kafka, database) cannot be reached right now.

    The message is for the operator's log and may say where the dependency is (host, port,
    database); `public` says only which dependency, for what leaves the system: API answers and
    `/ready`, which anyone who reaches the port can read."""

    retriable = True

    def __init__(self, message: str, *, public: str | None = None, retriable: bool | None = None) -> None:
        super().__init__(message, retriable=retriable)
        self.public = public or "a service this depends on is unavailable"


class StorageError(IocError):
    """The database refused an operation for a reason other than being unreachable."""


class NotFoundError(IocError):
    """The named object does not exist (or is outside the caller's scope)."""


class ConflictError(IocError):
    """The object already exists or the change contradicts the current state."""


class RejectedMessage(IocError):
    """A message from a device that cannot be accepted as telemetry.

    `reason` is a stable machine-readable code used for dead letters and counters;
    the message text is for people.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", retriable=False)
        self.reason = reason
        self.detail = detail


class ValidationError(IocError):
    """A request names something that does not exist in that place (a metric its domain does not
    measure, an unknown aggregate) or asks for something malformed; asking differently is the cure."""
