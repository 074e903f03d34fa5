"""The cluster profile: `slurm/<name>.yaml` (or any YAML path) typed by `ClusterProfile`, found, loaded and
checked on its own (`load_profile`) and against the experiment and the cluster (`check_experiment`,
`check_partitions`) before anything is submitted."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import STAGES, ConfigError, _explain
from pixelgen.engine.config import batch_split_error

SIGNALS = ("USR2", "TERM")  # the training engine's preemption flag listens to both
RUNTIMES = ("none", "pyxis", "apptainer")
TRAIN_STAGES = ("train_trunk", "train_decoder")
RANKED_STAGES = (*TRAIN_STAGES, "fid")  # stages whose job runs one rank per GPU on nodes.<stage> nodes
# sbatch options the pipeline sets itself; a profile's `sbatch:` may not override them.
_MANAGED = {"array", "dependency", "kill-on-invalid-dep", "signal", "output", "error", "open-mode", "job-name",
            "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "mem", "time", "partition", "account",
            "qos", "requeue"}


@dataclass
class StageTimes:
    """Time limit of each stage's job, in minutes. A training job that reaches it saves and is requeued."""

    shard: int = 240
    train_trunk: int = 1440
    train_decoder: int = 1440
    fid: int = 240


@dataclass
class TrainNodes:
    """Nodes of each multi-rank stage's job (one rank per GPU on each)."""

    train_trunk: int = 1
    train_decoder: int = 1
    fid: int = 1


@dataclass
class ContainerConfig:
    runtime: str = "none"  # none | pyxis | apptainer
    image: Optional[str] = None  # pyxis: a .sqsh path or registry reference; apptainer: a .sif path
    digest: Optional[str] = None  # recorded in the run record (taken from image@sha256:... when given there)
    python: str = "python3"  # the interpreter inside the image that has pixelgen installed
    mounts: list[str] = field(default_factory=list)  # more host paths; the run folder and data paths are added


@dataclass
class ClusterProfile:
    partition: Optional[str] = None
    shard_partition: Optional[str] = None  # a CPU partition for the shard stage (default: partition)
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    tasks_per_node: Optional[int] = None  # ranks per node; default one per GPU, or 1 on CPU-only nodes
    mem_gb: int = 8  # per node
    time_min: StageTimes = field(default_factory=StageTimes)
    nodes: TrainNodes = field(default_factory=TrainNodes)
    signal: str = "USR2"  # sent `signal_lead_s` before the time limit (and on preemption, if the admin allows)
    signal_lead_s: int = 120  # must cover one step plus writing a checkpoint
    max_requeues: int = 100  # a job that keeps being preempted or timing out stops after this many requeues
    # How long a rank waits for its peers in one collective before its stage fails (pixelgen.engine.dist): keep
    # it above the cluster's SlurmdTimeout (`scontrol show config`), so that a lost node is SLURM's to handle:
    # it marks the node DOWN and requeues the job, which resumes from its last complete checkpoint.
    collective_timeout_s: int = 600
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda/12.4"
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {constraint: h100}
    # Check the run's input paths (ImageNet, shards, Inception weights) on the submitting machine first; false
    # where only the compute nodes see them.
    check_paths: bool = True
    container: ContainerConfig = field(default_factory=ContainerConfig)


def profile_dirs() -> list[Path]:
    here = Path.cwd() / "slurm"
    repo = Path(__file__).resolve().parents[2] / "slurm"  # pipeline/cluster/profile.py -> the repository
    return [here] if here.resolve() == repo else [here, repo]


def profile_path(name: str) -> Path:
    """`name` is a profile in slurm/ (`local` -> slurm/local.yaml) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"cluster profile file '{path}' does not exist")
        return path.resolve()
    for folder in profile_dirs():
        if (folder / f"{name}.yaml").is_file():
            return (folder / f"{name}.yaml").resolve()
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"cluster profile '{name}' not found (looked for {name}.yaml in "
                      f"{', '.join(str(d) for d in profile_dirs())}); profiles: {', '.join(known) or 'none'}. "
                      f"Copy slurm/example.yaml to slurm/{name}.yaml and edit it, or pass a path")


def load_profile(name: str) -> tuple[str, ClusterProfile]:
    """Returns (the profile's path, the typed profile); every problem names the file and the key."""
    path = profile_path(name)
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml errors
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterProfile), loaded or {})
    except OmegaConfBaseException as err:
        keys = ", ".join(ClusterProfile.__dataclass_fields__)
        raise _explain(err, str(path), unknown=f"the profile keys are {keys} (see slurm/example.yaml)") from None
    profile = OmegaConf.to_object(merged)
    validate_profile(profile, str(path))
    return str(path), profile


