"""What the processes of a benchmark run cost: CPU seconds of our components, of the services
(Mosquitto, Kafka, PostgreSQL) and of the load generator, how busy the whole machine was, and peak
memory, all read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The services' processes by their command name, for the CPU each takes of the same run.
_SERVICES = {"mosquitto": "mqtt broker", "java": "kafka", "postgres": "timescaledb"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def service_cpu_seconds() -> dict[str, float]:
    """CPU seconds of the services' processes (all of a kind together), counting what exited
    children of theirs used (PostgreSQL's backends of closed connections), and of this process:
    the load generator, with the sampling and probing of the benchmark."""
    totals = dict.fromkeys(_SERVICES.values(), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name not in _SERVICES:
            continue
        fields = text.rsplit(")", 1)[1].split()
        totals[_SERVICES[name]] += sum(int(f) for f in fields[11:15]) / CLK_TCK
    times = os.times()
    # The load generator's publishers are child processes, counted once they have ended.
    totals["load generator"] = times.user + times.system + times.children_user + times.children_system
    return totals


def machine_busy_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Usage:
    """CPU seconds of each component (by name and pid), the services and the whole machine from a
    start mark."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, pids: dict[str, int]) -> None:
        self.marks = self._now(pids)

    def since(self, pids: dict[str, int]) -> dict[str, float]:
        now = self._now(pids)
        return {name: now[name] - self.marks[name] for name in self.marks}

    @staticmethod
    def _now(pids: dict[str, int]) -> dict[str, float]:
        busy, everything = machine_busy_s()
        return {
            **{name: cpu_seconds(pid) for name, pid in pids.items()},
            **service_cpu_seconds(),
            "machine busy": busy,
            "machine": everything,
        }
