"""Named points where a test can kill the process as SIGKILL would, to prove resume after a crash there.

`PIXELGEN_FAULT=<point>@<step>` (e.g. `checkpoint@8`) makes every rank that reaches that point at that step
kill itself on the spot; unset, `point()` does nothing. Points: `step` (right after the optimizer step),
`checkpoint` (this rank's checkpoint files written, the tag not yet marked complete), `export` (no step: the
first exported file written, the others not).
"""

from __future__ import annotations

import os
import signal

ENV = "PIXELGEN_FAULT"


def point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if spec and spec == (name if step is None else f"{name}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)
