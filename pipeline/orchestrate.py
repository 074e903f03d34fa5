"""Hand the chain of stages to submitit: local subprocesses, in-process debug, or SLURM jobs.

On SLURM (`submit_slurm`) every unfinished stage is submitted at once, each depending on the previous one
(`afterok`, with invalid dependencies killed), and a run record names the jobs; `pipeline.cluster` turns the
cluster profile into each job's parameters. The local and debug executors have no dependency mechanism, so
`submit_chain` waits for each job before submitting the next. Either way each job runs `StageJob`, which
reloads the saved run config, so a job is a function of the run folder alone.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import submitit

from pipeline import cluster, rundir
from pipeline.config import STAGES
from pixelgen.engine import preemption

EXECUTORS = ("local", "debug")


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit callable. Requeued on preemption (`checkpoint` is submitit's default: resubmit
    this object); the stage itself resumes from the run folder."""

    def __init__(self, stage: str, run_dir: str, task: int | None = None):
        self.stage = stage
        self.run_dir = run_dir
        self.task = task  # index in the stage's job array (the shard stage), else None

    def __call__(self) -> dict:
        from pipeline.stages import StagePreempted, run_stage

        _export_distributed_env()
        on_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        if on_slurm:
            _announce(self.stage)
            _preempt_outside_training()
        cfg = rundir.load_run_config(self.run_dir)
        try:
            return run_stage(self.stage, cfg, self.run_dir, task=self.task)
        except StagePreempted as err:
            if not on_slurm:
                raise
            # No result file: the job is not over. The job script sees the status and requeues the job.
            print(f"pixelgen: {err}", file=sys.stderr, flush=True)
            sys.exit(cluster.EXIT_PREEMPTED)


class EvalJob(submitit.helpers.Checkpointable):
    """One point of `pixelgen eval --cluster` (a task of its job array): scored into the run's eval/ folder,
    requeued on preemption like a stage, going on from the chunks on disk."""

    def __init__(self, run_dir: str, point: dict):
        self.run_dir = run_dir
        self.point = point

    def __call__(self) -> list[dict]:
        from pipeline import evaluate
        from pipeline.stages import StagePreempted

        _export_distributed_env()
        _announce("eval")
        _preempt_outside_training()
        cfg = rundir.load_run_config(self.run_dir)
        try:
            return evaluate.run_points(cfg, Path(self.run_dir), [evaluate.EvalPoint(**self.point)])
        except StagePreempted as err:
            print(f"pixelgen: {err}", file=sys.stderr, flush=True)
            sys.exit(cluster.EXIT_PREEMPTED)


def _announce(stage: str) -> None:
    """One line per job start in the job's log: which stage, which restart, which secrets arrived (by name)."""
    if os.environ.get("SLURM_PROCID", "0") != "0":
        return
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    secrets = ", ".join(cluster.secret_names()) or "none"
    print(f"pixelgen: stage {stage}, SLURM job {os.environ.get('SLURM_JOB_ID')} on {os.environ.get('SLURMD_NODENAME')}"
          f", restart {restarts}; secrets from the environment: {secrets}", file=sys.stderr, flush=True)


def _preempt_outside_training() -> None:
    """Replace submitit's handlers (rank 0 requeues from inside the signal handler, which needs `scontrol` in
    the container and races the other ranks): a preemption signal stops the stage with StagePreempted, exit
    75, and the job script requeues. The training engine installs its own flag handler while it trains, so
    a signal there saves a checkpoint first."""
    from pipeline.stages import StagePreempted

    def handler(signum, frame):
        preemption.note(signum)
        raise StagePreempted(f"signal {signal.Signals(signum).name} outside the training loop; the stage "
                             f"resumes from what is on disk when the job comes back")

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, handler)


def _export_distributed_env() -> None:
    """Torch's distributed variables for a multi-task job of submitit's local executor.

    Under SLURM nothing is exported: each task is an srun task and pixelgen.engine.dist reads SLURM's own
    variables. The local executor's tasks have no such variables, so they get torch's from submitit."""
    if "RANK" in os.environ:
        return
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (the debug executor runs in this process)
        return
    # Asked of submitit (SUBMITIT_EXECUTOR) rather than of SLURM_JOB_ID: a local job started from inside a
    # SLURM allocation (salloc, an interactive srun shell) inherits SLURM's variables but still needs these.
    if env.cluster == "slurm":
        return
    if env.num_tasks > 1:
        # DeepSpeed selects the device from LOCAL_RANK itself; narrowing CUDA_VISIBLE_DEVICES would break it.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def make_executor(kind: str, cfg, run_dir: Path):
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor '{kind}': choose one of {EXECUTORS}, or --cluster NAME for SLURM")
    return submitit.AutoExecutor(folder=str(_submitit_folder(run_dir) / "%j"), cluster=kind)


