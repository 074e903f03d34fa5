"""Run folders written by older pixelgens (tests/fixtures/run_folders/) read back, upgraded step by step
(pipeline/migrations.py); a folder from a newer pixelgen is refused, naming the versions."""

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import cli, migrations, rundir
from pipeline.config import _MOVED as MOVED, ConfigError, load_config, to_container
from pipeline.changes import _flatten
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "run_folders"
FOLDERS = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
TINY = ROOT / "configs" / "tiny.yaml"


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def test_every_old_schema_version_keeps_a_fixture_folder():
    versions = {int(p.name.split("-")[0][1:]) for p in FOLDERS}
    assert versions == set(range(migrations.SCHEMA_VERSION)), [p.name for p in FOLDERS]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_an_old_folder_reads_back_with_its_values_carried_over(folder):
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    cfg = rundir.load_run_config(folder)
    for stage in ("train_trunk", "train_decoder"):
        old = raw[stage]
        want = [old["ema_decay"]] if "ema_decay" in old else old["ema_decays"]
        assert list(cfg[stage].ema_decays) == want, stage
        assert cfg[stage].steps == old["steps"] and cfg[stage].lr == old["lr"]
    fid = raw["fid"]
    assert cfg.fid.reference == fid.get("reference", fid.get("reference_split"))
    if "ema" in fid:
        assert cfg.fid.weights == ("ema" if fid["ema"] else "model")
    for stage, res in raw["launch"].items():  # resources that moved to cluster profiles are gone, tasks kept
        if isinstance(res, dict):
            assert cfg.launch[stage].tasks == res["tasks"] and cfg.launch[stage].timeout_min == res["timeout_min"]
    # Every other value is carried over as it was: nothing is dropped or reset to a default on the way.
    migrated = {"train_trunk.ema_decay", "train_decoder.ema_decay", "fid.reference_split", "fid.ema",
                "train_trunk.init_from", "train_trunk.freeze_trunk", "train_trunk.trunk_lr", "launch.partition",
                "launch.account", *(f"launch.{s}.{k}" for s in raw["launch"] for k in MOVED)}
    now = _flatten(to_container(cfg))
    kept = {k: v for k, v in _flatten(raw).items() if k not in migrated}
    assert {k: now.get(k, "missing") for k in kept} == kept


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_status_and_resume_work_on_an_old_folder(folder, tmp_path, capsys):
    run = _copy(folder, tmp_path)
    assert cli.main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in rundir.load_run_config(run).stages)
    # Resume reads the upgraded config and gets as far as the input check: the fixture's ImageNet is not here.
    assert cli.main(["resume", str(run)]) == 2
    assert "data.imagenet_dir = '/data/imagenet' is not a folder" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == (folder / "config.yaml").read_bytes()  # left as it was


def test_a_new_folder_records_the_current_version_and_reads_back_unchanged(tmp_path):
    cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.imagenet_dir=/x"])
    run = rundir.prepare(cfg)
    text = (run / "config.yaml").read_text()
    assert text.startswith(f"schema_version: {migrations.SCHEMA_VERSION}\n")
    assert rundir.load_run_config(run) == cfg
    # At the current version no step runs: a key that only an old folder could hold is refused, not rewritten.
    (run / "config.yaml").write_text(text.replace("  ema_decays:\n", "  ema_decay: 0.5\n  ema_decays:\n", 1))
    with pytest.raises(ConfigError, match="ema_decay"):
        rundir.load_run_config(run)


def test_a_folder_from_a_newer_pixelgen_is_refused_naming_both_versions(tmp_path, capsys):
    run = _copy(FOLDERS[-1], tmp_path)
    newer = migrations.SCHEMA_VERSION + 1
    (run / "config.yaml").write_text(f"schema_version: {newer}\n" + (run / "config.yaml").read_text())
    assert cli.main(["status", str(run)]) == 2
    msg = capsys.readouterr().out.replace("\n", " ")
    assert f"config schema {newer}" in msg and f"reads schema {migrations.SCHEMA_VERSION} and older" in msg
    assert "upgrade pixelgen" in msg
    for bad in ("two", -1, True):
        (run / "config.yaml").write_text(f"schema_version: {bad}\nname: x\n")
        with pytest.raises(ConfigError, match="schema_version"):
            rundir.load_run_config(run)
