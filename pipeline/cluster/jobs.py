"""What each stage's SLURM job asks for: submitit parameters from the profile, the container's mounts and
python command, and the batch-script lines that requeue a job whose stage saved on a preemption signal."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import image
from pipeline.cluster.profile import RANKED_STAGES, ClusterProfile, tasks_per_node
from pixelgen import families
from pixelgen.engine import dist, preemption

# `pixelgen stage` and a stage's SLURM job exit with this after saving a checkpoint on a preemption signal
# ("temporary failure, try again", sysexits.h); the job script then requeues the job.
EXIT_PREEMPTED = 75
_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def container_mounts(cfg, run_dir: Path, p: ClusterProfile) -> list[str]:
    """Host folders a containerised job needs at the same paths: the run folder, the data, the folder of every
    weights file the stages load (the family's teachers among them), and the profile's own mounts."""
    paths = [run_dir]
    for key in ("data.imagenet_dir", "data.shard_dir"):
        value = OmegaConf.select(cfg, key)
        if value:
            paths.append(Path(value))
    weights = [OmegaConf.select(cfg, key) for key in ("train_decoder.init_from", "fid.inception_weights")]
    weights += [teacher.weights for _, teacher in families.get(cfg.model.trunk.kind).teachers(cfg)]
    paths += [Path(w).parent for w in weights if w]
    paths += [Path(m).expanduser() for m in p.container.mounts]
    out: list[Path] = []
    for path in sorted({Path(os.path.abspath(x)) for x in paths}, key=lambda x: (len(x.parts), str(x))):
        if not any(path == o or o in path.parents for o in out):
            out.append(path)
    return [str(x) for x in out]


def python_command(cfg, run_dir: Path, p: ClusterProfile) -> str:
    """What submitit puts before `-u -m submitit.core._submit FOLDER` in each task: the python, then
    pipeline.jobstart, which installs the preemption handlers before anything else runs."""
    c = p.container
    start = "-u -m pipeline.jobstart"
    if c.runtime == "pyxis":
        # srun resolves the executable on the host before entering the container: /usr/bin/env is on both.
        return f"/usr/bin/env {shlex.quote(c.python)} {start}"
    if c.runtime == "apptainer":
        binds = ",".join(container_mounts(cfg, run_dir, p))
        nv = "--nv " if p.gpus_per_node else ""
        return (f"apptainer exec {nv}--bind {shlex.quote(binds)} {shlex.quote(c.image)} {shlex.quote(c.python)} "
                f"{start}")
    return f"{shlex.quote(sys.executable)} {start}"  # the submitting environment, on a filesystem the nodes share


def preempt_marker(run_dir: Path) -> str:
    """The job's preemption marker (pixelgen.engine.preemption), as the batch script spells it: one file per
    job (an array task is a job of its own), in the run folder, which every task sees at the same path."""
    return f"{shlex.quote(str(Path(run_dir) / 'submitit' / 'preempted-'))}\"$SLURM_JOB_ID\""


def setup_lines(run_dir: Path, p: ClusterProfile) -> list[str]:
    """Before srun: the signal submitit would listen to, the marker's path for every task, the submitting
    checkout's revision (a container image of another one stops the job at start, pipeline.image), then the
    profile's lines."""
    from pipeline.rundir import git_revision

    return [f"export SUBMITIT_PREEMPT_SIGNAL={p.signal}",
            f"export {preemption.MARKER_ENV}={preempt_marker(run_dir)}",
            f'rm -f "${preemption.MARKER_ENV}"',
            f"export {dist.TIMEOUT_ENV}={p.collective_timeout_s}",
            f"export {image.SUBMIT_ENV}={shlex.quote(git_revision())}", *p.setup]


def attempts_file(run_dir: Path, job_id: str) -> Path:
    """One line per run of a job (each requeue starts another), appended by its job script: array task,
    restart, seconds, srun's status and the nodes it ran on. `pixelgen status` adds them up."""
    return Path(run_dir) / "submitit" / f"attempts-{job_id}.jsonl"


def requeue_lines(p: ClusterProfile, run_dir: Path) -> list[str]:
    """After srun, in the batch script (outside any container): note this run's time, then requeue the job
    when a task was sent a preemption signal (the marker exists) or a stage saved on one (exit 75), unless srun
    succeeded; the job then resumes from what is on disk. A signal during start-up, or a rank that died of its
    peer's exit, ends here too, whatever srun's status."""
    marker = f'"${preemption.MARKER_ENV}"'
    ledger = shlex.quote(str(attempts_file(run_dir, "")).removesuffix(".jsonl")) + \
        '"${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}.jsonl"'
    fields = '{"task": %s, "restart": %s, "seconds": %s, "rc": %s, "nodes": "%s"}'
    return [
        "rc=$?",
        # $SECONDS counts from the batch script's start: this run's time (squeue's TimeUsed restarts at a requeue).
        f"printf '{fields}\\n' \"${{SLURM_ARRAY_TASK_ID:-0}}\" \"${{SLURM_RESTART_COUNT:-0}}\" \"$SECONDS\" \"$rc\" "
        f'"$SLURM_JOB_NODELIST" >> {ledger} || true',
        f'if [ "$rc" -ne 0 ] && {{ [ "$rc" -eq {EXIT_PREEMPTED} ] || [ -e {marker} ]; }} '
        f'&& [ "${{SLURM_RESTART_COUNT:-0}}" -lt {p.max_requeues} ]; then',
        f'    echo "pixelgen: preemption signal (srun exit $rc; $(cat {marker} 2>/dev/null | wc -l) signal(s) '
        f'noted); requeueing job $SLURM_JOB_ID (restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of at most '
        f'{p.max_requeues})" >&2',
        f"    rm -f {marker}",
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        f"rm -f {marker}",
        "exit $rc",
    ]


def job_parameters(cfg, run_dir: Path, p: ClusterProfile, stage: str, dependency: str | None) -> dict:
    """submitit SlurmExecutor parameters for one stage's job."""
    tasks = tasks_per_node(p) if stage in RANKED_STAGES else 1
    nodes = getattr(p.nodes, stage) if stage in RANKED_STAGES else 1
    gpus = 0 if stage == "shard" else p.gpus_per_node
    cpus = p.cpus_per_node if stage == "shard" else max(1, p.cpus_per_node // tasks_per_node(p))
    extra = {**{k.replace("_", "-"): v for k, v in p.sbatch.items()}, "requeue": True}
    # The signal goes to the srun tasks (no "B:"), where the training engine and the stage job listen.
    extra["signal"] = f"{p.signal}@{p.signal_lead_s}"
    if dependency:
        extra["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"  # a failed stage cancels its dependants instead of leaving them
    params = dict(job_name=f"pixelgen-{cfg.name}-{stage}", time=getattr(p.time_min, stage), nodes=nodes,
                  ntasks_per_node=tasks, cpus_per_task=cpus, mem=f"{p.mem_gb}GB",
                  signal_delay_s=p.signal_lead_s, additional_parameters=extra,
                  setup=setup_lines(run_dir, p), teardown=requeue_lines(p, run_dir))
    if gpus:
        params["gpus_per_node"] = gpus
    partition = (p.shard_partition or p.partition) if stage == "shard" else p.partition
    for key, value in (("partition", partition), ("account", p.account), ("qos", p.qos)):
        if value:
            params[key] = value
    if p.container.runtime == "pyxis":
        params["srun_args"] = [f"--container-image={p.container.image}",
                               "--container-mounts=" + ",".join(f"{m}:{m}" for m in container_mounts(cfg, run_dir, p)),
                               "--no-container-mount-home"]
    return params


def secret_names(environ=os.environ) -> list[str]:
    """Names (never values) of the secrets a job inherits from the environment, e.g. WANDB_API_KEY."""
    return sorted(k for k in environ if any(h in k.upper() for h in _SECRET_HINTS) and not k.startswith("SLURM_"))
