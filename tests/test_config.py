"""Config errors name the key and where it came from, before anything runs."""

import os

import pytest

from pipeline import rundir
from pipeline.config import ConfigError, load_config
from tests.conftest import TINY, pixelgen


def _err(tmp_path, yaml_text=None, overrides=()):
    path = TINY
    if yaml_text is not None:
        path = tmp_path / "exp.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value), str(path)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    msg, path = _err(tmp_path, "name: x\ndata: {imagenet_dir: /x}\nmodel:\n  trunk:\n    depht: 3\n")
    assert "model.trunk.depht" in msg and path in msg


def test_wrong_type_names_key(tmp_path):
    msg, path = _err(tmp_path, "data: {imagenet_dir: /x}\ntrain_trunk:\n  lr: fast\n")
    assert "train_trunk.lr" in msg and path in msg and "fast" in msg


def test_override_errors_name_the_override(tmp_path):
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "train_trunk.stepz=3"])
    assert "train_trunk.stepz" in msg and "command line" in msg
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "train_trunk.steps=abc"])
    assert "train_trunk.steps" in msg
    msg, _ = _err(tmp_path, overrides=["no_equals_sign"])
    assert "key=value" in msg


def test_patch_size_must_divide_resolution(tmp_path):
    msg, path = _err(tmp_path, overrides=["data.imagenet_dir=/x", "model.trunk.patch_size=5"])
    assert "model.trunk.patch_size" in msg and "data.resolution=16" in msg and path in msg


def test_decoder_stage_without_trunk(tmp_path):
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "stages=[shard,train_decoder,fid]"])
    assert "train_decoder.init_from" in msg and "train_trunk" in msg


@pytest.mark.parametrize("override, key", [
    ("stages=[fid,shard]", "stages"),
    ("stages=[shard,train_trunk,evaluate]", "stages"),
    ("train_trunk.grad_accum=3", "train_trunk.batch_size"),
    ("train_trunk.zero_stage=4", "train_trunk.zero_stage"),
    ("model.num_classes=5", "model.num_classes"),
    ("sampler.cfg_interval=[0.9,0.1]", "sampler.cfg_interval"),
    ("logging.wandb=sometimes", "logging.wandb"),
    ("model.trunk.size=huge", "model.trunk.size"),
    ("model.trunk.heads=3", "model.trunk.heads"),
    ("data.imagenet_dir=null", "data.imagenet_dir"),
    ("objective.kind=eps", "objective.kind"),
    ("objective.t_eps=0", "objective.t_eps"),
    ("sampler.kind=dpm", "sampler.kind"),
    ("model.decoder.kind=unet", "model.decoder.kind"),
    ("model.decoder.adaln=global", "model.decoder.adaln"),
    ("model.repa.block=3", "model.repa.block"),  # the tiny trunk has 2 blocks
    ("model.repa.block=1", "model.repa.teacher.weights"),  # REPA on (weight 0.5 below) without a teacher file
    ("model.trunk.kind=dino_student", "model.trunk.student.teacher.name"),  # patch 4 has no DINO encoder
])
def test_impossible_combinations(tmp_path, override, key):
    overrides = ["data.imagenet_dir=/x", override] if not override.startswith("data.imagenet_dir") else [override]
    if override.startswith("model.repa"):
        overrides.append("model.repa.weight=0.5")
    msg, _ = _err(tmp_path, overrides=overrides)
    assert f"'{key}'" in msg



def test_model_init_is_a_known_one_that_the_family_has(tmp_path):
    msg, path = _err(tmp_path, "data: {imagenet_dir: /x}\nmodel:\n  init: xavier\n")
    assert "'model.init'" in msg and "xavier" in msg and "published" in msg and path in msg
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "model.init=published", "model.trunk.kind=semantic_ar"])
    assert "'model.init'" in msg and "model.init=pixelgen" in msg
    assert load_config(TINY, ["data.imagenet_dir=/x", "model.init=published"]).model.init == "published"

@pytest.mark.parametrize("stage", ["train_trunk", "train_decoder"])
def test_batch_must_split_evenly_over_the_ranks(tmp_path, stage):
    # tiny.yaml: batch 8, grad_accum 1. Three ranks cannot share 8 images evenly.
    assert load_config(TINY, ["data.imagenet_dir=/x"])[stage].batch_size == 8
    msg, path = _err(tmp_path, overrides=["data.imagenet_dir=/x", f"launch.{stage}.tasks=3"])
    assert f"'{stage}.batch_size'" in msg and f"launch.{stage}.tasks" in msg and path in msg
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", f"launch.{stage}.tasks=2", f"{stage}.grad_accum=8"])
    assert f"'{stage}.batch_size'" in msg and f"launch.{stage}.tasks" in msg
    # Rank counts that divide the batch (with its accumulation) are accepted.
    for extra in ([f"launch.{stage}.tasks=2"], [f"launch.{stage}.tasks=8"],
                  [f"launch.{stage}.tasks=2", f"{stage}.grad_accum=4"]):
        cfg = load_config(TINY, ["data.imagenet_dir=/x", *extra])
        assert cfg.launch[stage].tasks == int(extra[0].split("=")[1])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_rejects_bad_config_before_any_stage(tmp_path):
    run_dir = tmp_path / "run"
    proc = pixelgen("run", str(TINY), f"run_dir={run_dir}", "data.imagenet_dir=/x", "model.trunk.patch_size=3",
                    check=False)
    assert proc.returncode == 2
    assert "model.trunk.patch_size" in proc.stdout
    assert not run_dir.exists()  # nothing was created, nothing submitted


