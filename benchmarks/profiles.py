"""py-spy profiles of the benchmark's component processes: sampling while a phase runs, and the
hottest functions of what was sampled."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path


@contextlib.contextmanager
def profiled(pids: Mapping[str, int], directory: Path | None) -> Iterator[None]:
    """py-spy sampling each named process into `directory/<name>.txt` while the block runs; nothing
    without a directory, or without py-spy in the virtualenv or on the path."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if directory is None or not Path(spy).exists():
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    samplers = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(directory / f"{name}.txt"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)
        for sampler in samplers:
            sampler.wait(60)


def hottest(path: Path, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks: the functions with the most samples on the CPU (self) and
    under them (total), as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            under[frame] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(n / max(total, 1), 3)) for name, n in counter.most_common(top)]

    return {"self": share(own), "total": share(under)}


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').rsplit(':', 1)[0]).name})" if where else name
