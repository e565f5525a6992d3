"""A progress line for the terminal (rich, on stderr), shown only when stderr is a terminal so that
logs and pipes stay clean."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

# Messages sent, acknowledged by the broker, seconds elapsed.
Progress = Callable[[int, int, float], None]


@contextlib.contextmanager
def progress_display(label: str, duration_s: float | None) -> Iterator[Progress | None]:
    """Yields a callback that redraws the line, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
    )
    with RichProgress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=duration_s, counts="")

        def update(sent: int, acknowledged: int, elapsed: float) -> None:
            counts = f"sent {sent:,}  acked {acknowledged:,}"
            if elapsed >= 1:
                counts += f"  {sent / elapsed:,.0f}/s"
            bar.update(task, completed=min(elapsed, duration_s) if duration_s else None, counts=counts)

        yield update
