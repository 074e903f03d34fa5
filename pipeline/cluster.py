"""Cluster profiles and the SLURM side of a run: what each stage's job asks for, the container it runs in, the
run record, and the state of a run's jobs read from squeue and the run folder (no sacct needed).

A profile is `slurm/<name>.yaml` (or any YAML path) typed by `ClusterProfile`; `--cluster NAME` selects it.
The experiment config says what to train; the profile says where: partition, GPUs per node, nodes per
training stage, time limits, the preemption signal, the container.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import pixelgen
from pipeline.config import STAGES, ConfigError, config_hash
from pixelgen.io import atomic_write_json, read_json

RECORD = "run_record.json"
# `pixelgen stage` and a stage's SLURM job exit with this after saving a checkpoint on a preemption signal
# ("temporary failure, try again", sysexits.h); the job script then requeues the job.
EXIT_PREEMPTED = 75
SIGNALS = ("USR2", "TERM")  # the training engine's preemption flag listens to both
RUNTIMES = ("none", "pyxis", "apptainer")
TRAIN_STAGES = ("train_trunk", "train_decoder")
# sbatch options the pipeline sets itself; a profile's `sbatch:` may not override them.
_MANAGED = {"array", "dependency", "kill-on-invalid-dep", "signal", "output", "error", "open-mode", "job-name",
            "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "mem", "time", "partition", "account",
            "qos", "requeue"}
_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


@dataclass
class StageTimes:
    """Time limit of each stage's job, in minutes. A training job that reaches it saves and is requeued."""

    shard: int = 240
    train_trunk: int = 1440
    train_decoder: int = 1440
    fid: int = 240


@dataclass
class TrainNodes:
    train_trunk: int = 1
    train_decoder: int = 1


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
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda/12.4"
    sbatch: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {constraint: h100}
    container: ContainerConfig = field(default_factory=ContainerConfig)


# ------------------------------------------------------------------------------------------------ profiles
def profile_dirs() -> list[Path]:
    here = Path.cwd() / "slurm"
    repo = Path(__file__).resolve().parent.parent / "slurm"
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
        key = getattr(err, "full_key", None) or "?"
        msg = (getattr(err, "msg", None) or str(err)).split("\n")[0]
        if "not in" in msg:
            raise ConfigError(f"{path}: unknown key '{key}': the profile keys are "
                              f"{', '.join(ClusterProfile.__dataclass_fields__)} (see slurm/example.yaml)") from None
        raise ConfigError(f"{path}: bad value for key '{key}': {msg}") from None
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
    for stage in TRAIN_STAGES:
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
    """Ranks of a training stage's job (one per GPU), or 1."""
    return getattr(p.nodes, stage) * tasks_per_node(p) if stage in TRAIN_STAGES else 1


def check_experiment(cfg, p: ClusterProfile, source: str) -> None:
    """The checks that need both: each training stage's global batch must split over the profile's ranks."""
    for stage in TRAIN_STAGES:
        if stage not in cfg.stages:
            continue
        tc, world = cfg[stage], world_size(p, stage)
        if tc.batch_size % (tc.grad_accum * world):
            raise ConfigError(f"{source}: key '{stage}.batch_size' = {tc.batch_size}: must be divisible by "
                              f"grad_accum x ranks = {tc.grad_accum} x {world} (nodes.{stage} x tasks per node "
                              f"of the cluster profile); change the batch size or the profile's nodes.{stage}")


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


# ---------------------------------------------------------------------------------------------- job scripts
def container_mounts(cfg, run_dir: Path, p: ClusterProfile) -> list[str]:
    """Host folders a containerised job needs at the same paths: the run folder, the data, every weights file's
    folder, and the profile's own mounts."""
    paths = [run_dir]
    for key in ("data.imagenet_dir", "data.shard_dir"):
        value = OmegaConf.select(cfg, key)
        if value:
            paths.append(Path(value))
    for key in ("train_decoder.init_from", "fid.inception_weights", "model.repa.teacher.weights",
                "model.trunk.student.teacher.weights"):
        value = OmegaConf.select(cfg, key)
        if value:
            paths.append(Path(value).parent)
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
    tasks = tasks_per_node(p) if stage in TRAIN_STAGES else 1
    nodes = getattr(p.nodes, stage) if stage in TRAIN_STAGES else 1
    gpus = {"shard": 0, "fid": min(1, p.gpus_per_node)}.get(stage, p.gpus_per_node)
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


