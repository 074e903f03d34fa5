"""The run folder and the stage contract.

    <run_dir>/config.yaml      resolved config (plain YAML), its schema version first (pipeline.migrations)
    <run_dir>/run.json         package version, git revision, config hash, creation time
    <run_dir>/<stage>/         each stage's outputs
    <run_dir>/<stage>/DONE.json  completion marker, written last: a stage whose marker exists is done
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import subprocess
from pathlib import Path

from omegaconf import OmegaConf

import pixelgen
from pipeline import image, migrations
from pipeline.config import ConfigError, STAGES, config_hash, from_container, to_yaml
from pixelgen.engine.dist import launcher_env
from pixelgen.io import atomic_write_json, atomic_write_text, read_json

MARKER = "DONE.json"
_PATH_KEYS = ("run_dir", "data.imagenet_dir", "data.shard_dir", "train_decoder.init_from", "fid.inception_weights",
              "model.repa.teacher.weights", "model.trunk.student.teacher.weights")


def resolve_paths(cfg) -> None:
    """Make every path absolute (relative to the current directory), so jobs started elsewhere agree."""
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.name}"
    for key in _PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value:
            OmegaConf.update(cfg, key, str(Path(value).expanduser().resolve()))


def missing_inputs(cfg, run_dir: str | Path) -> list[str]:
    """What the unfinished stages read from outside the run folder and cannot find on this machine, one line
    each naming the key and the path: the ImageNet folder (shard), the shards (a chain without the shard
    stage), the Inception weights (fid). A finished stage needs nothing any more: its source may be gone."""
    todo = [s for s in cfg.stages if marker(run_dir, s) is None]
    problems = []
    if "shard" in todo and not Path(cfg.data.imagenet_dir).is_dir():
        problems.append(f"data.imagenet_dir = {cfg.data.imagenet_dir!r} is not a folder: point it at an "
                        f"ImageNet-layout folder (train/<wnid>/*.JPEG, val/...)")
    if "shard" not in cfg.stages and set(todo) - {"shard"} and cfg.data.shard_dir \
            and not (Path(cfg.data.shard_dir) / "manifest.json").is_file():
        problems.append(f"data.shard_dir = {cfg.data.shard_dir!r} holds no manifest.json: point it at the shard "
                        f"stage's output folder (or add shard to stages)")
    if "fid" in todo:
        from pixelgen.eval.fid import UPSTREAM_WEIGHTS_NAME, WEIGHTS_ENV

        weights = cfg.fid.inception_weights or os.environ.get(WEIGHTS_ENV)
        key = "fid.inception_weights" if cfg.fid.inception_weights else WEIGHTS_ENV
        if weights and not Path(weights).expanduser().is_file():
            problems.append(f"{key} = {weights!r} is not a file: point it at torch-fidelity's {UPSTREAM_WEIGHTS_NAME}")
        elif not weights and not cfg.fid.allow_random_features:
            problems.append(f"the fid stage has no Inception weights: set fid.inception_weights (or {WEIGHTS_ENV}) "
                            f"to torch-fidelity's {UPSTREAM_WEIGHTS_NAME}, or fid.allow_random_features=true for "
                            f"a proxy FID")
    return problems


def git_revision() -> str:
    """The checkout's commit (`-dirty` with uncommitted changes to tracked files); in a container image, the
    revision it was built from; else "unknown"."""
    root = Path(pixelgen.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return (image.image_info() or {}).get("revision", "unknown")
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(cfg, command: str = "run") -> Path:
    """Create the run folder and record the config. On an existing folder, take the changes it accepts
    (pipeline.changes: resources, more steps under a constant LR, cadences, logging, sampling and FID keys),
    setting aside what they made stale and recording them in run.json's history, and refuse any other,
    naming the key."""
    from pipeline import changes

    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        change = changes.classify(load_run_config(run_dir), cfg, run_dir)
        if change.recorded:
            _refuse_if_running(run_dir, cfg.stages)
            for note in changes.apply(change, run_dir, command, config_hash(cfg)):
                print(f"pixelgen: {note}", flush=True)
        if change.keys:
            atomic_write_text(saved, migrations.with_version(to_yaml(cfg)))  # the jobs read their config here
        return run_dir
    # Owner only: the run folder holds the pickled jobs (code) and the logs.
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run_dir, 0o700)
    atomic_write_json(run_dir / "run.json", {
        "pixelgen_version": pixelgen.__version__,
        "git_revision": git_revision(),
        "config_hash": config_hash(cfg),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    atomic_write_text(saved, migrations.with_version(to_yaml(cfg)))  # last: config.yaml means fully prepared
    return run_dir


def refuse_if_queued(run_dir: Path) -> None:
    """A run folder whose SLURM jobs are still queued or running is not started, or changed, a second time."""
    from pipeline import cluster

    busy = cluster.active_jobs(run_dir)
    if busy:
        raise ConfigError(f"run folder {run_dir} still has jobs queued or running ({', '.join(busy)}): follow them "
                          f"with `pixelgen status {run_dir}`, or `pixelgen cancel {run_dir}` first")


def _refuse_if_running(run_dir: Path, stages) -> None:
    """A config change is not taken while a stage of the run is running here or queued on SLURM: the running
    job would finish under the old config and mark its stage done."""
    refuse_if_queued(run_dir)
    for stage in stages:
        if stage_dir(run_dir, stage).exists():
            with stage_lock(run_dir, stage):  # raises StageBusy naming the holder
                pass


def load_run_config(run_dir: str | Path):
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a pixelgen run folder (no config.yaml); start one with "
                                f"`pixelgen run CONFIG`")
    return from_container(migrations.upgrade(OmegaConf.to_container(OmegaConf.load(path)), path))


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage '{stage}'; stages are {list(STAGES)}")
    return Path(run_dir) / stage


def marker(run_dir: str | Path, stage: str) -> dict | None:
    path = stage_dir(run_dir, stage) / MARKER
    return read_json(path, "stage marker") if path.exists() else None


def mark_done(run_dir: str | Path, stage: str, summary: dict) -> None:
    atomic_write_json(stage_dir(run_dir, stage) / MARKER, summary)


class StageBusy(RuntimeError):
    """Another process is running this stage of this run folder."""


@contextlib.contextmanager
def stage_lock(run_dir: str | Path, stage: str, task: int | None = None):
    """Hold an exclusive lock on the stage folder while the stage runs, so a second launch of the same stage
    (a double submission, a local job left running) fails fast instead of writing into the same files.
    The kernel drops the lock when the holder dies, so a killed run leaves no stale lock. Rank 0 only:
    the other ranks of a multi-task job belong to the holder."""
    if launcher_env(os.environ)["RANK"] != "0":  # torchrun's RANK or an srun task's SLURM_PROCID
        yield
        return
    # Each task of a job array (the shard stage's) holds its own lock: they are meant to run together.
    path = stage_dir(run_dir, stage) / (".lock" if task is None else f".lock-task{task}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            what = stage if task is None else f"{stage} (array task {task})"
            raise StageBusy(f"stage '{what}' of {run_dir} is already running ({holder}); wait for it, or stop "
                            f"it and rerun to resume") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
