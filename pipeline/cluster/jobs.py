"""What each stage's SLURM job asks for: submitit parameters from the profile, the container's mounts and
python command, and the batch-script lines that requeue a job whose stage saved on a preemption signal."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.cluster.profile import RANKED_STAGES, ClusterProfile, tasks_per_node
from pixelgen import families

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
    """The command submitit runs in each task (`<python> -u -m submitit.core._submit FOLDER`)."""
    c = p.container
    if c.runtime == "pyxis":
        # srun resolves the executable on the host before entering the container: /usr/bin/env is on both.
        return f"/usr/bin/env {shlex.quote(c.python)}"
    if c.runtime == "apptainer":
        binds = ",".join(container_mounts(cfg, run_dir, p))
        nv = "--nv " if p.gpus_per_node else ""
        return f"apptainer exec {nv}--bind {shlex.quote(binds)} {shlex.quote(c.image)} {shlex.quote(c.python)}"
    return shlex.quote(sys.executable)  # the submitting environment, on a filesystem the nodes share


def requeue_lines(p: ClusterProfile) -> list[str]:
    """After srun: a stage that saved on a preemption signal exits 75; the batch script, outside any container,
    requeues the job, which then resumes from that checkpoint."""
    return [
        "rc=$?",
        f'if [ "$rc" -eq {EXIT_PREEMPTED} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {p.max_requeues} ]; then',
        '    echo "pixelgen: checkpoint saved on a preemption signal; requeueing job $SLURM_JOB_ID '
        f'(restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of at most {p.max_requeues})" >&2',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
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
                  setup=[f"export SUBMITIT_PREEMPT_SIGNAL={p.signal}", *p.setup], teardown=requeue_lines(p))
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
