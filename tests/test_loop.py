"""The researcher's loop on a run folder: extend a finished run, keep milestones, evaluate them afterwards.

The runs are real (the tiny config through `pixelgen run`, DeepSpeed on gloo, real shards and torch-fidelity's
Inception with random weights); the refusals are checked on a prepared folder without training."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline import cli, rundir
from pipeline.config import ConfigError, load_config
from tests.conftest import TINY, pixelgen

# Two EMAs, milestones every 2 steps, one rolling checkpoint: the milestones must outlive the checkpoints.
TRAIN = ["stages=[shard,train_trunk]", "train_trunk.ckpt_every=2", "train_trunk.keep_ckpts=1",
         "train_trunk.keep_every=2", "train_trunk.ema_decays=[0.9,0.5]", "train_trunk.log_every=1"]
WEIGHTS = ("model.safetensors", "ema.safetensors", "ema-0.5.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fake_imagenet):
    """(extended, straight): 4 steps then `pixelgen extend` to 6, and 6 steps from the start."""
    base = tmp_path_factory.mktemp("loop")
    extended, straight = base / "extended", base / "straight"
    common = [f"data.imagenet_dir={fake_imagenet}", *TRAIN, "--executor", "debug"]
    pixelgen("run", str(TINY), f"run_dir={extended}", "train_trunk.steps=4", *common)
    first_end = load_file(extended / "train_trunk" / "export" / "ema.safetensors")
    proc = pixelgen("extend", str(extended), "train_trunk.steps=6", "--executor", "debug")
    pixelgen("run", str(TINY), f"run_dir={straight}", "train_trunk.steps=6", *common)
    return extended, straight, first_end, proc


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def test_extending_a_finished_run_equals_the_longer_run_from_the_start(runs):
    extended, straight, first_end, proc = runs
    assert "from checkpoint step 4" in proc.stdout + proc.stderr
    for name in WEIGHTS:  # bit-identical: constant LR, the data stream and RNG go on from the step-4 checkpoint
        assert _same(extended / "train_trunk" / "export" / name, straight / "train_trunk" / "export" / name), name
    losses = [[json.loads(line)["loss"] for line in (run / "train_trunk" / "metrics.jsonl").read_text().splitlines()]
              for run in (extended, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert rundir.marker(extended, "train_trunk")["steps"] == 6
    info = json.loads((extended / "run.json").read_text())
    (change,) = info["history"]
    assert change["command"] == "extend" and change["changes"] == {"train_trunk.steps": [4, 6]}
    assert change["rerun"] == ["train_trunk"] and info["config_hash"] == change["config_hash"] \
        != info["original_config_hash"]
    assert (extended / "train_trunk" / "superseded").is_dir()  # the old marker, set aside, not deleted


def test_milestones_survive_the_rolling_deletion_of_checkpoints(runs):
    extended, straight, first_end, _ = runs
    ckpts = sorted(p.name for p in (extended / "train_trunk" / "checkpoints").glob("step*"))
    assert ckpts == ["step00000006"]  # keep_ckpts=1
    for run in (extended, straight):
        folders = sorted(p.name for p in (run / "train_trunk" / "milestones").iterdir())
        assert folders == ["step00000002", "step00000004", "step00000006"]  # nothing partial left behind
    for step in (2, 4, 6):
        for name in WEIGHTS:
            a = extended / "train_trunk" / "milestones" / f"step{step:08d}" / name
            assert _same(a, straight / "train_trunk" / "milestones" / f"step{step:08d}" / name)
    # The step-4 milestone holds what the run exported when it first ended there.
    milestone = load_file(extended / "train_trunk" / "milestones" / "step00000004" / "ema.safetensors")
    assert all((milestone[k] == first_end[k]).all() for k in first_end)
    assert _same(extended / "train_trunk" / "milestones" / "step00000006" / "ema.safetensors",
                 extended / "train_trunk" / "export" / "ema.safetensors")


def test_eval_over_two_milestones_and_two_emas_resumes_after_a_kill(runs):
    extended = runs[0]
    args = ["eval", str(extended), "--steps", "2,4", "--weights", "ema,ema-0.5"]
    killed = pixelgen(*args, env={**os.environ, "PIXELGEN_FAULT": "eval_point@1"}, check=False)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # SIGKILL after the second point's record
    points = extended / "eval" / "points"
    kept = {p.name: p.stat().st_mtime_ns for p in points.glob("*.json")}
    assert sorted(kept) == ["train_trunk-step00000002-ema-0.5.json", "train_trunk-step00000002-ema.json"]
    proc = pixelgen(*args)
    out = proc.stdout + proc.stderr
    assert out.count(": on record") == 2 and "4 points (2 on record already)" in out
    assert {p.name: p.stat().st_mtime_ns for p in points.glob("*.json") if p.name in kept} == kept  # not redone
    results = json.loads((extended / "eval" / "results.json").read_text())
    rows = [(r["step"], r["weights"]) for r in results["points"]]
    assert rows == [(2, "ema"), (2, "ema-0.5"), (4, "ema"), (4, "ema-0.5")]
    assert all(r["fid"] > 0 and r["generator_step"] == r["step"] for r in results["points"])
    assert len({r["fid"] for r in results["points"]}) == 4  # four different generators
    assert Path(results["plot"]).stat().st_size > 10_000
    assert (extended / "eval" / "points" / "train_trunk-step00000004-ema-0.5.png").is_file()


def test_eval_names_what_is_not_on_disk(runs, capsys):
    extended = runs[0]
    assert cli.main(["eval", str(extended), "--steps", "3"]) == 2
    assert "--steps 3: train_trunk has weights at steps [2, 4, 6] only" in capsys.readouterr().out
    assert cli.main(["eval", str(extended), "--weights", "ema-0.7"]) == 2
    assert "--weights ema-0.7" in capsys.readouterr().out
    assert cli.main(["eval", str(extended), "--sampler", "cfg_scal=2"]) == 2
    assert "cfg_scal" in capsys.readouterr().out


def _prepared(tmp_path: Path, *overrides: str):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/x", *overrides])
    rundir.resolve_paths(cfg)
    return cfg, rundir.prepare(cfg)


def _done(run_dir: Path, stage: str, **summary) -> None:
    rundir.stage_dir(run_dir, stage).mkdir(parents=True, exist_ok=True)
    rundir.mark_done(run_dir, stage, {"stage": stage, **summary})


def test_a_change_that_alters_what_was_trained_is_refused_naming_the_key(tmp_path):
    cfg, run = _prepared(tmp_path, "train_trunk.lr_schedule=cosine")
    _done(run, "train_trunk", steps=6)
    longer = load_config(TINY, [f"run_dir={run}", "data.imagenet_dir=/x", "train_trunk.lr_schedule=cosine",
                                "train_trunk.steps=12"])
    with pytest.raises(ConfigError, match=r"train_trunk.steps: 6 -> 12 \(train_trunk.lr_schedule is cosine"):
        rundir.prepare(longer)
    for key, value in (("model.trunk.dim", 64), ("train_trunk.lr", 0.1), ("train_trunk.batch_size", 4),
                       ("objective.time_shift", 2.0)):
        other = load_config(TINY, [f"run_dir={run}", "data.imagenet_dir=/x", "train_trunk.lr_schedule=cosine",
                                   f"{key}={value}"])
        with pytest.raises(ConfigError, match=f"{key}: .* -> {value}"):
            rundir.prepare(other)
    assert rundir.marker(run, "train_trunk") is not None and "history" not in json.loads((run / "run.json").read_text())
    # Fewer steps than trained: refused too.
    cfg, run = _prepared(tmp_path / "b")
    _done(run, "train_trunk", steps=6)
    with pytest.raises(ConfigError, match="has trained 6 steps already"):
        rundir.prepare(load_config(TINY, [f"run_dir={run}", "data.imagenet_dir=/x", "train_trunk.steps=5"]))


def test_more_trunk_steps_set_aside_the_decoder_and_fid_keys_the_fid(tmp_path, capsys):
    cfg, run = _prepared(tmp_path)
    for stage in ("shard", "train_trunk", "train_decoder", "fid"):
        _done(run, stage, steps=6)
    (run / "train_decoder" / "checkpoints").mkdir()
    assert cli.main(["extend", str(run), "train_trunk.steps=8", "--no-run"]) == 0
    assert rundir.marker(run, "train_trunk") is None and rundir.marker(run, "fid") is None
    assert rundir.marker(run, "shard") is not None
    assert not (run / "train_decoder").exists()  # starts afresh from the longer trunk; the old one is kept aside
    (aside,) = run.glob("train_decoder.superseded-*")
    assert (aside / "checkpoints").is_dir() and (aside / "DONE.json").is_file()
    assert rundir.load_run_config(run).train_trunk.steps == 8
    # Sampling and FID keys make only the FID stale; cadences touch nothing finished.
    _done(run, "fid", fid=1.0)
    assert cli.main(["extend", str(run), "sampler.cfg_scale=3.0", "train_trunk.keep_every=4", "--no-run"]) == 0
    assert rundir.marker(run, "fid") is None and len(list((run / "fid" / "superseded").iterdir())) == 2
    history = json.loads((run / "run.json").read_text())["history"]
    assert [h["changes"] for h in history] == [
        {"train_trunk.steps": [6, 8]}, {"sampler.cfg_scale": [1.5, 3.0], "train_trunk.keep_every": [0, 4]}]
    assert cli.main(["extend", str(run), "model.decoder.depth=3", "--no-run"]) == 2
    assert "model.decoder.depth: 1 -> 3" in capsys.readouterr().out


def test_eval_checks_the_emas_of_the_stage_it_scores(tmp_path):
    """--stage train_trunk scores the trunk's EMAs, whatever the decoder (the run's last stage) keeps."""
    from pipeline import evaluate

    cfg, run = _prepared(tmp_path, "train_trunk.ema_decays=[0.9,0.5]", "train_decoder.ema_decays=[0.9]")
    for stage in ("train_trunk", "train_decoder"):
        (run / stage / "milestones" / "step00000002").mkdir(parents=True)
    (point,) = evaluate.plan_points(cfg, run, weights=["ema-0.5"], stage="train_trunk")
    assert point.path == str(run / "train_trunk" / "milestones" / "step00000002" / "ema-0.5.safetensors")
    with pytest.raises(ConfigError, match=r"--weights ema-0.5: train_decoder keeps the EMAs of decays \[0.9\]"):
        evaluate.plan_points(cfg, run, weights=["ema-0.5"], stage="train_decoder")