def image_identity(p: ClusterProfile) -> dict | None:
    """What the run record says about the container: image, digest when known (from the profile or an
    image@sha256:... reference), and for an image file its size and modification time."""
    c = p.container
    if c.runtime == "none":
        return None
    info: dict[str, Any] = {"runtime": c.runtime, "image": c.image, "digest": c.digest}
    if not info["digest"] and "@sha256:" in c.image:
        info["digest"] = "sha256:" + c.image.split("@sha256:")[1]
    path = Path(c.image).expanduser()
    if path.is_file():
        st = path.stat()
        info.update(size=st.st_size, mtime=datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds"))
    return info


def secret_names(environ=os.environ) -> list[str]:
    """Names (never values) of the secrets a job inherits from the environment, e.g. WANDB_API_KEY."""
    return sorted(k for k in environ if any(h in k.upper() for h in _SECRET_HINTS) and not k.startswith("SLURM_"))


# --------------------------------------------------------------------------------------------- run record
def read_record(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECORD
    return read_json(path, "run record") if path.exists() else None


def add_submission(run_dir: Path, cfg, command: str, profile_path: str, profile: ClusterProfile,
                   jobs: dict[str, dict]) -> dict:
    from pipeline.rundir import git_revision

    record = read_record(run_dir) or {"submissions": [], "cancelled": []}
    entry = {
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "cluster": profile_path,
        "profile": OmegaConf.to_container(OmegaConf.structured(profile)),
        "config_hash": config_hash(cfg),
        "git_revision": git_revision(),
        "pixelgen_version": pixelgen.__version__,
        "container": image_identity(profile),
        "jobs": jobs,
    }
    record["submissions"].append(entry)
    atomic_write_json(Path(run_dir) / RECORD, record)
    return entry


def latest_jobs(record: dict | None) -> dict[str, dict]:
    """The newest submission of each stage: {stage: {"job_id": ..., "tasks": ...}}."""
    jobs: dict[str, dict] = {}
    for entry in (record or {}).get("submissions", []):
        jobs.update(entry["jobs"])
    return jobs


# ------------------------------------------------------------------------------------------------- the queue
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def queue(job_ids: list[str]) -> dict[str, list[dict]]:
    """{job id: [one dict per job (or array task): state, reason, seconds used, restarts]} for the jobs slurmctld
    still knows (pending, running, and finished ones for MinJobAge). squeue only: works without sacct."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    fmt = "ArrayJobID:|,JobArrayID:|,State:|,Reason:|,TimeUsed:|,RestartCnt:"
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O", fmt],
                         capture_output=True, text=True, timeout=60)
    found: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split("|")]
        if len(parts) < 6:
            continue
        array_id, task_id, state, reason, used, restarts = parts[:6]
        job = array_id if array_id in job_ids else task_id.split("_")[0]
        found.setdefault(job, []).append({"id": task_id, "state": state, "reason": reason,
                                          "seconds": _squeue_seconds(used),
                                          "restarts": int(restarts) if restarts.isdigit() else 0})
    return found


def _job_paths(run_dir: Path, job_id: str):
    from submitit.core.utils import JobPaths

    return JobPaths(Path(run_dir) / "submitit" / "%j", job_id=job_id, task_id=0)


def _job_error(run_dir: Path, job_id: str) -> str | None:
    """The last line of the exception a job's task 0 reported (submitit's result file), if it failed so."""
    import pickle

    path = _job_paths(run_dir, job_id).result_pickle
    try:
        with open(path, "rb") as f:
            kind, payload = pickle.load(f)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):
        return None
    if kind != "error":
        return None
    lines = [x for x in str(payload).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "error"


def _log_error(log: Path) -> str | None:
    """The last line of a job's log that reports an error (srun's "task 0: Killed", a Python exception)."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return None
    hits = [x.strip() for x in lines if "error" in x.lower() or "killed" in x.lower()]
    return hits[-1] if hits else None


def _squeue_seconds(used: str) -> int:
    """squeue's TimeUsed ([D-][H:]M:SS) in seconds; 0 when it is not a time."""
    days, _, clock = used.rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
        return int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    except ValueError:
        return 0


