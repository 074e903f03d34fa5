"""`pixelgen sample`: a grid and the single images from a run folder or an exported weights file, for a diffusion
run (the tiny chain) and an AR family (random weights), the same pixels for the same command, and one-line
errors naming the bad value, key or file."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from pipeline import cli
from pipeline.config import load_config, to_container
from pixelgen.families import build_generator
from tests.conftest import ROOT, pixelgen

RES, PAD = 16, 2  # the tiny configs' images; save_grid's padding
# The command's own subprocesses on one thread: on this small shared CPU torch's default threads made the AR's
# 4 images take 13 s instead of 0.5.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = PAD + row * (RES + PAD), PAD + col * (RES + PAD)
    return grid[y:y + RES, x:x + RES]


def _outputs(source: Path) -> set[Path]:
    base = (source if source.is_dir() else source.parent) / "samples"
    return {p for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()


def _made(source: Path, before: set[Path]) -> Path:
    """The one folder of samples made since `before`."""
    (made,) = _outputs(source) - before
    return made


def _sample(*args: str) -> Path:
    """`pixelgen sample ARGS` in this process (the real command's code, without a new interpreter per call); the
    folder it wrote."""
    before = _outputs(Path(args[0]))
    assert cli.main(["sample", *args, "--device", "cpu"]) == 0
    return _made(Path(args[0]), before)


def _written(out: Path) -> tuple[np.ndarray, dict]:
    return _png(out / "grid.png"), json.loads((out / "samples.json").read_text())


def _assert_layout(out: Path, classes: list[int], per_class: int) -> np.ndarray:
    """grid.png is one row per class of per_class images, each the same pixels as images/<class>_<n>.png."""
    grid, record = _written(out)
    assert grid.shape == (PAD + len(classes) * (RES + PAD), PAD + per_class * (RES + PAD), 3)
    for row, c in enumerate(classes):
        for n in range(per_class):
            assert np.array_equal(_tile(grid, row, n), _png(out / "images" / f"{c}_{n}.png")), (c, n)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{c}_{n}.png" for c in classes for n in range(per_class))
    assert (record["classes"], record["per_class"]) == (classes, per_class)
    return grid


# ------------------------------------------------------------------------------------------ diffusion run
@pytest.fixture(scope="module")
def run_copy(chain, tmp_path_factory) -> Path:
    """What sampling reads of the chain's run folder (its config and the decoder stage's export), copied: the
    default output goes into the run folder, and the shared chain's stays as the chain left it."""
    run_dir = tmp_path_factory.mktemp("copy") / "run"
    shutil.copytree(chain[0] / "train_decoder" / "export", run_dir / "train_decoder" / "export")
    shutil.copy(chain[0] / "config.yaml", run_dir / "config.yaml")
    return run_dir


def test_a_run_folder_gives_its_grid_and_the_settings_used(chain, tmp_path):
    run_dir, _ = chain
    out = tmp_path / "look"
    proc = pixelgen("sample", str(run_dir), "--classes", "1,3", "--per-class", "2", "--steps", "2", "--seed", "7",
                    "--out", str(out), "--device", "cpu", env=ONE_THREAD)
    _assert_layout(out, [1, 3], 2)
    record = json.loads((out / "samples.json").read_text())
    # The decoder stage's first EMA (the last training stage's export), from its 4 steps.
    assert Path(record["weights"]) == (run_dir / "train_decoder" / "export" / "ema.safetensors").resolve()
    assert (record["stage"], record["step"], record["seed"], record["device"]) == ("train_decoder", 4, 7, "cpu")
    assert record["weights_choice"] == "ema"  # the run's fid.weights
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))["sampler"]
    assert record["sampler"] == {**saved, "steps": 2}  # the run's sampler, --steps on top
    assert record["sampling_precision"] == "fp32" and record["seconds"] > 0
    summary = " ".join(proc.stdout.split())
    assert str(out / "grid.png") in summary and "4 images (2 classes x 2)" in summary


def test_the_same_command_gives_the_same_pixels_in_a_new_folder(run_copy):
    run_dir = run_copy
    args = (str(run_dir), "--classes", "0,2", "--per-class", "2", "--steps", "2")
    first = _sample(*args)
    second = _sample(*args)
    assert first != second and first.parent == second.parent == run_dir / "samples"  # never written over
    assert np.array_equal(_written(first)[0], _written(second)[0])
    # Another seed, other noise.
    other = _sample(*args, "--seed", "1")
    assert not np.array_equal(_written(first)[0], _written(other)[0])
    guided = _sample(*args, "--cfg", "4.0")
    assert _written(first)[1]["sampler"]["cfg_scale"] == 1.5 and _written(guided)[1]["sampler"]["cfg_scale"] == 4.0
    # An image's noise is its own (seed, class, n): asking for one class of them draws the same image.
    alone = _sample(str(run_dir), "--classes", "2", "--per-class", "1", "--steps", "2", "--batch-size", "1")
    diff = np.abs(_png(alone / "images" / "2_0.png").astype(int) - _png(first / "images" / "2_0.png").astype(int))
    assert diff.max() <= 1  # another batch, so another matmul blocking on the CPU: a rounding step at most


def test_sampler_settings_on_the_command_line_are_used(run_copy):
    run_dir = run_copy
    args = (str(run_dir), "--classes", "1", "--per-class", "2", "--steps", "2")
    euler, heun = _sample(*args), _sample(*args, "sampler.kind=heun", "sampler.cfg_interval=[0.5,1.0]")
    record = _written(heun)[1]["sampler"]
    assert (record["kind"], record["cfg_interval"], record["steps"]) == ("heun", [0.5, 1.0], 2)
    assert not np.array_equal(_written(euler)[0], _written(heun)[0])