def validate_profile(p: ClusterProfile, source: str) -> None:
    def fail(key, value, why):
        raise ConfigError(f"{source}: key '{key}' = {value!r}: {why}")

    if p.signal not in SIGNALS:
        fail("signal", p.signal, f"must be one of {', '.join(SIGNALS)} (the training engine's preemption flag "
                                 "listens to these; NCCL takes USR1)")
    if p.signal_lead_s < 10:
        fail("signal_lead_s", p.signal_lead_s, "must be at least 10 s: it has to cover one step and a checkpoint")
    if p.collective_timeout_s < 10:
        fail("collective_timeout_s", p.collective_timeout_s, "must be at least 10 s: a checkpoint or a sample grid "
                                                            "on one rank keeps the others waiting that long")
    for key in ("gpus_per_node", "max_requeues"):
        if getattr(p, key) < 0:
            fail(key, getattr(p, key), "must be >= 0")
    for key in ("cpus_per_node", "mem_gb"):
        if getattr(p, key) < 1:
            fail(key, getattr(p, key), "must be >= 1")
    if p.tasks_per_node is not None and p.tasks_per_node < 1:
        fail("tasks_per_node", p.tasks_per_node, "must be >= 1 (or null: one per GPU)")
    if p.gpus_per_node and p.tasks_per_node not in (None, p.gpus_per_node):
        fail("tasks_per_node", p.tasks_per_node, f"with GPUs the engine runs one rank per GPU: leave it null or "
                                                 f"set it to gpus_per_node={p.gpus_per_node}")
    for stage in STAGES:
        if getattr(p.time_min, stage) < 1:
            fail(f"time_min.{stage}", getattr(p.time_min, stage), "must be at least 1 minute")
        if p.signal_lead_s >= 60 * getattr(p.time_min, stage):
            fail("signal_lead_s", p.signal_lead_s, f"must be shorter than time_min.{stage}")
    for stage in RANKED_STAGES:
        if getattr(p.nodes, stage) < 1:
            fail(f"nodes.{stage}", getattr(p.nodes, stage), "must be >= 1")
    clash = sorted(k for k in p.sbatch if k.replace("_", "-") in _MANAGED)
    if clash:
        fail(f"sbatch.{clash[0]}", p.sbatch[clash[0]], "the pipeline sets this option itself; use the profile's "
                                                      "own keys (partition, time_min, nodes, signal, ...)")
    c = p.container
    if c.runtime not in RUNTIMES:
        fail("container.runtime", c.runtime, f"must be one of {', '.join(RUNTIMES)}")
    if c.runtime != "none" and not c.image:
        fail("container.image", c.image, f"runtime {c.runtime} needs an image (see the README's containers section)")
    if c.runtime == "apptainer" and not Path(c.image).expanduser().is_file():
        fail("container.image", c.image, "no such .sif file on this machine; build it with `apptainer build "
                                         "pixelgen.sif docker-daemon://pixelgen:latest` on a shared filesystem")
    if c.runtime == "pyxis" and c.image.startswith(("/", "./")) and not Path(c.image).is_file():
        fail("container.image", c.image, "no such squashfs file on this machine; make it with `enroot import`")


def tasks_per_node(p: ClusterProfile) -> int:
    return p.tasks_per_node or p.gpus_per_node or 1


def world_size(p: ClusterProfile, stage: str) -> int:
    """Ranks of a training or FID stage's job (one per GPU), or 1."""
    return getattr(p.nodes, stage) * tasks_per_node(p) if stage in RANKED_STAGES else 1


def check_experiment(cfg, p: ClusterProfile, source: str) -> None:
    """The checks that need both: each training stage's global batch must split over the profile's ranks."""
    for stage in TRAIN_STAGES:
        if stage not in cfg.stages:
            continue
        tc = cfg[stage]
        why = batch_split_error(tc, world_size(p, stage))
        if why:
            raise ConfigError(f"{source}: key '{stage}.batch_size' = {tc.batch_size}: {why} (nodes.{stage} x tasks "
                              f"per node of the cluster profile); change the batch size or the profile's nodes.{stage}")


def check_partitions(p: ClusterProfile, source: str) -> None:
    """Fail before submitting when a partition does not exist (sinfo answers without accounting)."""
    wanted = {k: v for k, v in (("partition", p.partition), ("shard_partition", p.shard_partition)) if v}
    if not wanted or shutil.which("sinfo") is None:
        return
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return  # the controller will say it at submission
    have = set(out.stdout.split())
    for key, value in wanted.items():
        if value not in have:
            raise ConfigError(f"{source}: key '{key}' = {value!r}: no such partition on this cluster (sinfo lists "
                              f"{', '.join(sorted(have))})")
