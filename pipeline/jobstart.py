"""The first Python of every SLURM job pixelgen submits: preemption handlers, then submitit's job runner.

The job's command is `<python> -u -m pipeline.jobstart -u -m submitit.core._submit FOLDER` (submitit appends
everything from the second `-u`). Before this, a USR2 or TERM during the interpreter's start-up, the imports
or the unpickling of the job killed the task with the signal, and srun reported a failure. Here a signal
before the stage starts is noted for the job script (pixelgen.engine.preemption) and ends the task with exit
75: nothing has run that needs saving, and the script requeues. submitit's own handlers (rank 0 checkpoints
and calls `scontrol requeue` from inside the handler, which races the other ranks and needs SLURM's tools in
the container) are not installed; `StageJob` installs the stage's handlers when it starts. In a container
image, a job submitted from a checkout at another revision than the image's stops here (pipeline.image).
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline import image
from pixelgen.engine import preemption

EXIT_PREEMPTED = 75  # pipeline.cluster.EXIT_PREEMPTED, not imported: this module stays light until the handlers are in


def _before_the_stage(signum, frame):
    preemption.note(signum)
    sys.stderr.write(f"pixelgen: signal {signal.Signals(signum).name} before the stage started; exit "
                     f"{EXIT_PREEMPTED} for the job script to requeue\n")
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)


def main(argv: list[str]) -> None:
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, _before_the_stage)
    if argv[:3] != ["-u", "-m", "submitit.core._submit"] or len(argv) != 4:
        raise SystemExit(f"pipeline.jobstart expects `-u -m submitit.core._submit FOLDER` (submitit's job "
                         f"command), got {argv}")
    problem = image.check_job()  # before the job's pickle, which names the submitting checkout's code
    if problem:
        sys.stderr.write(f"pixelgen: {problem}\n")
        sys.stderr.flush()
        raise SystemExit(image.EXIT_MISMATCH)
    from submitit.core import job_environment, submission

    # Keep ours until StageJob installs the stage's own (see the module docstring).
    job_environment.JobEnvironment._handle_signals = lambda self, paths, submission: None
    submission.process_job(argv[3])


if __name__ == "__main__":
    main(sys.argv[1:])
