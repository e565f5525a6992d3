"""The process's logs by name: `memory://NAME` bootstrap addresses name them, and every client
made with the same address shares the same log."""

from __future__ import annotations

from pathlib import Path

from ioc_core.bus.memory.log import DEFAULT_RETAINED, MemoryLog

SCHEME = "memory://"


def is_memory(bootstrap: str) -> bool:
    return bootstrap.startswith(SCHEME)


# By the name after the scheme ("default" for none).
_LOGS: dict[str, MemoryLog] = {}


def log_for(bootstrap: str) -> MemoryLog:
    """The process's log of that name, made on first use."""
    name = bootstrap.removeprefix(SCHEME) or "default"
    if name not in _LOGS:
        _LOGS[name] = MemoryLog()
    return _LOGS[name]


def open_log(bootstrap: str, directory: Path, *, retained: int = DEFAULT_RETAINED) -> MemoryLog:
    """Register the log of that name as one kept in `directory` (read back if it exists)."""
    name = bootstrap.removeprefix(SCHEME) or "default"
    directory.mkdir(parents=True, exist_ok=True)
    _LOGS[name] = MemoryLog(directory=directory, retained=retained)
    return _LOGS[name]


def forget(bootstrap: str) -> None:
    """Close the log of that name (its waiting sends end with `ProducerClosed`) and drop it."""
    found = _LOGS.pop(bootstrap.removeprefix(SCHEME) or "default", None)
    if found is not None:
        found.close()
