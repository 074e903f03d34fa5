"""The chain on a real SLURM cluster: the test cluster of slurm/local/ (Debian's slurmctld, slurmd and munge):
this machine's own node, plus two namespace nodes with their own addresses and host names (`up --nodes 2`),
started by the tests when it is not running. Jobs are real sbatch jobs through submitit; srun starts
the ranks; preemption is a real USR2 from scancel and a real `scontrol requeue`.

Where the local cluster cannot run (not root, no apt-get), the live tests skip with the reason; with CI or
PIXELGEN_REQUIRE_SLURM set, that skip is a failure. The profile and job-script tests need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline import cli, cluster, orchestrate, rundir
from pipeline.config import ConfigError, load_config
from tests.conftest import ROOT, TINY, chain_args, pixelgen

SECRET = "pixelgen-test-secret-3f9c1a"  # a WANDB_API_KEY value that must never land on disk


def _profile(tmp_path: Path, base: str = "local", **changes) -> Path:
    data = OmegaConf.to_container(OmegaConf.load(ROOT / "slurm" / f"{base}.yaml"))
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    path = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}.yaml"
    path.write_text(OmegaConf.to_yaml(data))
    return path


# ------------------------------------------------------------------------------------ profiles (no cluster)
def test_every_shipped_profile_loads():
    for path in sorted((ROOT / "slurm").glob("*.yaml")):
        if path.stem == "example":  # names a squashfs image that exists only on a real cluster
            with pytest.raises(ConfigError, match="container.image"):
                cluster.load_profile(str(path))
            continue
        cluster.load_profile(str(path))


def test_profile_errors_name_the_file_and_key(tmp_path):
    bad = _profile(tmp_path, partitoin="debug")
    with pytest.raises(ConfigError, match=rf"{bad}: unknown key 'partitoin'"):
        cluster.load_profile(str(bad))
    bad = _profile(tmp_path, collective_timeout_s=5)
    with pytest.raises(ConfigError, match=rf"{bad}: key 'collective_timeout_s' = 5: must be at least 10 s"):
        cluster.load_profile(str(bad))
    bad = _profile(tmp_path, signal="USR1")
    with pytest.raises(ConfigError, match=r"key 'signal' = 'USR1'.*NCCL"):
        cluster.load_profile(str(bad))
    bad = _profile(tmp_path, sbatch={"time": 5})
    with pytest.raises(ConfigError, match=r"sbatch.time.*sets this option itself"):
        cluster.load_profile(str(bad))
    bad = _profile(tmp_path, **{"container.runtime": "apptainer", "container.image": str(tmp_path / "none.sif")})
    with pytest.raises(ConfigError, match=r"container.image.*no such .sif file"):
        cluster.load_profile(str(bad))
    with pytest.raises(ConfigError, match=r"cluster profile 'nosuch' not found.*profiles: .*local"):
        cluster.load_profile("nosuch")


def test_batch_must_split_over_the_profiles_ranks(tmp_path, fake_imagenet):
    # tiny: batch 8; 3 ranks per node cannot split it, and the error names the keys on both sides.
    path = _profile(tmp_path, tasks_per_node=3)
    proc = pixelgen("run", str(TINY), f"run_dir={tmp_path / 'run'}", f"data.imagenet_dir={fake_imagenet}",
                    "--cluster", str(path), "--dry-run", check=False)
    assert proc.returncode == 2
    assert "train_trunk.batch_size' = 8" in proc.stdout and "nodes.train_trunk" in proc.stdout
    assert not (tmp_path / "run").exists()  # nothing prepared before the checks pass


def test_dry_run_and_executor_options_need_the_right_partner(tmp_path):
    # Without --cluster a "dry run" would otherwise run the whole chain for real.
    proc = pixelgen("run", str(TINY), f"run_dir={tmp_path / 'run'}", "--dry-run", check=False)
    assert proc.returncode == 2 and "--cluster NAME" in proc.stdout and not (tmp_path / "run").exists()
    proc = pixelgen("run", str(TINY), "--executor", "debug", "--cluster", "local", check=False)
    assert proc.returncode == 2 and "pick one" in proc.stdout


def test_submitting_without_slurm_names_the_missing_tools(tmp_path, fake_imagenet):
    proc = pixelgen("run", str(TINY), f"run_dir={tmp_path / 'run'}", f"data.imagenet_dir={fake_imagenet}",
                    "--cluster", "local", check=False, env=_without_slurm(tmp_path))
    assert proc.returncode == 2
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "needs SLURM's sbatch and srun on PATH" in out and "apt-get install slurm-client" in out
    assert "--dry-run writes the job scripts" in out
    assert not (tmp_path / "run").exists()  # nothing prepared, nothing submitted


def test_cluster_keys_moved_out_of_the_experiment():
    with pytest.raises(ConfigError, match=r"launch.train_trunk.partition' moved to the cluster profile"):
        load_config(TINY, ["launch.train_trunk.partition=gpu"])


SLURM_BINARIES = ("srun", "sbatch", "sinfo", "squeue", "scontrol", "slurmctld", "slurmd", "munged")


def _without_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a laptop without any Slurm tool, whatever this machine has installed: PATH holds the
    venv's bin folder and git alone (the run records the revision). The live tests may have installed Slurm
    already, or not yet; this makes the dry-run tests independent of both."""
    tools = tmp_path / "no-slurm-bin"
    tools.mkdir(exist_ok=True)
    git = shutil.which("git")
    if git and not (tools / "git").exists():
        (tools / "git").symlink_to(git)
    path = f"{Path(sys.executable).parent}{os.pathsep}{tools}"
    found = {b: shutil.which(b, path=path) for b in SLURM_BINARIES}
    assert not any(found.values()), f"Slurm tools still on the test PATH: {found}"
    return {**os.environ, "PATH": path}


