"""One rank that meets its peers through `init_distributed`, runs the kinds of collectives a stage runs, and
ends the way a stage's process does (returns from main, the interpreter exits), saying at the very end whether
any process group was left for the interpreter's teardown:

    python -m tests.exit_worker [--no-shutdown]

--no-shutdown takes `dist.shutdown` back off atexit, which is how every process ended before it existed (the
side-by-side case in benchmarks/exit_stress.py). Torch's distributed variables come from the caller.
"""

from __future__ import annotations

import atexit
import sys

import torch

from pixelgen.engine import dist


def _report() -> None:
    # Registered before init_distributed registers its shutdown, so it runs after it (atexit is last-in, first-out).
    print(f"process groups left at exit: {torch.distributed.is_initialized()}", flush=True)


def main(argv: list[str]) -> int:
    atexit.register(_report)
    info = dist.init_distributed()
    if "--no-shutdown" in argv:
        atexit.unregister(dist.shutdown)
    x = torch.ones(4096)
    gathered = torch.empty(4096 * info.world_size)
    for _ in range(10):
        torch.distributed.all_reduce(x)
        torch.distributed.all_gather_into_tensor(gathered, x, async_op=True).wait()
    states = [None] * info.world_size
    torch.distributed.all_gather_object(states, {"rank": info.rank})
    dist.barrier()
    print(f"rank {info.rank} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
