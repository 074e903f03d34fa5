"""The stage contract and the chain, end to end, through the real `pixelgen` command, submitit's local
executor (real subprocesses), real WebDataset shards, a real DeepSpeed engine (gloo) and torch-fidelity."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline import rundir
from tests.conftest import TINY, pixelgen


def _tree_state(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(path.rglob("*")) if p.is_file() and "submitit" not in p.parts}


def test_chain_end_to_end(chain, fake_imagenet):
    run_dir, proc = chain
    for stage in ("shard", "train_trunk", "train_decoder", "fid"):
        assert (run_dir / stage / "DONE.json").is_file(), stage
    # Shards hold every source image.
    manifest = json.loads((run_dir / "shard" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["totals"]["count"] == 4 * 12
    assert manifest["splits"]["val"]["totals"]["count"] == 4 * 4
    assert len(manifest["bad_files"]) == 3 and "3 bad files skipped" in proc.stdout  # the fake set's broken files
    assert not list((run_dir / "shard").glob("progress-*.json"))  # the array's last task cleaned up
    # Both training stages exported consolidated weights; the decoder stage kept the trunk frozen.
    trunk = load_file(run_dir / "train_trunk" / "export" / "ema.safetensors")
    dec_model = load_file(run_dir / "train_decoder" / "export" / "model.safetensors")
    dec_ema = load_file(run_dir / "train_decoder" / "export" / "ema.safetensors")
    for k in trunk:
        if k.startswith("trunk."):
            assert (trunk[k] == dec_model[k]).all() and (trunk[k] == dec_ema[k]).all(), k
    assert any(not (trunk[k] == dec_model[k]).all() for k in trunk if k.startswith("decoder."))
    # Metrics file and sample grid from training.
    lines = [json.loads(x) for x in (run_dir / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and all(x["loss"] > 0 for x in lines)
    assert list((run_dir / "train_trunk" / "samples").glob("*.png"))
    # FID result, labelled as a proxy everywhere it appears.
    metrics = json.loads((run_dir / "fid" / "metrics.json").read_text())
    assert metrics["proxy"] is True and "proxy" in metrics["metric_name"]
    assert metrics["fid"] > 0 and metrics["protocol"]["num_gen"] == 4 * 3
    # The published protocol's metrics, against the training split (the default reference): all 48 images for
    # the statistics, and as the precision/recall manifold (fewer than fid.reference_images).
    assert metrics["sfid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    proto = metrics["protocol"]
    assert (proto["reference"], proto["num_ref"], proto["num_ref_precision_recall"]) == ("train", 48, 48)
    assert proto["metrics"] == ["fid", "is", "sfid", "precision_recall"] and proto["precision_recall_k"] == 3
    assert re.search(r"fid: +sFID [\d.]+, precision [\d.]+, recall [\d.]+ \(against train\)", proc.stdout)
    # Which weights were scored, and from which step: the decoder stage's first EMA, after its 4 steps.
    assert (proto["weights"], metrics["generator_step"]) == ("ema", 4)
    assert Path(metrics["sample_grid"]).is_file()
    out = proc.stdout
    assert "proxy" in out and str(run_dir) in out and "sample grid" in out
    for stage in ("shard", "train_trunk", "train_decoder", "fid"):
        assert stage in out
    assert "step 6/6  loss" in out  # the jobs' log lines were streamed while they ran


def test_rerun_skips_finished_stages(chain, fake_imagenet):
    run_dir, _ = chain
    before = _tree_state(run_dir)
    proc = pixelgen("run", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}",
                    "shard.array_tasks=2", "--executor", "local")
    assert proc.stdout.count("already done") == 4
    after = _tree_state(run_dir)
    assert before == after  # nothing rewritten
    # `pixelgen stage` on a finished stage is a no-op too.
    pixelgen("stage", "train_trunk", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}",
             "shard.array_tasks=2")
    assert _tree_state(run_dir) == before


def test_status_reports_each_stage(chain):
    run_dir, _ = chain
    out = pixelgen("status", str(run_dir)).stdout
    stages = ("shard", "train_trunk", "train_decoder", "fid")
    for stage in stages:
        assert stage in out
    assert out.count("done") == 4
    # Each stage is on its own table row, and that row's state cell says done.
    table = [[cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]] for line in out.splitlines()
             if re.match(r"\s*[│┃|]", line)]
    assert ["stage", "state"] == table[0][:2], out  # the header: the state is the second column
    states = {}
    for cells in table[1:]:
        if cells[0]:  # a folded detail continues on lines whose stage cell is empty
            assert cells[0] not in states, out
            states[cells[0]] = cells[1]
    assert states == {stage: "done" for stage in stages}, out


def test_failed_stage_leaves_no_marker_and_names_the_file(tmp_path, fake_imagenet):
    run_dir = tmp_path / "run"
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not a state dict")  # present, so the run starts; the fid stage finds it unreadable
    proc = pixelgen("run", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}",
                    "stages=[shard,train_trunk,fid]", "fid.allow_random_features=false",
                    f"fid.inception_weights={weights}", "--executor", "local", check=False)
    assert proc.returncode == 1
    assert str(weights) in proc.stdout and "not a torch-fidelity InceptionV3 state dict" in proc.stdout
    assert (run_dir / "train_trunk" / "DONE.json").is_file()
    assert not (run_dir / "fid" / "DONE.json").exists()
    assert not (run_dir / "fid" / "metrics.json").exists()


def _train_cmd(run_dir, fake_imagenet, steps, stage="train_trunk"):
    exe = Path(sys.executable).parent / "pixelgen"
    return [str(exe), "stage", stage, str(TINY), f"run_dir={run_dir}",
            f"data.imagenet_dir={fake_imagenet}", f"train_trunk.steps={steps}", "train_trunk.ckpt_every=4",
            "train_trunk.log_every=1"]


def _shard(run_dir, fake_imagenet, steps):
    subprocess.run(_train_cmd(run_dir, fake_imagenet, steps, stage="shard"), check=True, capture_output=True)


def test_killed_training_resumes_from_last_checkpoint(tmp_path, fake_imagenet):
    steps = 24
    # The uninterrupted reference run.
    ref = tmp_path / "ref"
    _shard(ref, fake_imagenet, steps)
    subprocess.run(_train_cmd(ref, fake_imagenet, steps), check=True, capture_output=True)

    run = tmp_path / "run"
    _shard(run, fake_imagenet, steps)
    proc = subprocess.Popen(_train_cmd(run, fake_imagenet, steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run / "train_trunk" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step00000008" / "COMPLETE.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train_trunk" / "DONE.json").exists()
    killed_at = max(json.loads(x)["step"] for x in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines())
    assert 8 <= killed_at < steps

    out = subprocess.run(_train_cmd(run, fake_imagenet, steps), check=True, capture_output=True, text=True)
    assert "resuming" in out.stderr and "from checkpoint step" in out.stderr
    records = [json.loads(x) for x in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # no step lost, none logged twice
    ref_records = [json.loads(x) for x in (ref / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]
    for name in ("model", "ema"):
        a = load_file(run / "train_trunk" / "export" / f"{name}.safetensors")
        b = load_file(ref / "train_trunk" / "export" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), f"{name}:{k} differs after resume"


def test_preemption_signal_checkpoints_then_resume_finishes(tmp_path, fake_imagenet):
    steps = 80
    run = tmp_path / "run"
    # ckpt_every larger than the run: the only checkpoint before the end is the one the signal causes.
    cmd = _train_cmd(run, fake_imagenet, steps) + ["train_trunk.ckpt_every=1000"]
    subprocess.run([*cmd[:2], "shard", *cmd[3:]], check=True, capture_output=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "train_trunk" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    assert "preemption" in out
    tags = sorted(p.name for p in (run / "train_trunk" / "checkpoints").glob("step*") if (p / "COMPLETE.json").exists())
    assert len(tags) == 1 and 5 <= int(tags[0][4:]) < steps
    assert not (run / "train_trunk" / "DONE.json").exists()

    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"from checkpoint step {int(tags[0][4:])}" in out.stderr
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert (run / "train_trunk" / "curves.png").is_file()


def test_two_ranks_through_the_local_executor(tmp_path, fake_imagenet):
    run = tmp_path / "run"
    pixelgen("run", str(TINY), f"run_dir={run}", f"data.imagenet_dir={fake_imagenet}",
             "stages=[shard,train_trunk]", "launch.train_trunk.tasks=2", "--executor", "local")
    assert (run / "train_trunk" / "DONE.json").is_file()
    # Only rank 0 logs: one record per logging step.
    records = [json.loads(x) for x in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    # Each rank wrote its own ZeRO optimizer shard into the complete checkpoint.
    last = run / "train_trunk" / "checkpoints" / "step00000006"
    assert (last / "COMPLETE.json").is_file()
    assert len(list(last.glob("*optim_states.pt"))) == 2


def test_a_training_stage_resumes_on_another_rank_count(tmp_path, fake_imagenet):
    """2 ranks -> 1 rank (launch.train_trunk.tasks, a resource: the run folder takes the change) at a crash after
    a checkpoint: the stage trains to the end with one loss record per step, and the checkpoints record the
    segments the shards' loader continued from. tests/test_loader.py checks that stream against its definition,
    tests/test_engine.py the ZeRO and EMA states against an uninterrupted run, both ways (2 -> 1 -> 2 ranks)."""
    import torch

    run = tmp_path / "run"
    args = [str(TINY), f"run_dir={run}", f"data.imagenet_dir={fake_imagenet}", "stages=[shard,train_trunk]",
            "train_trunk.ckpt_every=2", "train_trunk.log_every=1"]
    local = ["--executor", "local"]
    crash = {**os.environ, "PIXELGEN_FAULT": "step@3"}
    first = pixelgen("run", *args, "launch.train_trunk.tasks=2", *local, env=crash, check=False)
    assert first.returncode == 1 and (run / "train_trunk" / "checkpoints" / "step00000002" / "COMPLETE.json").is_file()
    second = pixelgen("run", *args, "launch.train_trunk.tasks=1", *local)
    assert "from checkpoint step 2 (written by 2 ranks, resumed on 1)" in second.stdout
    assert (run / "train_trunk" / "DONE.json").is_file()
    records = [json.loads(x) for x in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    client = torch.load(run / "train_trunk" / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    assert client["data"]["segments"] == [[0, 2, 4], [2, 1, 8]]  # (from batch, ranks, micro-batch)


def test_a_stage_already_running_is_refused(tmp_path, fake_imagenet):
    run = tmp_path / "run"
    cfg_args = [str(TINY), f"run_dir={run}", f"data.imagenet_dir={fake_imagenet}"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline import rundir\n"
        f"with rundir.stage_lock({str(run)!r}, 'shard'):\n"
        "    print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = pixelgen("stage", "shard", *cfg_args, check=False)
        assert proc.returncode == 2
        assert "already running" in proc.stdout and f"pid {holder.pid}" in proc.stdout
        assert not (run / "shard" / "DONE.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: the kernel released the lock, so the stage now runs.
    pixelgen("stage", "shard", *cfg_args)
    assert (run / "shard" / "DONE.json").is_file()