def _dry_run(tmp_path, fake_imagenet, profile: Path, *overrides: str) -> dict[str, str]:
    run = tmp_path / "run"
    env = {**_without_slurm(tmp_path), "WANDB_API_KEY": SECRET}
    pixelgen("run", str(TINY), f"run_dir={run}", f"data.imagenet_dir={fake_imagenet}", *overrides,
             "--cluster", str(profile), "--dry-run", env=env)
    scripts = {p.stem: p.read_text() for p in (run / "submitit" / "dry-run").glob("*.sh")}
    assert set(scripts) == {"shard", "train_trunk", "train_decoder", "fid"}
    for text in scripts.values():
        assert SECRET not in text
    assert not (run / cluster.RECORD).exists()  # a dry run submits and records nothing
    return scripts


def test_job_scripts_for_pyxis(tmp_path, fake_imagenet):
    image = tmp_path / "pixelgen.sqsh"
    image.write_bytes(b"squashfs stand-in")
    inception = tmp_path / "weights" / "inception.pth"
    profile = _profile(tmp_path, gpus_per_node=4, cpus_per_node=32, tasks_per_node=None, signal_lead_s=200,
                       **{"nodes.train_trunk": 2, "container.runtime": "pyxis", "container.image": str(image),
                          "container.mounts": ["/scratch"], "sbatch": {"constraint": "h100"},
                          "setup": ["module load cuda/12.4"]})
    s = _dry_run(tmp_path, fake_imagenet, profile, "shard.array_tasks=2", f"fid.inception_weights={inception}")
    run = tmp_path / "run"
    train = s["train_trunk"]
    srun = next(line for line in train.splitlines() if line.startswith("srun "))
    assert f"--container-image={image}" in srun and "--no-container-mount-home" in srun
    mounts = srun.split("--container-mounts=")[1].split()[0].split(",")
    # The run folder, the data, the weights' folder and the profile's own mount, each at the same path.
    assert set(mounts) == {f"{p}:{p}" for p in (run, fake_imagenet, inception.parent, "/scratch")}
    # pipeline.jobstart first: its preemption handlers are in before submitit or the stage imports anything.
    assert srun.endswith(f"/usr/bin/env python3 -u -m pipeline.jobstart -u -m submitit.core._submit {run}/submitit/%j")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --signal=USR2@200", "#SBATCH --requeue",
                 "#SBATCH --constraint=h100", "#SBATCH --kill-on-invalid-dep=yes", "module load cuda/12.4"):
        assert line in train.splitlines(), line
    assert "#SBATCH --dependency='afterok:<job id of shard>'" in train
    # The batch script, outside the container, names each job's preemption marker and requeues on it (below).
    assert f"export PIXELGEN_PREEMPT_MARKER={run}/submitit/preempted-\"$SLURM_JOB_ID\"" in train
    assert "export PIXELGEN_COLLECTIVE_TIMEOUT_S=600" in train.splitlines()  # the profile's default
    teardown = train.split("# teardown")[1]
    assert "\n".join(cluster.requeue_lines(cluster.load_profile(str(profile))[1], run)) in teardown
    assert "#SBATCH --array=0-1%2" in s["shard"] and "--gpus-per-node" not in s["shard"]
    # The FID stage runs one rank per GPU too, on nodes.fid nodes (default 1).
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"):
        assert line in s["fid"].splitlines(), line
    # Owner-only folders: the pickled jobs are code.
    for folder in (run, run / "submitit"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize("rc, marker, restarts, requeued, exit_code", [
    (75, False, 0, True, 0),   # a stage saved on a signal and exited 75
    (1, True, 0, True, 0),     # a rank died of its peer's exit after a signal: still a preemption
    (137, True, 0, True, 0),   # killed by SLURM after the grace time (NCCL waits in a collective)
    (0, True, 0, False, 0),    # the signal came as the stage finished: done, nothing to requeue
    (1, False, 0, False, 1),   # a real failure: the job fails and afterok cancels its dependants
    (75, True, 100, False, 75),  # out of requeues (max_requeues: 100)
])
def test_the_job_script_requeues_on_the_marker_or_exit_75(tmp_path, rc, marker, restarts, requeued, exit_code):
    """The teardown lines of every job script, run by bash after a stand-in for srun's status, with a
    stand-in scontrol that records its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    path = tmp_path / "preempted-42"
    if marker:
        path.write_text("USR2 rank 0 pid 1 2026-12-01T00:00:00\n")
    _, profile = cluster.load_profile(str(ROOT / "slurm" / "local.yaml"))
    (tmp_path / "submitit").mkdir()
    script = "\n".join(["SECONDS=40", f"(exit {rc})", *cluster.requeue_lines(profile, tmp_path)])
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42",
                               "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_RESTART_COUNT": str(restarts),
                               "PIXELGEN_PREEMPT_MARKER": str(path)})
    assert proc.returncode == exit_code, proc.stderr
    assert (calls.read_text() == "requeue 42\n") if requeued else not calls.exists()
    assert ("requeueing job 42" in proc.stderr) == requeued
    assert not path.exists()  # a requeued job starts without it; a finished or failed one leaves none behind
    # This run's time, for `pixelgen status` to add up across requeues, and its nodes.
    assert json.loads((tmp_path / "submitit" / "attempts-42.jsonl").read_text()) == \
        {"task": 0, "restart": restarts, "seconds": 40, "rc": rc, "nodes": "gpu[03-04]"}


def test_a_signal_before_the_stage_starts_exits_75_and_leaves_the_marker(tmp_path):
    """pipeline.jobstart's handlers are in from the job's first lines: here submitit's runner waits for a job
    pickle that never comes (it would wait 60 s), as a slow start-up would, and USR2 arrives."""
    marker = tmp_path / "preempted-7"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.jobstart", "-u", "-m", "submitit.core._submit",
                             str(tmp_path / "%j")], cwd=ROOT, text=True, stderr=subprocess.PIPE,
                            env={**env, "PIXELGEN_PREEMPT_MARKER": str(marker), "SUBMITIT_EXECUTOR": "slurm",
                                 "SLURM_JOB_ID": "7", "SLURM_PROCID": "1"})
    time.sleep(3)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-3000:]
    assert "signal SIGUSR2 before the stage started" in err
    assert marker.read_text().startswith("SIGUSR2 rank 1 pid ")
    bad = subprocess.run([sys.executable, "-m", "pipeline.jobstart", "job.pkl"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "expects `-u -m submitit.core._submit FOLDER`" in bad.stderr


def test_job_scripts_for_apptainer(tmp_path, fake_imagenet):
    image = tmp_path / "pixelgen.sif"
    image.write_bytes(b"sif stand-in")
    profile = _profile(tmp_path, gpus_per_node=8, cpus_per_node=64, tasks_per_node=None,
                       **{"container.runtime": "apptainer", "container.image": str(image),
                          "container.python": "/opt/venv/bin/python"})
    s = _dry_run(tmp_path, fake_imagenet, profile)
    run = tmp_path / "run"
    srun = next(line for line in s["train_decoder"].splitlines() if line.startswith("srun "))
    assert "--container-image" not in srun
    binds = ",".join(str(x) for x in sorted((run, fake_imagenet), key=lambda x: (len(x.parts), str(x))))
    assert srun.endswith(f"apptainer exec --nv --bind {binds} {image} /opt/venv/bin/python -u -m "
                         f"pipeline.jobstart -u -m submitit.core._submit {run}/submitit/%j")


def test_containers_mount_every_teacher_the_family_loads(tmp_path):
    # The semantic AR's teacher gives both training stages their targets; REPA's would not be loaded here.
    weights = tmp_path / "teachers" / "dinov3.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"stand-in")
    cfg = load_config(ROOT / "configs" / "tiny_dual_ar_discrete.yaml",
                      ["data.imagenet_dir=/data", f"model.trunk.ar.teacher.weights={weights}"])
    _, profile = cluster.load_profile("local")
    mounts = cluster.container_mounts(cfg, tmp_path / "run", profile)
    assert str(weights.parent) in mounts and str(tmp_path / "run") in mounts and "/data" in mounts


def test_states_come_from_markers_results_and_the_record(tmp_path):
    """Without the queue's help (jobs long gone from squeue): a DONE marker means done, submitit's error
    result names the failure, a cancelled job stays cancelled, and what follows a failure did not run."""
    import cloudpickle

    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/data"])
    run = rundir.prepare(cfg)
    assert [r["state"] for r in cluster.stage_states(run, cfg)] == ["pending"] * 4  # a local run, not started
    rundir.mark_done(run, "shard", {"seconds": 75})
    jobs = {"shard": "990001", "train_trunk": "990002", "train_decoder": "990003", "fid": "990004"}
    (run / cluster.RECORD).write_text(json.dumps({"cancelled": ["990004"], "submissions": [
        {"jobs": {s: {"job_id": j, "tasks": 1} for s, j in jobs.items()}}]}))
    result = run / "submitit" / "990002" / "990002_0_result.pkl"
    result.parent.mkdir(parents=True)
    result.write_bytes(cloudpickle.dumps(("error", "Traceback (most recent call last):\n  ...\n"
                                                   "FileNotFoundError: key 'x' = '/nowhere': file does not exist\n")))
    rows = {r["stage"]: r for r in cluster.stage_states(run, cfg)}
    assert rows["shard"]["state"] == "done" and rows["shard"]["elapsed"] == "1:15"
    # Requeued once: the job script noted both runs; the stage's own time is its last run's.
    # Requeued on other nodes: both node lists, in order (a ledger line of before the nodes were noted has none).
    cluster.attempts_file(run, "990001").write_text(
        '{"task": 0, "restart": 0, "seconds": 100, "rc": 75, "nodes": "gpu[03-04]"}\n'
        '{"task": 0, "restart": 1, "seconds": 80, "rc": 0, "nodes": "gpu[07,09]"}\n'
        '{"task": 0, "restart": 2, "seconds": 0, "rc": 0}\n{"task"')
    rows = {r["stage"]: r for r in cluster.stage_states(run, cfg)}
    assert rows["shard"]["elapsed"] == "1:15 (total 3:00)" and rows["shard"]["nodes"] == "gpu[03-04],gpu[07,09]"
    assert rows["train_trunk"]["nodes"] == ""  # no ledger, not in the queue
    table = cli._status_view(run, cfg)[0]
    assert table.columns[3].header == "nodes" and list(table.columns[3].cells)[:2] == ["gpu[03-04],gpu[07,09]", "-"]
    assert rows["train_trunk"]["state"] == "failed"
    assert rows["train_trunk"]["detail"] == "FileNotFoundError: key 'x' = '/nowhere': file does not exist"
    assert rows["train_trunk"]["log"] == str(run / "submitit" / "990002" / "990002_0_log.err")
    assert rows["train_decoder"]["state"] == "not run" and rows["fid"]["state"] == "cancelled"


def test_training_progress_reads_the_newest_records(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/data", "train_trunk.steps=100"])
    run = rundir.prepare(cfg)
    assert cluster.training_progress(run, cfg, "train_trunk") == ""  # nothing logged yet
    times = [0.5] * 9 + [30.0]  # the last interval wrote a sample grid: the median ignores it
    lines = [json.dumps({"step": 3 * (i + 1), "loss": 1.0 / (i + 1), "step_time_s": t}) for i, t in enumerate(times)]
    metrics = run / "train_trunk" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("x" * 20000 + "\n" + "\n".join(lines) + '\n{"step": 33, "lo')  # long head, half-written tail
    assert cluster.training_progress(run, cfg, "train_trunk") == "step 30/100 (30%), loss 0.1000, ETA 0:35"
    assert cluster.training_progress(run, cfg, "train_trunk", eta=False) == "step 30/100 (30%), loss 0.1000"
    assert cluster.training_progress(run, cfg, "fid") == ""
    # The FID stage's progress is its chunks on disk (written atomically, so a file is a finished chunk).
    from pixelgen.eval import sampling

    folder = run / "fid" / "chunks" / "point001"
    sampling.open_plan(folder, sampling.Plan(4, 5, 4, 2, 0, {}))
    for k in range(2):
        sampling.chunk_path(folder, k).write_bytes(b"")
    assert cluster.training_progress(run, cfg, "fid") == "point 1, 2/5 chunks (40%)"
    assert _states(run)["train_trunk"]["detail"] == "step 30/100 (30%), loss 0.1000"  # a local run: started


# ------------------------------------------------------------------------------------- errors (no cluster)
def _submissions(tmp_path, monkeypatch, later_stages_raise: Exception):
    """A run to submit to the local profile where sbatch queues the shard stage as job 4242 and the next
    stage's submission raises `later_stages_raise`; no Slurm tool is needed."""
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/data"])
    run = rundir.prepare(cfg)
    monkeypatch.setattr(orchestrate.submitit, "SlurmExecutor", orchestrate._ScriptWriter)  # needs no srun

    def submit(executor, stage, run_dir, tasks):
        if stage != "shard":
            raise later_stages_raise
        return [SimpleNamespace(job_id="4242")]

    monkeypatch.setattr(orchestrate, "_submit_stage", submit)
    return cfg, run, *cluster.load_profile("local")


def test_a_refused_submission_is_one_line_naming_what_is_queued(tmp_path, monkeypatch):
    from submitit.core.utils import FailedJobError

    refusal = FailedJobError("sbatch: error: Batch job submission failed: Invalid partition name specified")
    cfg, run, path, profile = _submissions(tmp_path, monkeypatch, refusal)
    with pytest.raises(orchestrate.SubmissionError) as err:
        orchestrate.submit_slurm(cfg, run, path, profile)
    assert str(err.value) == (f"the job of stage 'train_trunk' was not submitted: {refusal}; already queued: shard "
                              f"4242 (pixelgen cancel {run}, fix the cause, then pixelgen resume {run})")
    assert err.value.__cause__ is refusal  # sbatch's own exit status and stderr stay reachable
    assert cluster.latest_jobs(cluster.read_record(run))["shard"]["job_id"] == "4242"


def test_a_bug_while_submitting_keeps_its_traceback(tmp_path, monkeypatch):
    """Only sbatch's refusal becomes a SubmissionError; a bug propagates as itself, and the jobs queued before
    it are still in the run record."""
    cfg, run, path, profile = _submissions(tmp_path, monkeypatch, TypeError("a bug in the pipeline"))
    with pytest.raises(TypeError, match="a bug in the pipeline"):
        orchestrate.submit_slurm(cfg, run, path, profile)
    assert cluster.latest_jobs(cluster.read_record(run))["shard"]["job_id"] == "4242"

    def broken(*args, **kwargs):
        raise TypeError("a bug in the dry run")

    monkeypatch.setattr(orchestrate, "_write_script", broken)
    with pytest.raises(TypeError, match="a bug in the dry run"):
        orchestrate.submit_slurm(cfg, run, path, profile, dry_run=True)


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """`pixelgen` prints a ConfigError, or a ValueError that pixelgen's own checks raise, as one line and exits
    2; any other ValueError propagates, so the console script prints its traceback."""
    from pixelgen.data import fake_imagenet

    assert cli.main(["fake-imagenet", str(tmp_path / "fake"), "--classes", "0"]) == 2  # pixelgen's own check
    assert capsys.readouterr().out == "error: fake ImageNet: num_classes=0 must be >= 1\n"
    assert cli.main(["shards", "write", str(tmp_path), str(tmp_path / "out"), "resolution=big"]) == 2
    assert capsys.readouterr().out == ("error: command line: key 'resolution' = 'big': must be an integer (the "
                                       "center crop size in pixels)\n")
    # Not raised by a check: int() of a broken variable inside the pipeline, and a library's own ValueError.
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "not-a-number")
    with pytest.raises(ValueError, match="invalid literal for int"):
        cli.main(["shards", "write", str(tmp_path), str(tmp_path / "out"), "array_tasks=2"])

    def library_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(fake_imagenet, "generate", library_bug)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["fake-imagenet", str(tmp_path / "fake")])