def _fmt_seconds(s: float) -> str:
    """In squeue's own style (M:SS, H:MM:SS), so finished and running stages read alike in one column."""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def training_progress(run_dir: Path, cfg, stage: str, eta: bool = True) -> str:
    """'step 1435/100000 (1%), loss 0.4123, ETA 3:05:10' from the newest records of a training stage's
    metrics.jsonl, or '' before its first. Read from the end: the file grows by a line per log interval. The ETA
    uses the median step time of the last 20 records (one slow interval, a sample grid or a checkpoint, is
    noise) and knows nothing of queueing or restarts to come."""
    from pipeline import rundir

    if stage not in TRAIN_STAGES:
        return ""
    try:
        with open(rundir.stage_dir(run_dir, stage) / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ""
    records = []
    for line in lines:
        try:
            rec = json.loads(line)  # the first line may be cut by the seek, the last one half-written
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        return ""
    rec = records[-1]
    step, total = int(rec["step"]), int(getattr(cfg, stage).steps)
    parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
    if "loss" in rec:
        parts.append(f"loss {rec['loss']:.4f}")
    times = [r["step_time_s"] for r in records[-20:] if r.get("step_time_s")]
    if eta and times and step < total:
        parts.append(f"ETA {_fmt_seconds((total - step) * statistics.median(times))}")
    return ", ".join(parts)


def stage_states(run_dir: Path, cfg) -> list[dict]:
    """One row per stage: state (done, running, pending, requeued, failed, cancelled, not run; started or
    pending for a local run; not submitted), job id, elapsed time, log path, a detail and the stage's marker,
    from the run record, squeue and the stage markers. A DONE marker wins over anything the queue says."""
    from pipeline import rundir

    record = read_record(run_dir)
    jobs = latest_jobs(record)
    cancelled = set((record or {}).get("cancelled", []))
    q = queue(sorted({j["job_id"] for j in jobs.values()}))
    rows, upstream_failed = [], False
    for stage in cfg.stages:
        m = rundir.marker(run_dir, stage)
        job = jobs.get(stage)
        row = {"stage": stage, "job_id": job["job_id"] if job else None, "elapsed": "", "log": "", "detail": "",
               "restarts": 0, "marker": m}
        if m is not None:
            row.update(state="done", elapsed=_fmt_seconds(m.get("seconds", 0)))
        elif job is None:  # a local run (no record), or a stage no submission included
            started = rundir.stage_dir(run_dir, stage).exists()
            row["state"] = "started" if started else ("not submitted" if record else "pending")
        else:
            jid = job["job_id"]
            tasks = q.get(jid, [])
            states = {t["state"] for t in tasks}
            row["restarts"] = max((t["restarts"] for t in tasks), default=0)
            used = max((t["seconds"] for t in tasks), default=0)
            row["elapsed"] = _fmt_seconds(used) if used else ""
            failed_task = next((t["id"] for t in tasks if t["state"] in FAILED), None)
            row["log"] = str(_job_paths(run_dir, failed_task or (f"{jid}_0" if job.get("tasks", 1) > 1 else jid))
                             .stderr)
            reasons = {t["reason"] for t in tasks}
            if states & {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}:
                row["state"] = "running"
            elif states & ACTIVE:
                requeued = row["restarts"] > 0 or states & {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
                row["state"] = "requeued" if requeued else "pending"
                row["detail"] = ", ".join(sorted(r for r in reasons if r and r != "None"))
            elif jid in cancelled:
                row["state"] = "cancelled"
            elif "DependencyNeverSatisfied" in reasons or upstream_failed:
                row.update(state="not run", detail="an earlier stage did not finish", log="", elapsed="")
            elif states == {"CANCELLED"}:
                row["state"] = "cancelled"
            else:  # finished without a DONE marker, or gone from the queue
                row["state"] = "failed"
                queue_says = "/".join(sorted(states | reasons - {"None", ""})) or "not in the queue any more"
                row["detail"] = (_job_error(run_dir, failed_task or jid) or _log_error(Path(row["log"]))
                                 or queue_says)
            if row["restarts"]:
                row["detail"] = ", ".join(x for x in (f"requeued {row['restarts']}x", row["detail"]) if x)
        if row["state"] in ("running", "requeued", "started", "cancelled"):
            progress = training_progress(run_dir, cfg, stage, eta=row["state"] == "running")
            row["detail"] = ", ".join(x for x in (row["detail"], progress) if x)
        upstream_failed = upstream_failed or row["state"] in ("failed", "cancelled", "not run")
        rows.append(row)
    return rows


def active_jobs(run_dir: Path) -> list[str]:
    """Job ids of this run that are still queued or running."""
    jobs = latest_jobs(read_record(run_dir))
    q = queue(sorted({j["job_id"] for j in jobs.values()}))
    return [jid for jid, tasks in q.items() if any(t["state"] in ACTIVE for t in tasks)]


def cancel(run_dir: Path) -> list[str]:
    """scancel what is still queued or running; the record remembers it, so status says cancelled."""
    ids = active_jobs(run_dir)
    if ids:
        subprocess.run(["scancel", *ids], check=True, capture_output=True, text=True, timeout=60)
        record = read_record(run_dir)
        record["cancelled"] = sorted(set(record.get("cancelled", [])) | set(ids))
        atomic_write_json(Path(run_dir) / RECORD, record)
    return ids