def _submitit_folder(run_dir: Path) -> Path:
    folder = Path(run_dir) / "submitit"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # pickled jobs are code: owner only
    return folder


def _configure(executor, cfg, stage: str) -> None:
    res = cfg.launch[stage]
    executor.update_parameters(name=f"pixelgen-{cfg.name}-{stage}", timeout_min=res.timeout_min,
                               tasks_per_node=res.tasks)


def _stream_logs(job, echo, poll_s: float = 0.5) -> None:
    """Show a local job's log lines (rank 0) as they are written, so a long stage is not silent."""
    paths = [Path(job.paths.stdout), Path(job.paths.stderr)]
    offsets = dict.fromkeys(paths, 0)

    def pump(final: bool = False):
        for path in paths:
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(offsets[path])
                chunk = f.read()
            if not final:  # a line still being written waits for its newline
                chunk = chunk[:chunk.rfind(b"\n") + 1]
            offsets[path] += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                if line.strip() and not _NOISE.search(line):
                    echo(line)

    while not job.done():
        pump()
        time.sleep(poll_s)
    pump(final=True)


# Lines that say nothing to a person watching a run: DeepSpeed's per-rank info logs, submitit's own, and
# DeepSpeed's warning about our own optimizer (SkippingAdamW, a torch AdamW it has not vetted by name).
_NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d .*\] \[(INFO|DEBUG)\]|^submitit INFO|No CUDA runtime is found|"
                    r"Setting accelerator to CPU|deepspeed_shm_comm_op built|_do_optimizer_sanity_check")


def _array_tasks(cfg, stage: str) -> int:
    return cfg.shard.array_tasks if stage == "shard" else 1


def _submit_stage(executor, stage: str, run_dir: Path, tasks: int) -> list:
    """One job, or for `tasks` > 1 one job array in which each task writes its own range of shards."""
    if tasks > 1:
        with executor.batch():  # submitted as one array when the block ends
            jobs = [executor.submit(StageJob(stage, str(run_dir), task=t)) for t in range(tasks)]
        return jobs
    return [executor.submit(StageJob(stage, str(run_dir)))]


def submit_chain(cfg, run_dir: Path, kind: str, on_done=None, echo=None) -> dict[str, dict]:
    """Run every unfinished stage in order on this machine. Returns {stage: summary}. `echo(line)` receives
    local jobs' log lines live."""
    executor = make_executor(kind, cfg, run_dir)
    results: dict[str, dict] = {}
    for stage in [s for s in STAGES if s in cfg.stages]:
        done = rundir.marker(run_dir, stage)
        if done is not None:
            results[stage] = {**done, "skipped": True}
            if on_done:
                on_done(stage, results[stage])
            continue
        _configure(executor, cfg, stage)
        jobs = _submit_stage(executor, stage, run_dir, _array_tasks(cfg, stage))
        outcomes = []
        for job in jobs:
            try:
                if echo:
                    _stream_logs(job, echo)
                outcomes.append(job.results()[0])  # one entry per task; rank 0's is the summary
            except submitit.core.utils.FailedJobError as err:
                raise StageFailed(stage, job, err) from None
            except KeyboardInterrupt:
                # A local job outlives its submitter; left running, it would race the rerun that resumes it.
                for j in jobs:
                    j.cancel(check=False)
                raise
        # Of an array, the task that finished the stage returns its summary; the others report their part.
        complete = [o for o in outcomes if not o.get("incomplete")]
        if not complete:
            raise RuntimeError(f"all {len(jobs)} tasks of stage '{stage}' ended but none completed it (no "
                               f"{rundir.MARKER}); rerun the same command to finish it")
        results[stage] = complete[0]
        if on_done:
            on_done(stage, results[stage])
    return results


class StageFailed(RuntimeError):
    def __init__(self, stage: str, job, err: Exception):
        self.stage = stage
        self.log = str(getattr(job.paths, "stderr", ""))
        last = str(err).strip().splitlines()
        tail = "\n".join(last[-12:])
        super().__init__(f"stage '{stage}' failed (job {job.job_id}; log {self.log}):\n{tail}")