# ----------------------------------------------------------------------------------------- the live cluster
@pytest.fixture(scope="module")
def slurm():
    """The local cluster, started here if needed (and stopped again afterwards if this started it)."""
    binaries = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    reason = None
    if os.geteuid() != 0:
        reason = "the local SLURM cluster needs root (slurm/local/up installs packages and starts daemons)"
    elif not binaries and shutil.which("apt-get") is None:
        reason = "SLURM is not installed and there is no apt-get to install it (slurm/local/up needs Debian)"
    if reason:
        if os.environ.get("CI") or os.environ.get("PIXELGEN_REQUIRE_SLURM"):
            pytest.fail(f"CI requires the live SLURM tests, but: {reason}")
        pytest.skip(reason)
    was_up = binaries and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    subprocess.run([str(ROOT / "slurm" / "local" / "up"), "--nodes", "2"], check=True, timeout=900,
                   capture_output=True)
    submitted: list[Path] = []
    yield submitted
    for run_dir in submitted:  # leave no job of ours behind
        if (run_dir / cluster.RECORD).exists():
            cluster.cancel(run_dir)
    if not was_up:
        subprocess.run([str(ROOT / "slurm" / "local" / "down")], timeout=120, capture_output=True)
        # down leaves no namespace node behind: no namespace, link, process or /etc/hosts line of ours
        assert "pgnode" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "pgbr0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
        assert "pixelgen slurm/local nodes" not in Path("/etc/hosts").read_text()
        ps = subprocess.run(["ps", "-eo", "stat=,comm="], capture_output=True, text=True).stdout.splitlines()
        assert not [x for x in ps if "slurm" in x and not x.startswith("Z")], ps


