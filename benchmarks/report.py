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
    """The short HEAD, flagged when `paths` have uncommitted changes (the numbers are then of the working tree);
    "unknown" where git is missing (the GPU machine may have none)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=all", "--", *paths)
    return f"{rev} + uncommitted changes to {', '.join(p + '/' for p in paths)}" if dirty else rev


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {mem:.0f} GB, no GPU"


def replace_section(text: str, body: str, heading: str, tag: str) -> str:
    """`text` with the block between <!-- TAG:start --> and <!-- TAG:end --> replaced by `body` (everything
    outside the markers kept as it is), or with `heading` and a new marked block appended when they are missing."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"


def write_section(body: str, heading: str, tag: str) -> None:
    """`replace_section` on docs/benchmarks.md."""
    DOC.write_text(replace_section(DOC.read_text(), body, heading, tag))
    log(f"wrote the section between <!-- {tag}:start --> and <!-- {tag}:end --> in {DOC}")
