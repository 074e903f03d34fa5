"""The state of a run's jobs, from the run record, squeue and the run folder (no sacct needed): one row per
stage for `pixelgen status`, a training stage's progress, and `pixelgen cancel`."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from pipeline.cluster.jobs import attempts_file
from pipeline.cluster.profile import TRAIN_STAGES
from pipeline.cluster.record import RECORD, latest_jobs, read_record
from pixelgen.io import atomic_write_json

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def queue(job_ids: list[str]) -> dict[str, list[dict]]:
    """{job id: [one dict per job (or array task): state, reason, seconds used, restarts, nodes]} for the jobs
    slurmctld still knows (pending, running, and finished ones for MinJobAge). squeue only: works without sacct."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    fmt = "ArrayJobID:|,JobArrayID:|,State:|,Reason:|,TimeUsed:|,RestartCnt:|,NodeList:"
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-O", fmt],
                         capture_output=True, text=True, timeout=60)
    found: dict[str, list[dict]] = {}
    for line in out.stdout.splitlines():
        parts = [x.strip() for x in line.split("|")]
        if len(parts) < 7:
            continue
        array_id, task_id, state, reason, used, restarts, nodes = parts[:7]
        job = array_id if array_id in job_ids else task_id.split("_")[0]
        found.setdefault(job, []).append({"id": task_id, "state": state, "reason": reason,
                                          "seconds": _squeue_seconds(used),
                                          "restarts": int(restarts) if restarts.isdigit() else 0,
                                          "nodes": "" if nodes == "(null)" else nodes})
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


def _task_index(task_id: str) -> int:
    """squeue's JobArrayID: "123_4" -> 4; a job that is no array -> 0 (as the job script notes it)."""
    _, _, index = task_id.partition("_")
    return int(index) if index.isdigit() else 0


def _fmt_seconds(s: float) -> str:
    """In squeue's own style (M:SS, H:MM:SS), so finished and running stages read alike in one column."""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _ledger(run_dir: Path, job_id: str) -> list[dict]:
    """The job script's ledger (jobs.attempts_file): one entry per finished run of the job or of its array tasks."""
    try:
        lines = attempts_file(run_dir, job_id).read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
            entries.append({**entry, "task": int(entry["task"]), "seconds": float(entry["seconds"])})
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a full disk
    return entries


def _runs(ledger: list[dict]) -> dict[int, list[float]]:
    """{array task: seconds of each finished run}: a job that was requeued has run more than once, and squeue's
    TimeUsed counts only the current run."""
    runs: dict[int, list[float]] = {}
    for entry in ledger:
        runs.setdefault(entry["task"], []).append(entry["seconds"])
    return runs


def _nodes(ledger: list[dict], tasks: list[dict]) -> str:
    """The nodes a stage's job ran on, as SLURM's node lists ("node[1-2]"), each distinct one once, in order:
    the finished runs (the tasks of an array, the runs before a requeue), then what runs now."""
    seen: list[str] = []
    for nodes in [e.get("nodes", "") for e in ledger] + [t["nodes"] for t in tasks if t["state"] in ACTIVE]:
        if nodes and nodes not in seen:
            seen.append(nodes)
    return ",".join(seen)


def _elapsed(this_run: float, runs: dict[int, list[float]], current: dict[int, float]) -> str:
    """This run's time, and the total over every run of the job when it ran more than once. An array stage's
    total is its longest task's (they run side by side)."""
    text = _fmt_seconds(this_run) if this_run else ""
    if not any(len(r) + (t in current) > 1 for t, r in runs.items()):
        return text
    total = max(sum(runs.get(t, [])) + current.get(t, 0) for t in {*runs, *current})
    return f"{text} (total {_fmt_seconds(total)})".strip()


def training_progress(run_dir: Path, cfg, stage: str, eta: bool = True) -> str:
    """'step 1435/100000 (1%), loss 0.4123, ETA 3:05:10' from the newest records of a training stage's
    metrics.jsonl, or '' before its first. Read from the end: the file grows by a line per log interval. The ETA
    uses the median step time of the last 20 records (one slow interval, a sample grid or a checkpoint, is
    noise) and knows nothing of queueing or restarts to come."""
    from pipeline import rundir

    if stage == "fid":
        return fid_progress(rundir.stage_dir(run_dir, stage))
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


def fid_progress(fid_dir: Path) -> str:
    """'point 1, 37/100 chunks (37%)' from the FID stage's chunk folders (the points scored are in points/), or
    '' before sampling starts."""
    from pixelgen.eval.sampling import PLAN_FILE, Plan

    scored = len(list((fid_dir / "points").glob("point*.json")))
    for folder in sorted((fid_dir / "chunks").glob("point*")):
        try:
            total = Plan(**json.loads((folder / PLAN_FILE).read_text())).num_chunks
        except (OSError, ValueError, TypeError):
            continue
        done = len(list(folder.glob("chunk*.npz")))
        return f"point {int(folder.name[5:])}, {done}/{total} chunks ({100 * done // max(total, 1)}%)"
    return f"{scored} point(s) scored" if scored else ""


def stage_states(run_dir: Path, cfg) -> list[dict]:
    """One row per stage: state (done, running, pending, requeued, failed, cancelled, not run; started or
    pending for a local run; not submitted), job id, elapsed time, runs so far, log path, a detail and the stage's marker,
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
               "restarts": 0, "runs": 0, "nodes": "", "marker": m}
        ledger = _ledger(run_dir, job["job_id"]) if job else []
        tasks = q.get(job["job_id"], []) if job else []
        row["nodes"] = _nodes(ledger, tasks)
        if m is not None:
            runs = _runs(ledger)
            row.update(state="done", elapsed=_elapsed(m.get("seconds", 0), runs, {}),
                       runs=max(map(len, runs.values()), default=0))
        elif job is None:  # a local run (no record), or a stage no submission included
            started = rundir.stage_dir(run_dir, stage).exists()
            row["state"] = "started" if started else ("not submitted" if record else "pending")
        else:
            jid = job["job_id"]
            states = {t["state"] for t in tasks}
            row["restarts"] = max((t["restarts"] for t in tasks), default=0)
            used = max((t["seconds"] for t in tasks), default=0)
            current = {_task_index(t["id"]): t["seconds"] for t in tasks if t["state"] in ACTIVE}
            runs = _runs(ledger)
            row["elapsed"] = _elapsed(used, runs, current)
            row["runs"] = max(map(len, runs.values()), default=0)  # the job script's ledger: one entry per run
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