def _submit(slurm, *args, env=None) -> subprocess.CompletedProcess:
    """`pixelgen run ARGS` (with --cluster); the fixture cancels the run's jobs if a test leaves any."""
    slurm.append(Path(next(a for a in args if a.startswith("run_dir="))[len("run_dir="):]))
    return pixelgen("run", *args, env=env)


def _states(run_dir: Path) -> dict[str, dict]:
    cfg = rundir.load_run_config(run_dir)
    return {row["stage"]: row for row in cluster.stage_states(run_dir, cfg)}


def _wait(run_dir: Path, until, timeout: float = 600, what: str = "") -> dict[str, dict]:
    end = time.time() + timeout
    while time.time() < end:
        states = _states(run_dir)
        if until(states):
            return states
        time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((run_dir / "submitit").rglob("*_log.err")))
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(states, indent=1)}\n{logs}")


def _all_done(states):
    return all(s["state"] == "done" for s in states.values())


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "submitit").rglob("*_log.*")))


def test_tiny_chain_under_sbatch_matches_the_local_executor(slurm, chain, fake_imagenet, tmp_path):
    """On the namespace nodes: the shard array one task per node, each training stage one task on one node, the
    FID stage as 2 nodes x 1 rank (gloo between node1's and node2's addresses). The outputs equal the local
    executor's chain: shards and the FID stage's samples byte for byte, weights to the bit."""
    local_run, _ = chain
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_API_KEY": SECRET}
    profile = _profile(tmp_path, "local_multi", **{"nodes.train_trunk": 1, "nodes.train_decoder": 1})
    proc = _submit(slurm, *chain_args(run, fake_imagenet)[1:], "--cluster", str(profile), env=env)
    assert _states(run)["fid"]["state"] == "pending"  # queued at once, waiting on its dependency
    record = json.loads((run / cluster.RECORD).read_text())
    jobs = record["submissions"][0]["jobs"]
    assert set(jobs) == {"shard", "train_trunk", "train_decoder", "fid"} and jobs["shard"]["tasks"] == 2
    for stage, job in jobs.items():
        assert job["job_id"] in proc.stdout
    entry = record["submissions"][0]
    assert entry["config_hash"] == json.loads((run / "run.json").read_text())["config_hash"]
    assert entry["git_revision"] and entry["cluster"] == str(profile)
    states = _wait(run, lambda s: _all_done(s) and not cluster.active_jobs(run), what="the chain to finish")
    assert sorted(states["shard"]["nodes"].split(",")) == ["node1", "node2"]  # an array task on each node
    assert states["train_trunk"]["nodes"] in ("node1", "node2") and states["fid"]["nodes"] == "node[1-2]"
    ours, theirs = (sorted(p for p in (r / "shard").rglob("*") if "fid_reference" not in p.parts)  # FID's cache
                    for r in (run, local_run))
    assert [p.relative_to(run) for p in ours] == [p.relative_to(local_run) for p in theirs]
    locks = {}
    for a, b in zip(ours, theirs):
        if a.name.startswith(".lock-task"):  # "pid N on HOST": each task's own host name
            locks[a.name] = a.read_text().split()[-1]
        elif a.suffix == ".tar" or a.name == "manifest.json":  # (DONE.json holds the stage's own timing)
            assert a.read_bytes() == b.read_bytes(), a
    assert sorted(locks.values()) == ["node1", "node2"], locks
    for stage in ("train_trunk", "train_decoder"):
        ours, theirs = rundir.marker(run, stage), rundir.marker(local_run, stage)
        assert ours["final_loss"] == theirs["final_loss"], stage
        for name in ("model.safetensors", "ema.safetensors"):
            a, b = load_file(run / stage / "export" / name), load_file(local_run / stage / "export" / name)
            assert all((a[k] == b[k]).all() for k in a), (stage, name)
    ours, theirs = (json.loads((r / "fid" / "metrics.json").read_text()) for r in (run, local_run))
    # Each rank with the threads of the chain's one (on the CPU a convolution's bits depend on them).
    assert ours["protocol"]["cpu_threads_per_rank"] == theirs["protocol"]["cpu_threads_per_rank"] == 2
    assert ours["protocol"]["ranks"] == 2 and theirs["protocol"]["ranks"] == 1
    assert (run / "fid" / "samples.npz").read_bytes() == (local_run / "fid" / "samples.npz").read_bytes()
    # The reference statistics of 2 ranks sum their shards' moments in another order than 1 rank: equal up to
    # float64 rounding (with one shared reference the 2-node FID is the 1-rank one to the bit).
    assert ours["fid"] == pytest.approx(theirs["fid"], rel=1e-7)
    out = pixelgen("status", str(run)).stdout
    assert out.count("done") == 4 and jobs["fid"]["job_id"] in out and "node[1-2]" in out
    # The secret reached the jobs (their first log line names it) and was written nowhere.
    assert "secrets from the environment: WANDB_API_KEY" in _log(run)
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def _progress(run_dir: Path) -> int:
    path = run_dir / "train_trunk" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _restarts(job_id: str) -> tuple[str, int]:
    (task,) = cluster.queue([job_id])[job_id]
    return task["state"], task["restarts"]


