"""The end of a multi-rank process, many times over, side by side: with `dist.shutdown` (the process groups
destroyed at exit, as every pixelgen process now does) and without it (how every process ended before).

    .venv/bin/python benchmarks/exit_stress.py [--jobs 150] [--world 2] [--write-docs]

Each job is `--world` ranks of tests/exit_worker.py (the real `init_distributed`: DeepSpeed's gloo set-up and
its shared-memory all-reduce, then all-reduces, async all-gathers, an object gather and a barrier) started
together on one free port; the two variants alternate job by job, so both see the same machine load. A
process that printed its last line and then exited non-zero (-6 is the abort "terminate called without an
active exception") is counted against its variant.

Prints progress to stderr and a markdown section to stdout; --write-docs replaces the block between
<!-- exit_stress:start --> and <!-- exit_stress:end --> in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import git_commit, log, machine, write_section  # noqa: E402

VARIANTS = {"shutdown at exit (now)": [], "no shutdown (before)": ["--no-shutdown"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(world: int, args: list[str]) -> list[tuple[int, str]]:
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIXELGEN_FAULT"))}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.exit_worker", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=150, help="jobs per variant (default 150)")
    ap.add_argument("--world", type=int, default=2, help="ranks per job (default 2)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()

    codes = {name: collections.Counter() for name in VARIANTS}
    retried = 0
    t0 = time.time()
    for i in range(args.jobs):
        for name, flags in VARIANTS.items():
            for _ in range(3):
                results = job(args.world, flags)
                # A port taken between choosing and binding it is the test machine's race, not an exit.
                if not any(code and "EADDRINUSE" in out for code, out in results):
                    break
                retried += 1
            for code, out in results:
                key = 0 if code == 0 else f"{code} {'after' if ' done' in out else 'before'} its last line"
                codes[name][key] += 1
        if (i + 1) % 10 == 0:
            log(f"{i + 1}/{args.jobs} jobs per variant, {time.time() - t0:.0f} s: "
                + "; ".join(f"{n}: {dict(c)}" for n, c in codes.items()))

    processes = args.jobs * args.world
    rows = ["| variant | processes | exit 0 | other exits |", "|---|---|---|---|"]
    for name, c in codes.items():
        other = ", ".join(f"{n} x {k}" for k, n in sorted(c.items(), key=str) if k != 0) or "none"
        rows.append(f"| {name} | {processes} | {c[0]} | {other} |")
    body = "\n".join([
        f"Measured {datetime.date.today()} on {machine()}, commit {git_commit()}, "
        f"`.venv/bin/python benchmarks/exit_stress.py --jobs {args.jobs} --world {args.world}` "
        f"({time.time() - t0:.0f} s; {retried} jobs restarted for a taken port). {args.jobs} jobs of "
        f"{args.world} ranks per variant, alternating, each rank through `init_distributed`, collectives and "
        "a normal exit.", "", *rows])
    print(body)
    if args.write_docs:
        write_section(body, "## Multi-rank process exit", "exit_stress")


if __name__ == "__main__":
    main()