class SubmissionError(RuntimeError):
    """sbatch refused a stage's job; the stages before it are queued and listed in the run record."""


# How sbatch's refusal reaches us: submitit raises FailedJobError with sbatch's stderr when sbatch exits non-zero
# (caused by the CalledProcessError), and FailedSubmissionError when it finds no job id in sbatch's output.
# Anything else raised while submitting is not sbatch's answer and keeps its traceback.
_REFUSED = (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError)


class _ScriptWriter(submitit.SlurmExecutor):
    """A SlurmExecutor that only renders job scripts (`--dry-run`). submitit's refuses to exist without `srun`
    on PATH, but writing a script to read needs no Slurm client: a laptop can inspect what a cluster would get."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def submit_slurm(cfg, run_dir: Path, profile_path: str, profile: cluster.ClusterProfile, command: str = "run",
                 dry_run: bool = False) -> dict[str, dict]:
    """Submit every unfinished stage at once, each `afterok` on the one before (an array's id waits for all
    its tasks). Returns {stage: {"job_id", "tasks"}} (dry run: {"script"} instead, nothing submitted) and
    appends the submission to the run record."""
    run_dir = Path(run_dir)
    folder = _submitit_folder(run_dir)
    python = cluster.python_command(cfg, run_dir, profile)
    jobs: dict[str, dict] = {}
    previous = None
    try:
        for stage in [s for s in STAGES if s in cfg.stages]:
            if rundir.marker(run_dir, stage) is not None:
                continue
            dependency = f"afterok:{previous}" if previous else None
            if dry_run and previous:
                dependency = f"afterok:<job id of {previous}>"
            kind = _ScriptWriter if dry_run else submitit.SlurmExecutor
            executor = kind(folder=folder / "%j", python=python, max_num_timeout=0)
            executor.update_parameters(**cluster.job_parameters(cfg, run_dir, profile, stage, dependency))
            tasks = _array_tasks(cfg, stage)
            if dry_run:
                jobs[stage] = {"script": str(_write_script(executor, folder, stage, tasks))}
                previous = stage
                continue
            submitted = _submit_stage(executor, stage, run_dir, tasks)
            jobs[stage] = {"job_id": submitted[0].job_id.split("_")[0], "tasks": tasks}
            previous = jobs[stage]["job_id"]
    except _REFUSED as err:  # sbatch's own message names what it refused
        queued = ", ".join(f"{name} {job['job_id']}" for name, job in jobs.items())
        hint = (f"; already queued: {queued} (pixelgen cancel {run_dir}, fix the cause, then pixelgen resume "
                f"{run_dir})") if jobs and not dry_run else ""
        raise SubmissionError(f"the job of stage '{stage}' was not submitted: {str(err).strip()}{hint}") from err
    finally:
        if jobs and not dry_run:
            cluster.add_submission(run_dir, cfg, command, profile_path, profile, jobs)
    return jobs


def submit_eval(cfg, run_dir: Path, profile_path: str, profile: cluster.ClusterProfile, points: list[dict]) -> str:
    """One job array, a task per point, with the FID stage's resources; recorded in the run record as `eval`."""
    executor = submitit.SlurmExecutor(folder=_submitit_folder(run_dir) / "%j",
                                      python=cluster.python_command(cfg, run_dir, profile), max_num_timeout=0)
    params = cluster.job_parameters(cfg, run_dir, profile, "fid", None)
    executor.update_parameters(**{**params, "job_name": f"pixelgen-{cfg.name}-eval"})
    try:
        with executor.batch():
            jobs = [executor.submit(EvalJob(str(run_dir), point)) for point in points]
    except _REFUSED as err:
        raise SubmissionError(f"the evaluation's job array was not submitted: {str(err).strip()}") from err
    job_id = jobs[0].job_id.split("_")[0]
    cluster.add_submission(run_dir, cfg, "eval", profile_path, profile, {"eval": {"job_id": job_id,
                                                                                 "tasks": len(points)}})
    return job_id


def _write_script(executor, folder: Path, stage: str, tasks: int) -> Path:
    """The job script sbatch would get, written for reading (`--dry-run`)."""
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                               map_count=tasks if tasks > 1 else None, **executor.parameters)
    path = folder / "dry-run" / f"{stage}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path
