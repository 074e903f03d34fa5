"""Hand the chain of stages to submitit: local subprocesses, in-process debug, or SLURM jobs.

On SLURM every stage is submitted at once, each depending on the previous one (`afterok`); the local and
debug executors have no dependency mechanism, so the chain waits for each job before submitting the next.
Either way each job runs `StageJob`, which reloads the saved run config, so a job is a function of the
run folder alone.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import submitit

from pipeline import rundir
from pipeline.config import STAGES

EXECUTORS = ("local", "debug", "slurm")


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a submitit callable. Requeued on preemption (`checkpoint` is submitit's default: resubmit
    this object); the stage itself resumes from the run folder."""

    def __init__(self, stage: str, run_dir: str, task: int | None = None):
        self.stage = stage
        self.run_dir = run_dir
        self.task = task  # index in the stage's job array (the shard stage), else None

    def __call__(self) -> dict:
        from pipeline.stages import run_stage

        _export_distributed_env()
        cfg = rundir.load_run_config(self.run_dir)
        return run_stage(self.stage, cfg, self.run_dir, task=self.task)


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
        raise ValueError(f"unknown executor '{kind}': choose one of {EXECUTORS}")
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise FileNotFoundError("--executor slurm needs SLURM's sbatch on PATH: run from a cluster login node, "
                                "or use --executor local")
    folder = run_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # pickled jobs are code: owner only
    return submitit.AutoExecutor(folder=str(folder / "%j"), cluster=kind)


def _configure(executor, kind: str, cfg, stage: str, dependency: str | None) -> None:
    res = cfg.launch[stage]
    params = dict(name=f"pixelgen-{cfg.name}-{stage}", timeout_min=res.timeout_min, tasks_per_node=res.tasks,
                  cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb)
    if kind == "slurm":
        extra = {"kill-on-invalid-dep": "yes"}
        if dependency:
            extra["dependency"] = dependency
        params.update(gpus_per_node=res.gpus_per_task * res.tasks, slurm_additional_parameters=extra)
        if cfg.launch.partition:
            params["slurm_partition"] = cfg.launch.partition
        if cfg.launch.account:
            params["slurm_account"] = cfg.launch.account
    executor.update_parameters(**params)


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


def submit_chain(cfg, run_dir: Path, kind: str, on_done=None, echo=None) -> dict[str, dict]:
    """Submit every unfinished stage in order. Returns {stage: summary} for the stages that finished here
    (SLURM: job ids instead, the jobs run later). `echo(line)` receives local jobs' log lines live."""
    executor = make_executor(kind, cfg, run_dir)
    results: dict[str, dict] = {}
    previous = None
    for stage in [s for s in STAGES if s in cfg.stages]:
        done = rundir.marker(run_dir, stage)
        if done is not None:
            results[stage] = {**done, "skipped": True}
            if on_done:
                on_done(stage, results[stage])
            continue
        # afterok on an array's id waits for all of its tasks ("123_0" is task 0 of array 123).
        dependency = f"afterok:{previous}" if (kind == "slurm" and previous is not None) else None
        _configure(executor, kind, cfg, stage, dependency)
        tasks = cfg.shard.array_tasks if stage == "shard" else 1
        if tasks > 1:  # one job array: each task writes its own range of shards
            with executor.batch():
                jobs = [executor.submit(StageJob(stage, str(run_dir), task=t)) for t in range(tasks)]
        else:
            jobs = [executor.submit(StageJob(stage, str(run_dir)))]
        if kind == "slurm":
            results[stage] = {"job_id": jobs[0].job_id.split("_")[0]}
            previous = results[stage]["job_id"]
            continue
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