def test_preempted_training_requeues_and_ends_bit_equal(slurm, chain, tmp_path):
    local_run, _ = chain
    steps = 400
    args = [str(TINY), f"data.shard_dir={local_run / 'shard'}", "stages=[train_trunk]",
            f"train_trunk.steps={steps}", "train_trunk.ckpt_every=1000", "train_trunk.log_every=1"]
    # The same run, uninterrupted, on this machine.
    reference = tmp_path / "reference"
    pixelgen("stage", "train_trunk", *args, f"run_dir={reference}")

    run = tmp_path / "run"
    _submit(slurm, *args, f"run_dir={run}", "--cluster", "local")
    job = cluster.latest_jobs(cluster.read_record(run))["train_trunk"]["job_id"]
    seen = 0
    # Two interruptions in a row: a real preemption (a job in the local cluster's higher-tier partition needs
    # the whole node; SLURM sends USR2 at once and requeues after GraceTime), then an administrator's
    # `scontrol requeue` (SIGTERM to the tasks). (USR2 sent by hand with scancel takes the preemption's path.)
    urgent = ["sbatch", "--partition=urgent", "--exclusive", "--mem=100M", "--job-name=pixelgen-test-urgent",
              f"--output={tmp_path / 'urgent-%j.out'}", "--wrap=sleep 1"]
    for n, interrupt in enumerate((urgent, ["scontrol", "requeue", job]), start=1):
        _wait(run, lambda s: _progress(run) > seen + 3, timeout=300, what=f"training to progress before {n}")
        subprocess.run(interrupt, check=True, timeout=60, capture_output=True)
        _wait(run, lambda s: _restarts(job)[1] >= n, timeout=300, what=f"requeue {n}")
        if n == 1:  # (later, the run may already be over when we look)
            row = _states(run)["train_trunk"]
            assert row["state"] in ("requeued", "running") and "requeued 1x" in row["detail"], row
        seen = _progress(run)
        assert seen < steps, "the run finished before it was interrupted: make the test's run longer"
    states = _wait(run, _all_done, what="the requeued run to finish")
    assert states["train_trunk"]["job_id"] == job  # the same job came back each time
    log = _log(run)
    assert log.count("requeueing job") >= 1  # the preemption's USR2: saved, exit 75, requeued by the job script
    assert "restart 1 of at most" in log
    assert log.count("from checkpoint step") >= 2
    a, b = load_file(run / "train_trunk" / "export" / "model.safetensors"), \
        load_file(reference / "train_trunk" / "export" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    ema, ema_ref = load_file(run / "train_trunk" / "export" / "ema.safetensors"), \
        load_file(reference / "train_trunk" / "export" / "ema.safetensors")
    assert all((ema[k] == ema_ref[k]).all() for k in ema)


def test_a_preemption_during_start_up_requeues_the_job(slurm, chain, tmp_path):
    """Rank 0 is held in start-up (fault point startup@0:rank0: its process group is up, nothing else has run)
    while rank 1 goes on into DeepSpeed's first collective and waits there for it; then a real partition
    preemption. Rank 0 exits 75 from its handler, rank 1 dies of its peer's exit (or of the signal): either way
    the job is requeued, not failed, and the restarted job (restart 1: no hold) trains to the end."""
    local_run, _ = chain
    run = tmp_path / "run"
    profile = _profile(tmp_path, tasks_per_node=2)
    env = {**os.environ, "PIXELGEN_FAULT": "startup@0:rank0"}
    _submit(slurm, str(TINY), f"run_dir={run}", f"data.shard_dir={local_run / 'shard'}", "stages=[train_trunk]",
            "--cluster", str(profile), env=env)
    job = cluster.latest_jobs(cluster.read_record(run))["train_trunk"]["job_id"]
    _wait(run, lambda s: "holding at startup@0" in _log(run), timeout=300, what="rank 0 to hold in start-up")
    time.sleep(5)  # rank 1 is past its own start-up by now, waiting for rank 0 in DeepSpeed's broadcast
    assert _restarts(job) == ("RUNNING", 0) and not (run / "train_trunk" / "checkpoints").exists()
    subprocess.run(["sbatch", "--partition=urgent", "--exclusive", "--mem=100M", "--job-name=pixelgen-test-urgent",
                    f"--output={tmp_path / 'urgent-%j.out'}", "--wrap=sleep 1"], check=True, timeout=60,
                   capture_output=True)
    _wait(run, lambda s: _restarts(job)[1] >= 1, timeout=300, what="the requeue")
    states = _wait(run, _all_done, what="the requeued job to train to the end")
    assert states["train_trunk"]["job_id"] == job  # the same job came back
    _wait(run, lambda s: not cluster.active_jobs(run), timeout=120, what="the job to end")
    attempts = [json.loads(x) for x in cluster.attempts_file(run, job).read_text().splitlines()]
    assert [(a["restart"], a["rc"] == 0) for a in attempts] == [(0, False), (1, True)]
    log = _log(run)
    assert "signal SIGUSR2 outside the training loop" in log  # rank 0's handler, in the fault point's wait
    assert "requeueing job" in log and "signal(s) noted" in log  # the job script, from the marker
    assert not list((run / "submitit").glob("preempted-*"))  # consumed by the requeue
    assert rundir.marker(run, "train_trunk")["steps"] == rundir.load_run_config(run).train_trunk.steps


def test_failed_stage_stops_its_dependants_and_resume_finishes(slurm, fake_imagenet, tmp_path):
    run = tmp_path / "run"
    # A training job that crashes at step 4 (as a node failure or an OOM kill would) after a checkpoint at 3.
    env = {**os.environ, "PIXELGEN_FAULT": "step@4"}
    _submit(slurm, *chain_args(run, fake_imagenet)[1:], "train_trunk.ckpt_every=3", "--cluster", "local", env=env)
    first = cluster.latest_jobs(cluster.read_record(run))
    states = _wait(run, lambda s: s["train_trunk"]["state"] == "failed" and s["fid"]["state"] == "not run",
                   what="the trunk job to fail and its dependants to be dropped")
    assert states["shard"]["state"] == "done" and states["train_decoder"]["state"] == "not run"
    assert not (run / "train_decoder").exists()  # the dependants never started
    status = pixelgen("status", str(run)).stdout
    assert "failed" in status and first["train_trunk"]["job_id"] in status
    log = states["train_trunk"]["log"]
    assert Path(log).is_file() and log.endswith("_log.err")
    shard_marker = (run / "shard" / "DONE.json").stat().st_mtime_ns

    proc = pixelgen("resume", str(run))  # the cause is gone: this environment has no PIXELGEN_FAULT
    slurm.append(run)
    assert "shard" not in cluster.read_record(run)["submissions"][1]["jobs"]
    assert not re.search(rf"(?<![\w/-]){first['train_trunk']['job_id']}(?![\w/-])", proc.stdout)  # not the paths
    _wait(run, _all_done, what="the resumed chain")
    assert (run / "shard" / "DONE.json").stat().st_mtime_ns == shard_marker  # not run again
    assert "from checkpoint step 3" in _log(run)


def test_cancel_stops_the_run_and_it_stays_stopped(slurm, chain, tmp_path):
    local_run, _ = chain
    run = tmp_path / "run"
    _submit(slurm, str(TINY), f"run_dir={run}", f"data.shard_dir={local_run / 'shard'}",
            "stages=[train_trunk,fid]", "train_trunk.steps=100000", "train_trunk.log_every=1", "--cluster", "local")
    _wait(run, lambda s: _progress(run) > 0, what="training to start")
    proc = pixelgen("cancel", str(run))
    jobs = cluster.latest_jobs(cluster.read_record(run))
    assert jobs["train_trunk"]["job_id"] in proc.stdout and jobs["fid"]["job_id"] in proc.stdout
    time.sleep(5)
    states = _wait(run, lambda s: not cluster.active_jobs(run), timeout=120, what="the jobs to go")
    assert states["train_trunk"]["state"] == "cancelled" and states["train_trunk"]["restarts"] == 0
    assert not cluster.active_jobs(run)  # a cancel is not a preemption: nothing requeued itself
    out = pixelgen("status", str(run)).stdout
    assert "cancelled" in out and f"pixelgen resume {run}" in out


def test_time_limit_signal_saves_and_the_job_comes_back(slurm, chain, tmp_path):
    """The time limit itself: SLURM sends USR2 `signal_lead_s` (plus up to 60 s of its timer's slack) before a
    2-minute limit, the stage saves and requeues, and the same job resumes from that checkpoint instead of
    being killed with TIMEOUT. Nothing but the limit interrupts it."""
    local_run, _ = chain
    run = tmp_path / "run"
    profile = _profile(tmp_path, **{"time_min.train_trunk": 2, "signal_lead_s": 30})
    _submit(slurm, str(TINY), f"run_dir={run}", f"data.shard_dir={local_run / 'shard'}", "stages=[train_trunk]",
            "train_trunk.steps=1000000", "train_trunk.ckpt_every=1000000", "train_trunk.log_every=1",
            "--cluster", str(profile))
    job = cluster.latest_jobs(cluster.read_record(run))["train_trunk"]["job_id"]
    assert _restarts(job)[1] == 0
    _wait(run, lambda s: _restarts(job)[1] >= 1, timeout=240, what="the time limit's signal and the requeue")
    _wait(run, lambda s: "resuming train_trunk from checkpoint step" in _log(run), timeout=120,
          what="the job to come back")
    resumed = int(_log(run).split("resuming train_trunk from checkpoint step ")[1].split()[0])
    _wait(run, lambda s: _progress(run) > resumed, timeout=120, what="training to go on after the restart")
    state, restarts = _restarts(job)
    assert state == "RUNNING" and restarts >= 1  # not TIMEOUT: the signal came early enough to save and requeue
    assert f"stopped at step {resumed} on a preemption signal" in _log(run)
    out = pixelgen("status", str(run)).stdout
    assert "running" in out and "requeued 1x" in out and "/1000000 (" in out and "ETA" in out, out
    assert "(total " in out, out  # the first run's time, from the job script's ledger, plus this one's
    # `status --watch` into a pipe prints a table per change of state and returns once nothing can change.
    watch = subprocess.Popen([str(Path(sys.executable).parent / "pixelgen"), "status", str(run), "--watch",
                              "--every", "1"], stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    pixelgen("cancel", str(run))
    out, _ = watch.communicate(timeout=60)
    assert watch.returncode == 0 and out.index("running") < out.index("cancelled")
    assert out.count("train_trunk │") == 2  # once running, once cancelled: not a table per second


def test_eval_as_a_job_array_scores_each_point_as_the_fid_stage_would(slurm, chain, tmp_path):
    """`pixelgen eval --cluster`: one array task per point, each written into eval/ as it finishes; the point of
    the run's own sampler and EMA is the FID stage's point, to the bit."""
    local_run, _ = chain
    run = tmp_path / "run"
    shutil.copytree(local_run, run, ignore=shutil.ignore_patterns("submitit", "eval"))
    slurm.append(run)
    proc = pixelgen("eval", str(run), "--weights", "ema", "--sampler", "", "--sampler", "steps=2",
                    "--cluster", "local")
    job = cluster.latest_jobs(cluster.read_record(run))["eval"]
    assert job["tasks"] == 2 and f"submitted job array {job['job_id']}" in proc.stdout
    results = run / "eval" / "results.json"
    _wait(run, lambda s: results.exists() and len(json.loads(results.read_text())["points"]) == 2
          and not cluster.active_jobs(run), timeout=300, what="both eval tasks")
    points = {p["sampler"]: p for p in json.loads(results.read_text())["points"]}
    assert points[""]["fid"] == rundir.marker(local_run, "fid")["fid"]
    assert points["steps=2"]["fid"] != points[""]["fid"]
    assert "pixelgen: stage eval, SLURM job" in _log(run)


# ------------------------------------------------------------------------------------------------- two nodes
MULTI = ROOT / "slurm" / "local_multi.yaml"  # partition multi: node1 and node2, each its own network namespace
TWO_TASKS = ["launch.train_trunk.tasks=2", "launch.train_decoder.tasks=2", "launch.fid.tasks=2"]


def _same_weights(a: Path, b: Path, exact: bool) -> None:
    """The exports of two training stages: equal, or within the engine tests' 2-rank vs 1-rank tolerance."""
    import torch

    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(a / "export" / name), load_file(b / "export" / name)
        assert x.keys() == y.keys()
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), f"{a.name} {name}:{k}"
            else:
                torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-6, msg=f"{a.name} {name}:{k}")