@pytest.fixture(scope="module")
def class_aware(chain, tmp_path_factory) -> Path:
    """The chain's weights, shaken so that the class matters: its 10 training steps leave the class path so near
    zero that the guided and unguided velocities agree to 1e-7 and no guidance scale moves a pixel of it."""
    from pixelgen.engine.export import load_weights

    state, meta = load_weights(chain[0] / "train_decoder" / "export" / "ema.safetensors")
    g = torch.Generator().manual_seed(0)
    shaken = {k: (v + 0.3 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
    path = tmp_path_factory.mktemp("class_aware") / "ema.safetensors"
    save_file(shaken, path, {"pixelgen": json.dumps(meta)})
    return path


def test_the_guidance_scale_reaches_the_sampler(class_aware):
    args = (str(class_aware), "--classes", "0,2", "--per-class", "2", "--steps", "2")  # steps at t = 0 and 0.5
    plain, guided = _written(_sample(*args, "--cfg", "1.0"))[0], _written(_sample(*args, "--cfg", "4.0"))[0]
    assert np.abs(plain.astype(int) - guided.astype(int)).mean() > 1
    # Guidance only inside sampler.cfg_interval (open): (0.6, 1) holds neither step, so none is guided.
    outside = _written(_sample(*args, "--cfg", "4.0", "sampler.cfg_interval=[0.6,1.0]"))[0]
    assert np.array_equal(outside, plain)


# ------------------------------------------------------------------------------------------------- AR family
@pytest.fixture(scope="module")
def ar_weights(tmp_path_factory) -> Path:
    """Random weights of the discrete semantic AR + pixel AR (method B), exported as a training stage exports
    them: safetensors with the run config in the metadata. Its dictionary is the zeros it is built with (k-means
    fills it in training): a model that samples, badly."""
    cfg = load_config(ROOT / "configs" / "tiny_dual_ar_discrete.yaml", ["data.imagenet_dir=/x"])
    torch.manual_seed(0)
    model = build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution, pretrained=False)
    plain = to_container(cfg)
    # Made on another machine: the teacher's file is not here, and sampling needs no teacher.
    plain["model"]["trunk"]["ar"]["teacher"]["weights"] = "/cluster/weights/dinov3_s16.safetensors"
    path = tmp_path_factory.mktemp("ar") / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path,
              {"pixelgen": json.dumps({"config": plain, "stage": "train_trunk", "step": 0})})
    return path


def test_an_ar_weights_file_gives_its_grid_beside_it(ar_weights):
    before = _outputs(ar_weights)
    proc = pixelgen("sample", str(ar_weights), "--classes", "0,3", "--per-class", "2", "--batch-size", "3",
                    "--device", "cpu", env=ONE_THREAD)
    out = _made(ar_weights, before)
    assert out.parent == ar_weights.parent / "samples"
    grid = _assert_layout(out, [0, 3], 2)
    assert grid.std() > 0  # pixels drawn, not a blank canvas
    record = json.loads((out / "samples.json").read_text())
    assert (record["stage"], record["step"], record["run"]) == ("train_trunk", 0, "tiny_dual_ar_discrete")
    assert record["sampler"]["guidance"] == "z" and record["sampler"]["cfg_schedule"] == "linear"
    assert str(out / "grid.png") in " ".join(proc.stdout.split())


# --------------------------------------------------------------------------------------------- bad input
def _refused(capsys, *args: str) -> str:
    assert cli.main(["sample", *args, "--device", "cpu"]) == 2
    return " ".join(capsys.readouterr().out.split())


def test_bad_input_is_one_line_naming_it(ar_weights, tmp_path, capsys):
    w = str(ar_weights)
    msg = _refused(capsys, w, "--classes", "1,4")
    assert "class 4 is out of range" in msg and "0 to 3" in msg
    msg = _refused(capsys, w, "sampler.bogus=1")
    assert "unknown key 'sampler.bogus'" in msg
    msg = _refused(capsys, w, "sampler.steps=many")
    assert "sampler.steps" in msg and "many" in msg
    msg = _refused(capsys, w, "--per-class", "0")
    assert "--per-class 0" in msg
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    msg = _refused(capsys, str(plain))
    assert str(plain) in msg and "no pixelgen run config" in msg
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file")
    msg = _refused(capsys, str(garbage))
    assert str(garbage) in msg and "not a readable .safetensors file" in msg
    taken = tmp_path / "taken"
    (taken / "grid.png").parent.mkdir()
    (taken / "grid.png").write_bytes(b"earlier")
    msg = _refused(capsys, w, "--out", str(taken))
    assert str(taken) in msg and (taken / "grid.png").read_bytes() == b"earlier"
    # The real command: exit status 2 and the message, no traceback.
    missing = tmp_path / "nowhere" / "ema.safetensors"
    proc = pixelgen("sample", str(missing), check=False, env=ONE_THREAD)
    assert proc.returncode == 2 and str(missing) in proc.stdout and "Traceback" not in proc.stderr


def test_a_run_folder_refuses_an_ema_it_does_not_keep(run_copy, capsys):
    msg = _refused(capsys, str(run_copy), "--weights", "ema-0.5")
    assert "ema-0.5" in msg and "[0.9]" in msg
