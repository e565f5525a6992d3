"""Figures measured by the tests, printed at the end of the run."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Figures:
    latencies_s: dict[str, float] = field(default_factory=dict)
    # Free-form lines measured by other tests, printed as they are.
    lines: list[str] = field(default_factory=list)


FIGURES = Figures()


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    yield FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES.latencies_s and not FIGURES.lines:
        return
    terminalreporter.section("measured figures")
    for line in FIGURES.lines:
        terminalreporter.write_line(line)
    if not FIGURES.latencies_s:
        return
    values = sorted(FIGURES.latencies_s.values())
    for name, seconds in sorted(FIGURES.latencies_s.items()):
        terminalreporter.write_line(f"publish -> API latency, {name}: {seconds * 1000:.0f} ms")
    terminalreporter.write_line(
        f"publish -> API latency over {len(values)} readings:"
        f" median {statistics.median(values) * 1000:.0f} ms, worst {values[-1] * 1000:.0f} ms"
    )