def _losses(run_dir: Path, stage: str) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def test_a_lost_node_requeues_the_two_node_job_which_resumes_bit_equal(slurm, chain, tmp_path):
    """train_trunk (ZeRO-3, its parameters split over the nodes) as 2 nodes x 1 task, equal to one node with two
    tasks; then node2 is lost mid-run (link down, its processes killed: slurm/local/lose-node). SLURM marks it
    DOWN and requeues the job (NODE_FAIL, JobRequeue=1), node1's rank does not wait beyond the collective
    timeout, the job comes back when the node does and resumes from the last complete checkpoint to the bit."""
    local_run, _ = chain
    steps, every = 40, 10
    args = [str(TINY), f"data.shard_dir={local_run / 'shard'}", "stages=[train_trunk]", "train_trunk.zero_stage=3",
            f"train_trunk.steps={steps}", f"train_trunk.ckpt_every={every}", "train_trunk.log_every=1"]
    run = tmp_path / "run"
    # One thread per rank: the two nodes share this machine's two cores (ZeRO-3's many small collectives over
    # gloo crawl with two threads per rank fighting for them), as the local executor's ranks get.
    profile = _profile(tmp_path, "local_multi", setup=["export OMP_NUM_THREADS=1"])
    _submit(slurm, *args, f"run_dir={run}", "--cluster", str(profile))
    job = cluster.latest_jobs(cluster.read_record(run))["train_trunk"]["job_id"]
    _wait(run, lambda s: _progress(run) > every + 3, timeout=300, what="training past its first checkpoint")
    assert _states(run)["train_trunk"]["nodes"] == "node[1-2]"
    lost = time.time()
    subprocess.run([str(ROOT / "slurm" / "local" / "lose-node"), "node2"], check=True, timeout=60)
    # The same run uninterrupted on one node with two tasks, meanwhile (the wait below is mostly idle).
    reference = tmp_path / "one-node"
    ref = subprocess.Popen([str(Path(sys.executable).parent / "pixelgen"), "run", *args, f"run_dir={reference}",
                            "launch.train_trunk.tasks=2", "--executor", "local"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(run, lambda s: _restarts(job)[1] >= 1 and s["train_trunk"]["state"] == "requeued", timeout=120,
              what="SLURM to requeue the job")
        down = subprocess.run(["sinfo", "-h", "-n", "node2", "-o", "%T"], capture_output=True, text=True).stdout
        assert down.strip().startswith("down"), down
        seen = _progress(run)
        assert seen < steps, "the run finished before the node was lost: make the test's run longer"
        row = _states(run)["train_trunk"]
        assert row["state"] == "requeued" and "requeued 1x" in row["detail"], row
        # node1's rank is gone within the collective timeout (40 s) plus SLURM's kill, not waiting for its peer.
        end = time.time() + 60
        while _stage_procs("pgnode1") and time.time() < end:
            time.sleep(1)
        assert not _stage_procs("pgnode1"), "a rank on node1 still waits for its lost peer"
        gone = time.time() - lost
        subprocess.run([str(ROOT / "slurm" / "local" / "up"), "--nodes", "2"], check=True, timeout=120,
                       capture_output=True)
        states = _wait(run, lambda s: _all_done(s) and not cluster.active_jobs(run),
                       what="the requeued job to finish once node2 is back")
    finally:
        out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-3000:]
    assert states["train_trunk"]["job_id"] == job and states["train_trunk"]["nodes"] == "node[1-2]"
    last = run / "train_trunk" / "checkpoints" / f"step{steps:08d}"
    assert json.loads((last / "COMPLETE.json").read_text())["world_size"] == 2
    assert len(list(last.glob("*optim_states.pt"))) == 2  # each node's rank saved its own ZeRO-3 shard
    resumed = [int(x) for x in re.findall(r"from checkpoint step (\d+)", _log(run))]
    assert len(resumed) == 1 and every <= resumed[0] <= seen and resumed[0] % every == 0, (resumed, seen)
    _same_weights(run / "train_trunk", reference / "train_trunk", exact=True)
    records = [json.loads(x) for x in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps
    print(f"node lost at step {seen}; node1's rank gone {gone:.0f} s later")


def _stage_procs(netns: str) -> list[str]:
    """Command lines of the pixelgen stage processes (submitit tasks) running in a namespace node."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit" in cmd:
            found.append(cmd)
    return found