def test_missing_input_paths_are_named_before_anything_is_created(tmp_path):
    run_dir = tmp_path / "run"
    proc = pixelgen("run", str(TINY), f"run_dir={run_dir}", "data.imagenet_dir=/nonexistent",
                    "fid.allow_random_features=false", check=False, env={**os.environ, "PIXELGEN_INCEPTION_WEIGHTS": ""})
    assert proc.returncode == 2
    assert "data.imagenet_dir = '/nonexistent' is not a folder" in proc.stdout
    assert "the fid stage has no Inception weights" in proc.stdout
    assert not run_dir.exists()
    # Without the shard stage: the shards must be there; a stage already done needs nothing any more.
    cfg = load_config(TINY, [f"run_dir={run_dir}", f"data.shard_dir={tmp_path}", "stages=[train_trunk,fid]",
                             f"fid.inception_weights={tmp_path / 'absent.pth'}"])
    problems = rundir.missing_inputs(cfg, run_dir)
    assert [p.split(" = ")[0] for p in problems] == ["data.shard_dir", "fid.inception_weights"]
    (tmp_path / "manifest.json").write_text("{}")
    rundir.mark_done(run_dir, "fid", {"fid": 1.0})
    assert rundir.missing_inputs(cfg, run_dir) == []
    # A cluster whose nodes see paths this machine does not: the profile opts out.
    from pipeline import cli
    from pipeline.cluster import ClusterProfile

    bad = load_config(TINY, [f"run_dir={tmp_path / 'other'}", "data.imagenet_dir=/nodes-only"])
    with pytest.raises(ConfigError, match="check_paths: false in slurm/x.yaml"):
        cli._check_inputs(bad, tmp_path / "other", ("slurm/x.yaml", ClusterProfile()))
    cli._check_inputs(bad, tmp_path / "other", ("slurm/x.yaml", ClusterProfile(check_paths=False)))


def test_run_folder_records_config_version_and_git(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/x"])
    rundir.resolve_paths(cfg)
    run_dir = rundir.prepare(cfg)
    saved = rundir.load_run_config(run_dir)
    assert saved == cfg
    info = (run_dir / "run.json").read_text()
    assert "pixelgen_version" in info and "git_revision" in info and "config_hash" in info
    # The same config again is fine; a different one is refused with the changed key named.
    rundir.prepare(cfg)
    # Resources are not the experiment: another rank count is recorded, not refused.
    cfg.launch.fid.tasks = 4
    rundir.prepare(cfg)
    assert rundir.load_run_config(run_dir).launch.fid.tasks == 4
    cfg.train_trunk.lr = 0.5
    with pytest.raises(ConfigError, match="train_trunk.lr") as err:
        rundir.prepare(cfg)
    assert "launch" not in str(err.value)


def test_every_path_is_made_absolute_for_jobs_started_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "dino.safetensors").write_bytes(b"")
    cfg = load_config(TINY, ["run_dir=runs/a", "data.imagenet_dir=data/in", "model.repa.weight=0.5", "model.repa.block=1",
                             "model.repa.teacher.weights=weights/dino.safetensors"])
    rundir.resolve_paths(cfg)
    assert cfg.run_dir == str(tmp_path / "runs" / "a") and cfg.data.imagenet_dir == str(tmp_path / "data" / "in")
    assert cfg.model.repa.teacher.weights == str(tmp_path / "weights" / "dino.safetensors")


def test_decoder_only_keys_are_refused_on_the_trunk_stage(tmp_path):
    # Once silently ignored: the trunk stage has no trunk to load or freeze.
    for key in ("init_from=/x", "freeze_trunk=false", "trunk_lr=0.1"):
        with pytest.raises(ConfigError, match=rf"'train_trunk.{key.split('=')[0]}' belongs to the decoder stage.*"
                                              rf"set train_decoder.{key.split('=')[0]}"):
            load_config(TINY, ["data.imagenet_dir=/x", f"train_trunk.{key}"])
    # Run folders written while both stages shared one schema: tests/test_migrations.py.


def test_fid_weights_name_an_export_or_a_file(tmp_path):
    from pipeline.stages import _generator_weights

    base = ["data.imagenet_dir=/x", "train_decoder.ema_decays=[0.9,0.99]"]
    run = tmp_path / "run"
    for weights, file in (("ema", "ema.safetensors"), ("model", "model.safetensors"),
                          ("ema-0.9", "ema.safetensors"), ("ema-0.99", "ema-0.99.safetensors")):
        cfg = load_config(TINY, [*base, f"fid.weights={weights}"])
        assert _generator_weights(cfg, run) == run / "train_decoder" / "export" / file, weights
    msg, _ = _err(tmp_path, overrides=[*base, "fid.weights=ema-0.999"])
    assert "'fid.weights' = 'ema-0.999'" in msg and "[0.9, 0.99]" in msg  # the decoder stage keeps these
    msg, _ = _err(tmp_path, overrides=[*base, f"fid.weights={tmp_path / 'absent.safetensors'}"])
    assert "'fid.weights'" in msg and "existing .safetensors file" in msg
    own = tmp_path / "mine.safetensors"
    own.write_bytes(b"")
    assert _generator_weights(load_config(TINY, [*base, f"fid.weights={own}"]), run) == own


def test_old_fid_keys_say_what_they_became(tmp_path):
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "fid.reference_split=val"])
    assert "'fid.reference_split' is now 'fid.reference'" in msg
    msg, _ = _err(tmp_path, overrides=["data.imagenet_dir=/x", "fid.ema=false"])
    assert "'fid.ema' is now 'fid.weights'" in msg
    # Run folders that hold them read back: tests/test_migrations.py.
