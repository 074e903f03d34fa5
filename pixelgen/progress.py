"""Progress for long loops: a live bar on a terminal, a plain line every so often in a log file.

A SLURM job's output is a file, where a live bar prints nothing useful (or pages of carriage returns), so
off a terminal the same loop reports `desc: done/total unit (pct), rate, ETA` every `log_every_s` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Callable, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

T = TypeVar("T")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def report(items: Iterable[T], total: int, desc: str, *, unit: str = "items", enabled: bool = True,
           log_every_s: float = 30.0, extra: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield `items`, showing progress towards `total`; `extra()` adds text such as an image rate."""
    if not enabled or total == 0:
        yield from items
        return
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(desc, total=total, extra="")
            for item in items:
                yield item
                bar.update(task, advance=1, extra=extra() if extra else "")
        return
    t0 = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= log_every_s or done == total:
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = f", ETA {_duration((total - done) / rate)}" if done < total else f", took {_duration(now - t0)}"
            more = f", {extra()}" if extra else ""
            console.print(f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%){more}{eta}", soft_wrap=True)
