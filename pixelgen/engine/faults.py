"""Named points where a test can kill (or hold) the process, to prove resume after a crash there.

`PIXELGEN_FAULT=<point>@<step>` (e.g. `checkpoint@8`) makes every rank that reaches that point at that step
kill itself on the spot, as SIGKILL would; `...:rank<R>` (e.g. `startup@0:rank0`) limits it to rank R. Unset,
a point does nothing. Kill points: `step` (right after the optimizer step), `checkpoint` (this rank's checkpoint
files written, the tag not yet marked complete), `export` (no step: the first exported file written, the others
not), `fid_chunk`, `fid_chunk_write`. Hold points (`hold`): `startup` (the process group is up, nothing else has
happened; the step is the SLURM restart count), where the rank waits until a signal handler ends the wait, as a
rank slow to start would, while its peers go on into their first collective.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "PIXELGEN_FAULT"


def _armed(name: str, step: int | None) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    spec, _, rank = spec.partition(":rank")
    if rank and rank != os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")):
        return False
    return spec == (name if step is None else f"{name}@{step}")


def point(name: str, step: int | None = None) -> None:
    if _armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def hold(name: str, step: int | None = None) -> None:
    if _armed(name, step):
        print(f"pixelgen fault point: holding at {name}" + (f"@{step}" if step is not None else "")
              + " until a signal", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.5)
