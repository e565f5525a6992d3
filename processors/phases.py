"""Where a processor's batches spend their time, phase by phase, for `/metrics`.

A reading's latency through the processor is the batch in hand plus its own batch, so the phases'
seconds tell an operator (and the pipeline benchmark) what a slow batch is waiting on: the poll,
the database's writes, the detectors, or the offset commit.
"""

from __future__ import annotations

import time

from ioc_core.metrics import Metric

# In the order a batch goes through them.
PHASES = (
    "poll",  # waiting on Kafka for records (idle time included)
    "decode",  # records decoded
    "profiles",  # the devices' rules, when not cached
    "readings",  # readings, latest state and status written
    "load_state",  # detector state read (from the cache or the database) and decoded
    "detect",  # the detectors over the batch
    "save_state",  # detector state and flood station signals written
    "correlate",  # district flood correlation
    "alarms",  # findings applied to the alarms
    "transaction_commit",  # the batch's transaction committed
    "offset_commit",  # the batch's offsets committed to Kafka
)


class PhaseClock:
    """Seconds spent per phase since the process started. `lap(phase)` charges the time since the
    previous lap (or `start`) to `phase`."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._since = time.monotonic()

    def start(self) -> None:
        self._since = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] += now - self._since
        self._since = now

    def metric(self) -> Metric:
        seconds = Metric(
            "ioc_processor_batch_seconds_total", "counter", "time the processor's batches spent, by phase"
        )
        for phase, spent in self.seconds.items():
            seconds.add(round(spent, 6), phase=phase)
        return seconds
