"""Data components: fake ImageNet and the shard stage. Tiny sizes. (Source layouts: test_sources.py; loaders:
test_loader.py.)"""

import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pixelgen.data import fake_imagenet, shards
from pixelgen.data.config import ShardConfig
from pixelgen.data.shards import read_manifest, shard_paths, verify_shards, write_shards
from tests.conftest import pixelgen

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE = 4, 6, 3, 32
RES = 16  # < SIZE / 2, so the BOX-halving step of the ADM crop runs too
CFG = ShardConfig(max_count=5, workers=2, seed=3)


def tree_bytes(root) -> dict[str, bytes]:
    """{relative path: content} of every file under root."""
    out = {}
    for path in glob.glob(os.path.join(root, "**", "*"), recursive=True) + glob.glob(os.path.join(root, ".*")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def mtimes(root) -> dict[str, int]:
    return {name: os.stat(os.path.join(root, name)).st_mtime_ns for name in os.listdir(root)}


def source_images(src_dir, split) -> dict[str, tuple[str, int]]:
    """{sample key: (path, class index)} for the readable images of a split of the fake set."""
    wnids = sorted(os.listdir(os.path.join(src_dir, "train")))
    out = {}
    for path in glob.glob(os.path.join(src_dir, split, "*", "*.JPEG")):
        if path.endswith(tuple(f"_{kind}.JPEG" for kind in fake_imagenet.BAD_FILES)):
            continue
        wnid = os.path.basename(os.path.dirname(path))
        out[os.path.basename(path)[: -len(".JPEG")]] = (path, wnids.index(wnid))
    return out


def read_split(shard_dir, split) -> list[tuple[str, np.ndarray, int]]:
    """(key, image HWC uint8, label) of every sample, read with plain webdataset in manifest order."""
    dataset = wds.WebDataset(shard_paths(shard_dir, split), shardshuffle=False).decode("rgb8")
    return [(s["__key__"], s["png"], s["cls"]) for s in dataset]


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake") / "imagenet"
    fake_imagenet.generate(str(out), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def shard_dir(fake_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    write_shards(fake_dir, out, CFG, RES, progress=False)
    return out


# ---- fake ImageNet ------------------------------------------------------------------------------


def test_fake_imagenet_layout_and_naming(fake_dir):
    wnids = [f"n{k:08d}" for k in range(CLASSES)]
    assert sorted(os.listdir(os.path.join(fake_dir, "train"))) == wnids
    assert sorted(os.listdir(os.path.join(fake_dir, "val"))) == wnids
    bad = [f"n00000000_{kind}.JPEG" for kind in fake_imagenet.BAD_FILES]
    for wnid in wnids:
        names = sorted(os.listdir(os.path.join(fake_dir, "train", wnid)))
        assert names == sorted([f"{wnid}_{n}.JPEG" for n in range(TRAIN_PER_CLASS)] + (bad if wnid == wnids[0] else []))
    val_names = [os.path.basename(p) for p in glob.glob(os.path.join(fake_dir, "val", "*", "*"))]
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in val_names)
    assert sorted(int(n[15:23]) for n in val_names) == list(range(1, CLASSES * VAL_PER_CLASS + 1))

    with open(os.path.join(fake_dir, ".complete.json")) as f:
        summary = json.load(f)
    assert summary["params"]["num_classes"] == CLASSES
    odd = {os.path.join(fake_dir, rel): kind for kind, rel in summary["odd_files"].items()}
    assert sorted(odd.values()) == ["cmyk", "grayscale", "png"]
    assert summary["bad_files"] == [f"train/n00000000/{name}" for name in bad]
    widths, seen = set(), {}
    for path in glob.glob(os.path.join(fake_dir, "*", "*", "*")):
        if os.path.basename(path) in bad:
            continue
        with Image.open(path) as image:
            seen[(image.format, image.mode)] = seen.get((image.format, image.mode), 0) + 1
            assert image.format == {"png": "PNG"}.get(odd.get(path), "JPEG")
            assert image.mode == {"cmyk": "CMYK", "grayscale": "L"}.get(odd.get(path), "RGB")
            assert image.height == SIZE and SIZE <= image.width <= 1.3 * SIZE
            widths.add(image.width)
    assert len(widths) > 1, "aspect ratio should vary so that center cropping matters"
    assert seen[("JPEG", "CMYK")] == seen[("JPEG", "L")] == seen[("PNG", "RGB")] == 1
    with open(os.path.join(fake_dir, "train", "n00000000", bad[1]), "rb") as f:
        assert f.read() == b""  # the empty one
    names = open(os.path.join(fake_dir, "LOC_synset_mapping.txt")).read().splitlines()
    assert [line.split(" ", 1)[0] for line in names] == wnids


def test_fake_imagenet_deterministic_and_idempotent(fake_dir, tmp_path):
    again = tmp_path / "again"
    summary = fake_imagenet.generate(str(again), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0, progress=False)
    assert summary["train_images"] == CLASSES * TRAIN_PER_CLASS
    assert summary["val_images"] == CLASSES * VAL_PER_CLASS
    assert tree_bytes(again) == tree_bytes(fake_dir)

    before = mtimes(again / "train" / "n00000000")
    fake_imagenet.generate(str(again), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=0, progress=False)
    assert mtimes(again / "train" / "n00000000") == before
    with pytest.raises(ValueError, match=re.escape(str(again))):
        fake_imagenet.generate(str(again), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=1, progress=False)

    other = tmp_path / "other_seed"
    fake_imagenet.generate(str(other), CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIZE, seed=1, progress=False)
    first = "train/n00000000/n00000000_0.JPEG"
    assert tree_bytes(other)[first] != tree_bytes(fake_dir)[first]


def test_fake_imagenet_classes_distinguishable(tmp_path):
    num_classes = 10
    fake_imagenet.generate(str(tmp_path / "set"), num_classes, 20, 10, SIZE, seed=0, progress=False)

    def features(split):
        xs, ys = [], []
        for k in range(num_classes):
            # the numbered images: the fake set's deliberately broken files are not images
            for path in sorted(glob.glob(str(tmp_path / "set" / split / f"n{k:08d}" / "*[0-9].JPEG"))):
                with Image.open(path) as image:
                    xs.append(np.asarray(image.convert("RGB").resize((8, 8), Image.BOX), np.float32).ravel())
                ys.append(k)
        return np.stack(xs), np.array(ys)

    x_train, y_train = features("train")
    x_val, y_val = features("val")
    means = np.stack([x_train[y_train == k].mean(0) for k in range(num_classes)])
    predicted = np.argmin(((x_val[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y_val).mean() >= 0.8  # chance is 0.1


# ---- shard stage --------------------------------------------------------------------------------


def adm_center_crop_arr(pil_image, image_size):
    """Reference: `center_crop_arr` from openai/guided-diffusion (also used by DiT), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("width,height,res", [(100, 73, 16), (41, 32, 16), (33, 40, 32), (17, 50, 24)])
def test_center_crop_matches_adm(width, height, res):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(shards.center_crop(image, res)), adm_center_crop_arr(image, res))


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_hold_every_source_image_once(fake_dir, shard_dir, split):
    expected = source_images(fake_dir, split)
    samples = read_split(shard_dir, split)
    assert sorted(key for key, _, _ in samples) == sorted(expected)
    for key, image, label in samples:
        path, wanted_label = expected[key]
        assert label == wanted_label
        assert image.shape == (RES, RES, 3)
        with Image.open(path) as source:  # PNG is lossless, so the pixels are exactly the ADM crop
            np.testing.assert_array_equal(image, np.asarray(shards.center_crop(source.convert("RGB"), RES)))

    names = []
    for url in shard_paths(shard_dir, split):
        with tarfile.open(url) as tar:
            names += tar.getnames()
    assert sorted(names) == sorted(f"{key}.{ext}" for key in expected for ext in ("cls", "png"))


def test_shards_are_shuffled_across_classes(shard_dir):
    labels = [label for _, _, label in read_split(shard_dir, "train")]
    assert labels != sorted(labels)


def test_manifest_matches_files(fake_dir, shard_dir):
    manifest = read_manifest(shard_dir)
    assert manifest["classes"] == [f"n{k:08d}" for k in range(CLASSES)]
    assert manifest["preprocessing"] == {"resolution": RES, "crop": "adm_center", "format": "png", "quality": None}
    assert manifest["source_dir"] == os.path.abspath(fake_dir)
    assert manifest["seed"] == CFG.seed
    assert [os.path.basename(b["path"]) for b in manifest["bad_files"]] == sorted(
        f"n00000000_{kind}.JPEG" for kind in fake_imagenet.BAD_FILES)
    assert manifest["class_names"]["n00000001"] == fake_imagenet.class_name(1)
    assert {s: v["layout"] for s, v in manifest["source"]["splits"].items()} == {"train": "class_folders",
                                                                              "val": "class_folders"}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        entry = manifest["splits"][split]
        assert entry["totals"]["count"] == CLASSES * per_class
        assert entry["samples_per_shard"] == CFG.max_count  # max_bytes (500 MB) is far away
        planned = [CFG.max_count] * (len(entry["shards"]) - 1)
        bad_in = [sum(b["shard"] == s["file"] for b in manifest["bad_files"]) for s in entry["shards"]]
        # Every shard holds its planned samples, less the bad files planned into it.
        assert [s["count"] + n for s, n in zip(entry["shards"], bad_in)][:-1] == planned
        for shard in entry["shards"]:
            path = os.path.join(shard_dir, shard["file"])
            with open(path, "rb") as f:
                data = f.read()
            assert re.fullmatch(rf"{split}-\d{{6}}\.tar", shard["file"])
            assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(path) as tar:
                assert len(tar.getnames()) == 2 * shard["count"]
                # A wall-clock timestamp in the headers would make reruns differ byte-wise.
                assert {member.mtime for member in tar.getmembers()} <= {0}
        assert entry["totals"]["bytes"] == sum(s["bytes"] for s in entry["shards"])
    assert manifest["totals"]["count"] == CLASSES * (TRAIN_PER_CLASS + VAL_PER_CLASS)
    assert sorted(os.listdir(shard_dir)) == sorted(
        [".shard.lock", "bad_files.csv", "manifest.json"]
        + [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    )
    with open(os.path.join(shard_dir, "bad_files.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "split,shard,path,reason" and len(rows) == 1 + len(manifest["bad_files"])


def test_rerun_is_noop_and_output_does_not_depend_on_workers(fake_dir, shard_dir, tmp_path):
    before_bytes, before_times = tree_bytes(shard_dir), mtimes(shard_dir)
    assert write_shards(fake_dir, shard_dir, CFG, RES, progress=False) == read_manifest(shard_dir)
    assert tree_bytes(shard_dir) == before_bytes and mtimes(shard_dir) == before_times

    one_worker = dataclasses.replace(CFG, workers=1)
    write_shards(fake_dir, str(tmp_path), one_worker, RES, progress=False)
    assert tree_bytes(tmp_path) == before_bytes

    with pytest.raises(ValueError, match="manifest.json"):
        write_shards(fake_dir, shard_dir, CFG, RES * 2, progress=False)


def test_resume_after_lost_shard_and_stale_tmp(fake_dir, shard_dir, tmp_path):
    reference = tree_bytes(shard_dir)
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    os.remove(out / "train-000002.tar")
    (out / "train-000002.tar.tmp").write_bytes(b"half a tar")
    (out / "val-000001.tar.tmp").write_bytes(b"left over beside a finished shard")
    kept = os.stat(out / "train-000001.tar").st_mtime_ns

    write_shards(fake_dir, str(out), CFG, RES, progress=False)
    assert tree_bytes(out) == reference
    assert os.stat(out / "train-000001.tar").st_mtime_ns == kept  # matched its manifest sha256, not rewritten


def test_resume_after_interrupted_run(fake_dir, shard_dir, tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, workers=1)
    real_write_shard, written = shards._write_shard, []

    def crash_on_third(task):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(task["file"])
        return real_write_shard(task)

    monkeypatch.setattr(shards, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(fake_dir, str(tmp_path), cfg, RES, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "manifest.json").exists() and (tmp_path / "progress-all.json").exists()
    (tmp_path / "train-000003.tar").write_bytes(b"renamed but never recorded")  # e.g. killed before the record
    done_times = {name: os.stat(tmp_path / name).st_mtime_ns for name in written}

    write_shards(fake_dir, str(tmp_path), cfg, RES, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(shard_dir)
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in written} == done_times


def test_bad_and_odd_files(tmp_path):
    src = tmp_path / "src"
    summary = fake_imagenet.generate(str(src), 2, 3, 1, SIZE, seed=0, progress=False)
    folder = src / "train" / "n00000001"
    Image.open(folder / "n00000001_0.JPEG").save(folder / "lower.jpg")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")
    (src / "train" / "n00000000" / "text.JPEG").write_text("not an image\n")

    manifest = write_shards(str(src), str(tmp_path / "out"), ShardConfig(max_count=4, workers=2), RES, progress=False)
    bad = {os.path.basename(b["path"]): b["reason"] for b in manifest["bad_files"]}
    assert sorted(bad) == sorted(["text.JPEG"] + [os.path.basename(p) for p in summary["bad_files"]])
    assert "empty" in bad["n00000000_empty.JPEG"] and "truncated" in bad["n00000000_truncated.JPEG"]
    assert bad["text.JPEG"].startswith("not an image")
    assert all(os.path.isabs(b["path"]) and b["split"] == "train" for b in manifest["bad_files"])

    samples = {key: (image, label) for key, image, label in read_split(str(tmp_path / "out"), "train")}
    assert manifest["splits"]["train"]["totals"]["count"] == len(samples) == 2 * 3 + 1
    odd = {kind: os.path.basename(rel)[:-5] for kind, rel in summary["odd_files"].items()}
    for key in (*odd.values(), "lower"):
        image, label = samples[key]
        assert image.shape == (RES, RES, 3)
    gray = samples[odd["grayscale"]][0].astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1  # grey stays grey after conversion to RGB
    cmyk = samples[odd["cmyk"]][0].astype(int)
    with Image.open(src / summary["odd_files"]["cmyk"]) as source:
        assert source.mode == "CMYK"
        np.testing.assert_array_equal(cmyk, np.asarray(shards.center_crop(source.convert("RGB"), RES)))


def test_missing_split_folder_names_the_path(fake_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(fake_dir, "train"), src / "train")
    with pytest.raises(FileNotFoundError, match=re.escape(str(src / "val"))):
        write_shards(str(src), str(tmp_path / "out"), CFG, RES, progress=False)


def test_val_class_missing_from_train_names_the_folder(fake_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fake_dir, src)
    os.rename(src / "val" / "n00000003", src / "val" / "n09999999")
    with pytest.raises(ValueError, match=re.escape(str(src / "val" / "n09999999"))):
        write_shards(str(src), str(tmp_path / "out"), CFG, RES, progress=False)


def test_manifest_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="pixelgen stage shard"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "manifest.json"))):
        read_manifest(str(tmp_path))
    with pytest.raises(KeyError, match="test"):
        shard_paths(shard_dir, "test")




# ---- formats, shard sizes, array tasks, kills, verify ----------------------------------------------------------


def test_formats_webp_lossless_jpg_and_original_bytes(fake_dir, shard_dir, tmp_path):
    png = {key: (image, label) for key, image, label in read_split(shard_dir, "val")}
    webp_dir = str(tmp_path / "webp")
    write_shards(fake_dir, webp_dir, dataclasses.replace(CFG, image_format="webp"), RES, progress=False)
    webp = wds.WebDataset(shard_paths(webp_dir, "val"), shardshuffle=False).decode("rgb8").to_tuple("__key__", "webp")
    decoded = dict(webp)
    assert decoded.keys() == png.keys()
    assert all(np.array_equal(decoded[key], png[key][0]) for key in png)  # lossless: the same pixels as PNG

    jpg_dir = str(tmp_path / "jpg")
    manifest = write_shards(fake_dir, jpg_dir, dataclasses.replace(CFG, image_format="jpg", jpeg_quality=90), RES,
                            progress=False)
    assert manifest["preprocessing"]["quality"] == 90
    jpg = dict(wds.WebDataset(shard_paths(jpg_dir, "val"), shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg"))
    errors = [np.abs(jpg[k].astype(int) - png[k][0].astype(int)).mean() for k in png]
    assert 0 < max(errors) < 20  # lossy, but the same pictures

    orig_dir = str(tmp_path / "original")
    manifest = write_shards(fake_dir, orig_dir, dataclasses.replace(CFG, image_format="original"), RES,
                            progress=False)
    assert manifest["preprocessing"] == {"crop": "none", "resolution": None, "format": "original", "quality": None}
    sources = source_images(fake_dir, "train")
    stored = {}
    for url in shard_paths(orig_dir, "train"):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext != "cls":
                    stored[key] = (ext, tar.extractfile(member).read())
    assert stored.keys() == sources.keys()
    for key, (ext, data) in stored.items():
        with open(sources[key][0], "rb") as f:
            assert data == f.read()  # the original bytes, untouched
        assert ext == ("png" if Image.open(io.BytesIO(data)).format == "PNG" else "jpg")  # named by true content
    assert sorted(ext for ext, _ in stored.values()).count("png") == 1  # the PNG saved with a .JPEG name


def test_max_bytes_sizes_shards_from_a_probe(fake_dir, tmp_path):
    small = dataclasses.replace(CFG, max_count=1000, max_bytes=6000)
    manifest = write_shards(fake_dir, str(tmp_path), small, RES, progress=False)
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        mean = entry["probe_mean_bytes"]
        assert 0 < mean < 2000  # a 16x16 PNG
        assert entry["samples_per_shard"] == int(6000 // (1.1 * mean + shards.TAR_OVERHEAD)) < 1000
        assert len(entry["shards"]) > 1
        # 10 KiB tar blocking aside, shards stay near the target instead of growing to max_count samples
        assert all(s["bytes"] <= 6000 + 10240 for s in entry["shards"])


def test_array_tasks_write_disjoint_ranges_and_the_last_writes_the_manifest(fake_dir, shard_dir, tmp_path):
    cfg = dataclasses.replace(CFG, array_tasks=3, workers=1)
    out = str(tmp_path / "in-process")
    results = [write_shards(fake_dir, out, cfg, RES, progress=False, task=t) for t in (2, 0, 1)]
    assert results[:2] == [None, None] and results[2] == read_manifest(out)
    assert tree_bytes(out) == tree_bytes(shard_dir)  # the array size does not change a byte
    with pytest.raises(ValueError, match="array task 3"):
        write_shards(fake_dir, str(tmp_path / "bad"), cfg, RES, progress=False, task=3)

    # The same as separate processes started together, the way a SLURM array runs them.
    out = tmp_path / "processes"
    exe = os.path.join(os.path.dirname(sys.executable), "pixelgen")
    procs = [subprocess.Popen([exe, "shards", "write", fake_dir, str(out), f"resolution={RES}", "max_count=5",
                               "seed=3", "workers=1", "array_tasks=3"],
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for t in range(3)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert sum("manifest:" in log for log in logs) >= 1
    assert tree_bytes(out) == tree_bytes(shard_dir)

    pixelgen("shards", "write", fake_dir, str(tmp_path / "x"), f"resolution={RES}", "max_count=5", "seed=3",
             "array_tasks=4")  # outside an array: one process writes everything
    assert tree_bytes(tmp_path / "x") == tree_bytes(shard_dir)
    env_mismatch = subprocess.run([exe, "shards", "write", fake_dir, str(tmp_path / "y"), "array_tasks=4"],
                                  env={**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3"},
                                  capture_output=True, text=True)
    assert env_mismatch.returncode == 2 and "--array=0-3" in env_mismatch.stdout


def _kill_when(proc, ready, timeout=120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the writer finished before the kill point; make the test data larger"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _recorded(out) -> int:
    try:
        with open(out / "progress-all.json") as f:
            return len(json.load(f)["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_at_any_moment_the_rerun_is_byte_identical(tmp_path):
    src = tmp_path / "src"
    fake_imagenet.generate(str(src), 8, 24, 2, 48, seed=0, progress=False)
    args = [str(src), "max_count=3", f"resolution={RES}", "workers=1"]
    reference = tmp_path / "reference"
    pixelgen("shards", "write", args[0], str(reference), *args[1:])
    exe = os.path.join(os.path.dirname(sys.executable), "pixelgen")
    out = tmp_path / "killed"
    kill_points = [
        lambda: any(name.endswith(".tmp") for name in os.listdir(out)) if out.exists() else False,  # mid first shard
        lambda: _recorded(out) >= 5,
        lambda: _recorded(out) >= 30,
        lambda: _recorded(out) >= 60,
    ]
    for ready in kill_points:
        proc = subprocess.Popen([exe, "shards", "write", args[0], str(out), *args[1:]],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, ready)
        assert not (out / "manifest.json").exists()  # killed before the end
    # A kill between an atomic write and its rename leaves a complete temporary file; the rerun removes it.
    for name in (".progress-all.json.killed.tmp", ".manifest.json.killed.tmp", ".bad_files.csv.killed.tmp"):
        (out / name).write_text("{}\n")
    pixelgen("shards", "write", args[0], str(out), *args[1:])
    assert tree_bytes(out) == tree_bytes(reference)
    assert pixelgen("shards", "verify", str(out)).returncode == 0

    # Killed after writing the manifest, before removing the progress file: the no-op rerun tidies up.
    (out / "progress-all.json").write_text("{}\n")
    (out / ".progress-all.json.killed.tmp").write_text("{}\n")
    pixelgen("shards", "write", args[0], str(out), *args[1:])
    assert tree_bytes(out) == tree_bytes(reference)


def test_verify_names_a_flipped_byte_and_a_missing_shard(shard_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    assert verify_shards(str(out), progress=False) == []
    total = sum(len(split["shards"]) for split in read_manifest(shard_dir)["splits"].values())
    assert f"all {total} shards match" in pixelgen("shards", "verify", str(out)).stdout

    data = bytearray((out / "train-000001.tar").read_bytes())
    data[700] ^= 0x01
    (out / "train-000001.tar").write_bytes(bytes(data))
    os.remove(out / "val-000000.tar")
    problems = verify_shards(str(out), progress=False)
    assert len(problems) == 2
    assert "train-000001.tar" in problems[0] and "sha256" in problems[0]
    assert "val-000000.tar" in problems[1] and "missing" in problems[1]
    bad = pixelgen("shards", "verify", str(out), check=False)
    assert bad.returncode == 1
    assert "train-000001.tar" in bad.stdout and "val-000000.tar" in bad.stdout and "2 of" in bad.stdout


def test_fake_imagenet_from_an_older_generator_is_replaced(tmp_path):
    out = tmp_path / "set"
    fake_imagenet.generate(str(out), 2, 2, 1, SIZE, seed=0, progress=False)
    marker = out / ".complete.json"
    summary = json.loads(marker.read_text())
    marker.write_text(json.dumps({**summary, "params": {**summary["params"], "format_version": 1}}))
    (out / "train" / "n00000000" / "n00000000_empty.JPEG").unlink()  # what version 1 did not write
    again = fake_imagenet.generate(str(out), 2, 2, 1, SIZE, seed=0, progress=False)
    assert again["params"]["format_version"] == fake_imagenet.FORMAT_VERSION
    assert (out / "train" / "n00000000" / "n00000000_empty.JPEG").exists()


def test_shards_write_names_a_bad_setting(fake_dir, tmp_path):
    proc = pixelgen("shards", "write", fake_dir, str(tmp_path / "out"), "max_count=abc", check=False)
    assert proc.returncode == 2 and "key 'max_count'" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written before the settings are checked
