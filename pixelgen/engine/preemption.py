"""The record that a job was sent a preemption signal, for the job script that requeues it.

A SLURM job's script exports PIXELGEN_PREEMPT_MARKER (a file path in the run folder, one per job) and, after
srun, requeues the job when that file exists, whatever srun's status: a preemption reaches every rank at once,
and while one rank saves and exits 75, another can be inside a collective and die of its peer's exit (gloo
raises; NCCL waits until SLURM kills it). Every handler pixelgen installs for USR2 and TERM, from the job's first
Python line (pipeline.jobstart) through the training loop's flag, calls `note` first. Unset (a local run,
`pixelgen stage`), `note` does nothing.
"""

from __future__ import annotations

import os
import signal
import time

MARKER_ENV = "PIXELGEN_PREEMPT_MARKER"


def note(signum: int) -> None:
    """Append one line (signal, rank, pid, time) to the job's marker; safe to call from a signal handler
    (plain file I/O on the main thread, nothing that takes a lock another thread could hold)."""
    path = os.environ.get(MARKER_ENV)
    if not path:
        return
    rank = os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))
    line = f"{signal.Signals(signum).name} rank {rank} pid {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # a full or read-only disk must not turn a preemption into a crash; exit 75 still requeues
