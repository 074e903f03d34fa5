"""The run record (RUN_DIR/run_record.json): one entry per submission, with the command, the profile, the
config hash, the git revision, the container and each stage's job id; and the jobs a `cancel` stopped."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import pixelgen
from pipeline.cluster.profile import ClusterProfile
from pipeline.config import ConfigError, config_hash
from pipeline.image import mismatch
from pixelgen.io import atomic_write_json, read_json

RECORD = "run_record.json"


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
    run_json = Path(run_dir) / "run.json"
    if entry["container"] and run_json.is_file():  # the image the run's jobs now run in, beside its provenance
        atomic_write_json(run_json, {**read_json(run_json, "run.json"), "container": entry["container"]})
    return entry


def latest_jobs(record: dict | None) -> dict[str, dict]:
    """The newest submission of each stage: {stage: {"job_id": ..., "tasks": ...}}."""
    jobs: dict[str, dict] = {}
    for entry in (record or {}).get("submissions", []):
        jobs.update(entry["jobs"])
    return jobs


def image_identity(p: ClusterProfile) -> dict | None:
    """What the run record says about the container: image, digest when known (from the profile, an
    image@sha256:... reference, or the IMAGE.json that docker/convert writes beside a .sqsh/.sif file, with
    the image's revision and lock), and for an image file its size and modification time."""
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
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        labels = read_json(sidecar, "image labels (docker/convert)")
        if c.digest and labels.get("digest") and labels["digest"] != c.digest:
            raise ConfigError(f"container.digest = {c.digest} in the cluster profile, but {sidecar} says the image "
                              f"{c.image} is {labels['digest']}: correct (or remove) container.digest, or "
                              f"reconvert the image (make sqsh / make sif)")
        info["digest"] = info["digest"] or labels.get("digest")
        info.update({k: labels.get(k) for k in ("revision", "version", "lock", "lock_sha256")})
    return info


def check_image(p: ClusterProfile) -> dict | None:
    """The container's identity (image_identity); refuses, before anything is submitted, an image whose
    pixelgen revision is known and names another commit than this checkout."""
    from pipeline.rundir import git_revision

    info = image_identity(p)
    problem = mismatch(git_revision(), (info or {}).get("revision"), f"the image {p.container.image}")
    if problem:
        raise ConfigError(problem)
    return info
