"""Python's cyclic garbage collector set for a streaming component.

The gateway and the processor keep a large working set for as long as they run (the registry's
routes, device profiles, cached detector state) and stream many short-lived objects through it (a
batch's records, readings and rows). With CPython's default thresholds the youngest generation is
collected every 700 allocations, so a batch that takes a fraction of a second outlives several
collections and is promoted whole to the oldest generation; the full collections that follow walk
the entire working set. Measured at 100,000 devices the processor ran one every second or so, each
0.1-0.25 s with nothing to free: a tenth to a fifth of its time, and a stall for every reading
behind it.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

# Allocations between collections of the youngest generation: more than a batch makes, so that its
# objects are gone before a collection would promote them.
YOUNG_THRESHOLD = 50_000


def settle() -> None:
    """Call once a component has started: what it built until now (modules, clients, what it
    loaded at start) lives as long as the process, so it is moved out of the collector's sight
    (`gc.freeze`); from now on the youngest generation is collected every `YOUNG_THRESHOLD`
    allocations. The older generations keep their defaults."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.debug("collector settled: %d objects frozen", gc.get_freeze_count())
