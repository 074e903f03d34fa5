"""What the benchmarks that write a section of docs/benchmarks.md share: where it ran, at which commit, and how
a section between two markers is replaced. Imported by the scripts in this folder (run as
`python benchmarks/NAME.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit(paths: tuple[str, ...] = ("pixelgen", "pipeline", "configs")) -> str:
    """The short HEAD, flagged when `paths` have uncommitted changes (the numbers are then of the working tree)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=all", "--", *paths)
    return f"{rev} + uncommitted changes to {', '.join(p + '/' for p in paths)}" if dirty else rev


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {mem:.0f} GB, no GPU"


def write_section(body: str, heading: str, tag: str) -> None:
    """Replace the block between <!-- TAG:start --> and <!-- TAG:end --> in docs/benchmarks.md with `body`, or
    append it under `heading` when the markers are missing."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    text = DOC.read_text()
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    DOC.write_text(text)
    log(f"wrote the section between {start} and {end} in {DOC}")
