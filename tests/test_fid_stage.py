"""The FID stage at scale, on the CPU, through the real `pixelgen` command: ranks share the chunks and draw the
same images, a killed or preempted stage resumes to the same numbers, classes are exactly balanced and memory
does not grow with the sample count. Real WebDataset shards, torch-fidelity's InceptionV3 (random init: no
weights here), gloo between ranks through submitit's local executor."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from pipeline.config import ConfigError, load_config
from tests.conftest import ROOT, TINY, pixelgen

# Bits are the same on the same hardware: on the CPU that includes each rank's thread count (a convolution
# splits its work by thread), so every run here gives each rank one thread, as two ranks on two cores get.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PER_CLASS, CLASSES, CHUNK = 5, 4, 4  # 20 images in 5 chunks of 4, drawn in batches of 3 (3 + 1 per chunk)
CHUNKS = 5
METRICS = ("fid", "isc_mean", "isc_std", "sfid", "precision", "recall")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fake_imagenet) -> Path:
    run_dir = tmp_path_factory.mktemp("fid-shards") / "run"
    pixelgen("stage", "shard", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}")
    return run_dir / "shard"


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    """A tiny generator's weights (random init, seeded): the stage scores whatever weights it is given."""
    from pixelgen import families

    cfg = load_config(TINY, ["data.imagenet_dir=x"])
    torch.manual_seed(0)
    model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    path = tmp_path_factory.mktemp("generator") / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _args(run: Path, shards: Path, generator: Path, *extra: str) -> list[str]:
    return [str(TINY), f"run_dir={run}", f"data.shard_dir={shards}", "stages=[fid]", f"fid.weights={generator}",
            f"fid.samples_per_class={PER_CLASS}", f"fid.chunk_size={CHUNK}", "fid.batch_size=3", *extra]


def _stage_cmd(run, shards, generator, *extra) -> list[str]:
    return [str(Path(sys.executable).parent / "pixelgen"), "stage", "fid", *_args(run, shards, generator, *extra)]


