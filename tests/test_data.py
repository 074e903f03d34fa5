"""Data components: fake ImageNet, shard stage, train/eval loaders. Tiny sizes; the file runs in seconds."""

import dataclasses
import glob
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pixelgen.data import fake_imagenet, shards
from pixelgen.data.config import ShardConfig
from pixelgen.data.loader import eval_batches, to_float, train_loader
from pixelgen.data.shards import read_manifest, shard_paths, write_shards

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
    """{sample key: (path, class index)} for the images of a split of the fake set."""
    wnids = sorted(os.listdir(os.path.join(src_dir, "train")))
    out = {}
    for path in glob.glob(os.path.join(src_dir, split, "*", "*.JPEG")):
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
    for wnid in wnids:
        names = sorted(os.listdir(os.path.join(fake_dir, "train", wnid)))
        assert names == sorted(f"{wnid}_{n}.JPEG" for n in range(TRAIN_PER_CLASS))
    val_names = [os.path.basename(p) for p in glob.glob(os.path.join(fake_dir, "val", "*", "*"))]
    assert all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in val_names)
    assert sorted(int(n[15:23]) for n in val_names) == list(range(1, CLASSES * VAL_PER_CLASS + 1))

    widths = set()
    for path in glob.glob(os.path.join(fake_dir, "*", "*", "*")):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.height == SIZE and SIZE <= image.width <= 1.3 * SIZE
            widths.add(image.width)
    assert len(widths) > 1, "aspect ratio should vary so that center cropping matters"
    with open(os.path.join(fake_dir, ".complete.json")) as f:
        assert json.load(f)["params"]["num_classes"] == CLASSES


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
            for path in sorted(glob.glob(str(tmp_path / "set" / split / f"n{k:08d}" / "*"))):
                with Image.open(path) as image:
                    xs.append(np.asarray(image.resize((8, 8), Image.BOX), np.float32).ravel())
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
    assert manifest["seed"] == CFG.seed and manifest["bad_files"] == []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        entry = manifest["splits"][split]
        assert entry["totals"]["count"] == CLASSES * per_class
        assert [s["count"] for s in entry["shards"]][:-1] == [CFG.max_count] * (len(entry["shards"]) - 1)
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
        ["manifest.json"] + [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    )


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
    assert not (tmp_path / "manifest.json").exists() and (tmp_path / "progress.json").exists()
    (tmp_path / "train-000003.tar").write_bytes(b"renamed but never recorded")  # e.g. killed before the record
    done_times = {name: os.stat(tmp_path / name).st_mtime_ns for name in written}

    write_shards(fake_dir, str(tmp_path), cfg, RES, progress=False)
    assert tree_bytes(tmp_path) == tree_bytes(shard_dir)
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in written} == done_times


def test_bad_and_odd_files(tmp_path):
    src = tmp_path / "src"
    fake_imagenet.generate(str(src), 2, 3, 1, SIZE, seed=0, progress=False)
    folder = src / "train" / "n00000001"
    good = Image.open(folder / "n00000001_0.JPEG").convert("RGB")
    good.convert("L").save(folder / "gray.JPEG")
    good.convert("CMYK").save(folder / "cmyk.JPEG")
    good.save(folder / "png_named.JPEG", format="PNG")
    good.save(folder / "lower.jpg")
    (folder / "empty.JPEG").write_bytes(b"")
    jpeg = (folder / "n00000001_1.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.JPEG").write_text("not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")

    manifest = write_shards(str(src), str(tmp_path / "out"), ShardConfig(max_count=4, workers=2), RES, progress=False)
    bad = {os.path.basename(b["path"]): b["reason"] for b in manifest["bad_files"]}
    assert sorted(bad) == ["empty.JPEG", "text.JPEG", "truncated.JPEG"]
    assert "empty" in bad["empty.JPEG"] and "truncated" in bad["truncated.JPEG"].lower()
    assert all(os.path.isabs(b["path"]) for b in manifest["bad_files"])

    samples = {key: (image, label) for key, image, label in read_split(str(tmp_path / "out"), "train")}
    assert manifest["splits"]["train"]["totals"]["count"] == len(samples) == 2 * 3 + 4
    for key in ("gray", "cmyk", "png_named", "lower"):
        image, label = samples[key]
        assert image.shape == (RES, RES, 3) and label == 1
    gray = samples["gray"][0].astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1  # grey stays grey after conversion to RGB


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
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        train_loader(str(tmp_path / "nowhere"), 4, seed=0)


# ---- loaders ------------------------------------------------------------------------------------


def take(loader, n):
    return list(itertools.islice(loader, n))


def same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_is_deterministic_per_rank_and_resumable(shard_dir, num_workers):
    args = dict(seed=7, num_workers=num_workers, shuffle_buffer=8, world_size=2)
    stream = take(train_loader(shard_dir, 4, rank=0, **args), 8)
    assert same(stream, take(train_loader(shard_dir, 4, rank=0, **args), 8))
    assert not same(stream, take(train_loader(shard_dir, 4, rank=1, **args), 8))
    assert same(stream[5:], take(train_loader(shard_dir, 4, rank=0, start_batch=5, **args), 3))

    images, labels = stream[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, RES, RES)
    assert labels.dtype == torch.int64 and labels.shape == (4,)

    # Every image is a stored sample, as is or mirrored, with its own label; both orientations occur.
    samples = read_split(shard_dir, "train")
    stored = {image.tobytes(): label for _, image, label in samples}
    mirrored = {np.ascontiguousarray(image[:, ::-1]).tobytes(): label for _, image, label in samples}
    seen = {"stored": 0, "mirrored": 0}
    for images, labels in stream:
        for image_chw, label in zip(images, labels):
            key = image_chw.permute(1, 2, 0).numpy().tobytes()
            kind = "stored" if key in stored else "mirrored"
            assert {"stored": stored, "mirrored": mirrored}[kind].get(key) == label
            seen[kind] += 1
    assert seen["stored"] > 0 and seen["mirrored"] > 0


def test_eval_batches_cover_split_once_in_manifest_order(shard_dir):
    samples = read_split(shard_dir, "val")
    batches = list(eval_batches(shard_dir, "val", batch_size=5))
    assert [len(labels) for _, labels in batches] == [5, 5, 2]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.uint8 and images.shape == (len(samples), 3, RES, RES)
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), np.stack([s[1] for s in samples]))
    assert labels.tolist() == [s[2] for s in samples]
    again = eval_batches(shard_dir, "val", batch_size=5)
    assert same(batches, list(again)) and same(batches, list(again))  # every pass is the same full pass


def test_to_float_maps_uint8_to_unit_range():
    images = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    out = to_float(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))
