"""Which changes of a run folder's config it accepts, and what each one makes stale.

A run folder is one experiment: a key whose change would make its checkpoints mean something else (the model,
the objective, the data, the batch, a cosine schedule's length) is refused, naming the key. The others leave
what has been trained as it is and are accepted, recorded in run.json's history:
- resources (launch.*): where a stage runs, not what it computes;
- a training stage's steps under a constant LR (the LR at every step trained so far does not depend on it):
  raised on a finished stage, the stage continues from its last checkpoint, and what was made from its old
  end (a later training stage, the FID) is set aside and made again;
- a training stage's cadences (log_every, sample_every, ckpt_every, keep_ckpts, keep_every, ...), from the next
  step on;
- logging.*, and sampler.* and fid.*, which make a finished FID stale.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, STAGES

TRAINING = ("train_trunk", "train_decoder")
# A training stage's keys that say how often something happens, not what is trained.
CADENCE = ("log_every", "sample_every", "ckpt_every", "keep_ckpts", "keep_every", "max_nonfinite_steps",
           "peak_tflops")
RESOURCE = ("launch.",)
SUPERSEDED = "superseded"  # <stage>/superseded/<time>-DONE.json: a marker a change made stale


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class Change:
    """The changed keys of a run folder's config: {key: (old, new)}, and what they make stale."""

    keys: dict = field(default_factory=dict)
    rerun: list[str] = field(default_factory=list)  # finished stages that continue (their markers set aside)
    restart: list[str] = field(default_factory=list)  # stages whose outputs are set aside: they start afresh

    @property
    def recorded(self) -> dict:
        """The changes run.json's history keeps: all but the resources."""
        return {k: v for k, v in self.keys.items() if not k.startswith(RESOURCE)}


def _trained_steps(run_dir: Path, stage: str) -> int:
    """How far a training stage got: its marker's steps, else its newest complete checkpoint's, else 0."""
    from pipeline import rundir
    from pixelgen.engine.checkpoint import CheckpointManager

    done = rundir.marker(run_dir, stage)
    if done is not None:
        return int(done.get("steps", 0))
    latest = CheckpointManager(rundir.stage_dir(run_dir, stage) / "checkpoints", 1, False).latest_complete()
    return latest[0] if latest else 0


def _why_refused(key: str, old, new, old_cfg, run_dir: Path) -> str | None:
    """Why a run folder cannot take this change, or None when it can."""
    if key.startswith(RESOURCE) or key.startswith(("logging.", "sampler.", "fid.")):
        return None
    stage, _, name = key.partition(".")
    if stage in TRAINING and name in CADENCE:
        return None
    if stage in TRAINING and name == "steps":
        if old_cfg[stage].lr_schedule != "constant":
            return (f"{stage}.lr_schedule is {old_cfg[stage].lr_schedule}: the LR of every step trained so far "
                    f"depends on the schedule's length, so more steps would not continue this run")
        done = _trained_steps(run_dir, stage)
        if new < done:
            return f"the stage has trained {done} steps already: steps can only be set to {done} or more"
        return None
    return "it changes what the checkpoints mean"


def classify(old_cfg, new_cfg, run_dir: Path) -> Change:
    """The change from the folder's saved config to `new_cfg`; raises ConfigError naming every refused key."""
    from pipeline.config import to_container

    old, new = _flatten(to_container(old_cfg)), _flatten(to_container(new_cfg))
    change = Change({k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)})
    refused = {k: why for k, (a, b) in change.keys.items() if (why := _why_refused(k, a, b, old_cfg, run_dir))}
    if refused:
        detail = "; ".join(f"{k}: {change.keys[k][0]!r} -> {change.keys[k][1]!r} ({why})"
                           for k, why in list(refused.items())[:6])
        raise ConfigError(f"run folder {run_dir} cannot take this change: {detail}. Keep those keys as they are to "
                          f"resume or extend this run, or pick a new run_dir=... for the changed experiment")
    stages = [s for s in STAGES if s in new_cfg.stages]
    from pipeline import rundir

    for stage in TRAINING:
        if f"{stage}.steps" in change.keys and stage in stages:
            if rundir.marker(run_dir, stage) is not None:
                change.rerun.append(stage)
            after = stages[stages.index(stage) + 1:]
            change.restart += [s for s in after if s in TRAINING and rundir.stage_dir(run_dir, s).exists()]
            change.rerun += [s for s in after if s == "fid" and rundir.marker(run_dir, s) is not None]
    if any(k.startswith(("sampler.", "fid.")) for k in change.keys) and rundir.marker(run_dir, "fid") is not None:
        change.rerun.append("fid")
    change.rerun = [s for s in dict.fromkeys(change.rerun) if s not in change.restart]
    return change


def _unused(path: Path) -> Path:
    """`path`, or path-2, path-3, ... when taken (two changes within a second set aside two markers)."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}.json" if path.suffix == ".json" else f"{path.name}-{n}")
    return candidate


def apply(change: Change, run_dir: Path, command: str, new_hash: str) -> list[str]:
    """Set aside what the change made stale (never delete: a superseded marker or stage folder is renamed) and
    append the change to run.json's history. Returns one line per thing set aside, for the user."""
    from pipeline import rundir
    from pixelgen.io import atomic_write_json

    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    notes = []
    for stage in change.restart:
        folder = rundir.stage_dir(run_dir, stage)
        aside = _unused(folder.with_name(f"{stage}.superseded-{stamp}"))
        folder.rename(aside)
        notes.append(f"{stage} starts afresh from the new weights before it (its old outputs: {aside})")
    for stage in change.rerun:
        path = rundir.stage_dir(run_dir, stage) / rundir.MARKER
        aside = _unused(path.parent / SUPERSEDED / f"{stamp}-{rundir.MARKER}")
        aside.parent.mkdir(exist_ok=True)
        path.rename(aside)
        notes.append(f"{stage} runs again (its old result: {aside})")
    if change.recorded:
        info_path = Path(run_dir) / "run.json"
        info = json.loads(info_path.read_text())
        info.setdefault("history", []).append({
            "time": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
            "git_revision": rundir.git_revision(), "changes": {k: list(v) for k, v in change.recorded.items()},
            "rerun": change.rerun, "restarted": change.restart, "config_hash": new_hash})
        info.setdefault("original_config_hash", info["config_hash"])
        atomic_write_json(info_path, {**info, "config_hash": new_hash})
    return notes