def _results(run: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    metrics = json.loads((run / "fid" / "metrics.json").read_text())
    with np.load(run / "fid" / "samples.npz") as npz:
        return metrics, npz["arr_0"], npz["labels"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards, generator):
    """One rank, start to finish: the run every other way of getting there must match."""
    run = tmp_path_factory.mktemp("fid-one-rank") / "run"
    subprocess.run(_stage_cmd(run, shards, generator), check=True, capture_output=True, env=ENV)
    return _results(run)


def test_one_and_two_ranks_draw_the_same_images_and_score_the_same(tmp_path, shards, generator, uninterrupted):
    one, images, labels = uninterrupted
    # Exact class balance, in sample order, and the ADM layout (uint8 NHWC).
    assert images.dtype == np.uint8 and images.shape == (PER_CLASS * CLASSES, 16, 16, 3)
    assert labels.tolist() == [c for c in range(CLASSES) for _ in range(PER_CLASS)]
    assert one["protocol"]["class_counts"] == {"min": PER_CLASS, "max": PER_CLASS}
    assert one["protocol"]["ranks"] == 1 and one["protocol"]["num_gen"] == PER_CLASS * CLASSES
    assert one["protocol"]["cpu_threads_per_rank"] == 1

    run = tmp_path / "two"
    pixelgen("run", *_args(run, shards, generator, "launch.fid.tasks=2"), "--executor", "local", env=ENV)
    two, images2, labels2 = _results(run)
    assert two["protocol"]["ranks"] == 2
    assert np.array_equal(images2, images) and np.array_equal(labels2, labels)  # bit for bit
    assert {k: two[k] for k in METRICS} == {k: one[k] for k in METRICS}  # the reference cached beside the shards
    assert two["protocol"]["reference_cache"] == one["protocol"]["reference_cache"]
    assert Path(one["protocol"]["reference_cache"]).parent == shards / "fid_reference"

    # The reference computed by two ranks (a copy of the shards, no cache): each featurised half the shards.
    fresh = tmp_path / "shards"
    shutil.copytree(shards, fresh, ignore=shutil.ignore_patterns("fid_reference"))
    run3 = tmp_path / "three"
    pixelgen("run", *_args(run3, fresh, generator, "launch.fid.tasks=2"), "--executor", "local", env=ENV)
    three, images3, _ = _results(run3)
    assert np.array_equal(images3, images)
    with np.load(one["protocol"]["reference_cache"]) as a, np.load(three["protocol"]["reference_cache"]) as b:
        assert np.array_equal(a["features"], b["features"])  # the precision/recall images, in shard order
        for key in ("mu", "sigma", "mu_s", "sigma_s"):  # moments merged in another order: equal to rounding
            np.testing.assert_allclose(b[key], a[key], rtol=1e-9, atol=1e-12)
    for key in METRICS:
        assert three[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9)


def test_a_killed_stage_resumes_every_chunk_once_on_any_rank_count_and_ends_bit_identical(
        tmp_path, shards, generator, uninterrupted):
    run = tmp_path / "run"
    chunks = run / "fid" / "chunks" / "point000"
    # Killed (as by SIGKILL) right after chunk 1 was written...
    proc = subprocess.run(_stage_cmd(run, shards, generator), capture_output=True, text=True,
                          env={**ENV, "PIXELGEN_FAULT": "fid_chunk@1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in chunks.glob("chunk*.npz")) == ["chunk00000.npz", "chunk00001.npz"]
    written = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk*.npz")}
    # ...then in the middle of writing chunk 3: its bytes are on disk under a temporary name only.
    proc = subprocess.run(_stage_cmd(run, shards, generator), capture_output=True, text=True,
                          env={**ENV, "PIXELGEN_FAULT": "fid_chunk_write@3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "2 on disk, 3 to draw" in proc.stderr
    assert sorted(p.name for p in chunks.glob("chunk*.npz")) == [f"chunk0000{k}.npz" for k in range(3)]
    assert list(chunks.glob(".chunk00003.npz.*.tmp"))  # the half-written chunk, never taken for one
    assert {p: chunks.joinpath(p).stat().st_mtime_ns for p in written} == written  # not drawn again
    assert not (run / "fid" / "DONE.json").exists()

    # The requeued job gets another allocation: two ranks finish what one rank started.
    proc = pixelgen("run", *_args(run, shards, generator, "launch.fid.tasks=2"), "--executor", "local", env=ENV)
    assert "3 on disk, 2 to draw on 2 rank(s)" in proc.stdout + proc.stderr
    metrics, images, labels = _results(run)
    assert metrics["protocol"]["ranks"] == 2
    ref_metrics, ref_images, ref_labels = uninterrupted
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    assert {k: metrics[k] for k in METRICS} == {k: ref_metrics[k] for k in METRICS}
    assert not chunks.exists()  # scored and assembled: the chunks are gone, samples.npz holds the images


def test_a_preemption_signal_finishes_the_chunk_exits_75_and_resumes(tmp_path, shards, generator, uninterrupted):
    run = tmp_path / "run"
    chunks = run / "fid" / "chunks" / "point000"
    proc = subprocess.Popen(_stage_cmd(run, shards, generator), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    deadline = time.time() + 300
    while not list(chunks.glob("chunk*.npz")):
        assert proc.poll() is None and time.time() < deadline, "the stage ended before its first chunk was seen"
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    assert "preemption signal" in out
    left = len(list(chunks.glob("chunk*.npz")))
    assert 1 <= left < CHUNKS and not list(chunks.glob(".chunk*.tmp"))  # whole chunks only
    proc = subprocess.run(_stage_cmd(run, shards, generator), capture_output=True, text=True, check=True, env=ENV)
    assert f"{left} on disk, {CHUNKS - left} to draw" in proc.stderr
    metrics, images, _ = _results(run)
    assert np.array_equal(images, uninterrupted[1])
    assert {k: metrics[k] for k in METRICS} == {k: uninterrupted[0][k] for k in METRICS}


def test_changed_settings_draw_again_instead_of_reusing_chunks(tmp_path, shards, generator, uninterrupted):
    run = tmp_path / "run"
    subprocess.run(_stage_cmd(run, shards, generator), capture_output=True,
                   env={**ENV, "PIXELGEN_FAULT": "fid_chunk@1"})
    # A run folder takes another sampler (pipeline/changes.py: the FID is made again), so what keeps chunks of
    # one setting out of another's score is the plan they were drawn under: a plan that differs from the one
    # asked for (here edited by hand) is drawn again, never scored.
    from pixelgen.eval import sampling

    plan_path = run / "fid" / "chunks" / "point000" / sampling.PLAN_FILE
    plan = json.loads(plan_path.read_text())
    plan["key"]["sampler"]["steps"] = 2
    plan_path.write_text(json.dumps(plan))
    proc = subprocess.run(_stage_cmd(run, shards, generator), capture_output=True, text=True, check=True, env=ENV)
    assert "2 chunks were drawn for other settings; drawing again" in proc.stderr
    assert "0 on disk, 5 to draw" in proc.stderr
    metrics, images, _ = _results(run)
    assert np.array_equal(images, uninterrupted[1])


def test_sweep_entries_may_name_other_weights(tmp_path):
    base = ["data.imagenet_dir=x", "train_trunk.ema_decays=[0.9,0.99]", "train_decoder.ema_decays=[0.9,0.99]"]
    cfg = load_config(TINY, [*base, "fid.sweep=['cfg_scale=2.0 weights=ema-0.99','cfg_scale=3.0']"])
    from pipeline.config import sweep_points

    points = sweep_points(cfg)
    assert [(p.entry, p.sampler.cfg_scale, p.weights) for p in points] == [
        ("cfg_scale=2.0 weights=ema-0.99", 2.0, "ema-0.99"), ("cfg_scale=3.0", 3.0, "ema")]
    with pytest.raises(ConfigError, match=r"fid.sweep' entry 'weights=ema-0.5'.*decays \[0.9, 0.99\]"):
        load_config(TINY, [*base, "fid.sweep=['weights=ema-0.5']"])
    with pytest.raises(ConfigError, match="entry 'weights=/nowhere.safetensors'.*existing .safetensors"):
        load_config(TINY, [*base, "fid.sweep=['weights=/nowhere.safetensors']"])


def test_memory_stays_flat_as_the_sample_count_grows(tmp_path):
    """Peak resident memory of the sampling path (draw, featurise, write chunks, score from them, assemble
    samples.npz) for 4x the images stays within 10% of 1x, and grows by far less than the images would take."""
    from pixelgen.eval import fid
    from pixelgen.eval.config import FIDConfig

    weights, _ = fid.resolve_inception_weights(FIDConfig(allow_random_features=True), str(tmp_path))
    # 512 px: each image is 768 KB, so holding the 64 images of the 4x run would add 48 MB; Inception resizes
    # to 299 px whatever the size, so a large image costs no more to featurise.
    spec = {"folder": str(tmp_path), "weights": weights, "resolution": 512, "chunk_size": 8, "batch_size": 8,
            "counts": [4, 16], "num_classes": 4}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "tests.fid_memory_worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    small, large = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = large["peak"] - small["peak"]
    assert large["peak"] <= 1.10 * small["peak"], (small, large)
    assert grown < 0.25 * (large["image_bytes"] - small["image_bytes"]), (small, large)
