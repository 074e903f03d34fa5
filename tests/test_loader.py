"""The training loader's stream (determinism, resume, rank split, epochs, flips), its errors, and eval_batches."""

import itertools
import json
import os
import re
import shutil
import tarfile
import traceback

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pixelgen.data.config import ShardConfig
from pixelgen.data.fake_imagenet import generate
from pixelgen.data.loader import epoch_plan, eval_batches, to_float, train_loader
from pixelgen.data.shards import center_crop, read_manifest, shard_paths, write_shards

RES = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("loader") / "src"
    generate(str(out), num_classes=4, train_per_class=9, val_per_class=3, size=24, seed=0, progress=False)
    return str(out)


def _shard(source: str, out: str, image_format: str = "png") -> str:
    cfg = ShardConfig(max_count=5, workers=1, image_format=image_format)
    write_shards(source, out, cfg, resolution=RES, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(source, tmp_path_factory) -> str:
    return _shard(source, str(tmp_path_factory.mktemp("loader") / "shards"))


@pytest.fixture(scope="module")
def original_shards(source, tmp_path_factory) -> str:
    """The source files' own bytes (format "original"): the loader does the crop."""
    return _shard(source, str(tmp_path_factory.mktemp("original")), "original")


def stored(shard_dir: str, split: str) -> list[list[tuple[str, np.ndarray, int]]]:
    """Per shard, its (key, image [H, W, 3], label) samples in order, read with plain webdataset."""
    return [
        list(wds.WebDataset(path, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png;webp;jpg", "cls"))
        for path in shard_paths(shard_dir, split)
    ]


def counts(shard_dir: str) -> list[int]:
    return [s["count"] for s in read_manifest(shard_dir)["splits"]["train"]["shards"]]


def take(loader, n: int) -> list:
    return list(itertools.islice(loader, n))


def same(batches_a: list, batches_b: list) -> bool:
    return len(batches_a) == len(batches_b) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:] for a, b in zip(batches_a, batches_b)
    )


def keys_of(batches: list) -> list[str]:
    return [key for batch in batches for key in batch[2]]


def plan_keys(shard_dir: str, plan) -> list[str]:
    by_shard = [[key for key, _, _ in shard] for shard in stored(shard_dir, "train")]
    return [by_shard[s][m] for s, m in zip(plan[0].tolist(), plan[1].tolist())]


# ---- the stream ---------------------------------------------------------------------------------


def test_stream_is_a_function_of_seed_not_of_num_workers(shards):
    args = dict(seed=3, shuffle_buffer=8, with_keys=True)
    n = sum(counts(shards)) // 4 + 2  # into the second epoch
    first = take(train_loader(shards, 4, **args), n)
    images, labels, keys = first[0]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, RES, RES)
    assert labels.dtype == torch.int64 and labels.shape == (4,) and len(keys) == 4
    assert same(first, take(train_loader(shards, 4, **args), n))
    assert same(first, take(train_loader(shards, 4, num_workers=2, **args), n))
    assert keys_of(first) != keys_of(take(train_loader(shards, 4, **{**args, "seed": 4}), n))


@pytest.mark.parametrize("world_size", [1, 2])
def test_start_batch_resumes_exactly(shards, world_size):
    length = sum(counts(shards)) // world_size
    batch = next(b for b in (5, 7, 11) if length % b)
    boundary = length // batch  # the batch that holds the end of epoch 0 and the start of epoch 1
    assert boundary * batch < length < (boundary + 1) * batch
    args = dict(seed=5, shuffle_buffer=6, rank=world_size - 1, world_size=world_size, with_keys=True)
    full = take(train_loader(shards, batch, **args), boundary + 3)
    for k in (2, boundary):
        assert same(full[k:], take(train_loader(shards, batch, start_batch=k, **args), boundary + 3 - k))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_plan_gives_ranks_disjoint_equal_blocks(shards, world_size):
    sizes = counts(shards)
    total = sum(sizes)
    everything = {(s, m) for s, n in enumerate(sizes) for m in range(n)}
    for epoch in range(3):
        seen = set()
        for rank in range(world_size):
            shard_idx, member_idx, flip = epoch_plan(sizes, 0, epoch, rank, world_size, 4)
            assert len(shard_idx) == len(member_idx) == len(flip) == total // world_size
            block = set(zip(shard_idx.tolist(), member_idx.tolist()))
            assert len(block) == total // world_size and not block & seen
            seen |= block
        assert seen <= everything and (world_size > 1 or seen == everything)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_their_plan_and_nothing_twice(shards, world_size):
    length = sum(counts(shards)) // world_size
    all_keys = [key for shard in stored(shards, "train") for key, _, _ in shard]
    seen = []
    for rank in range(world_size):
        (_, _, keys), = take(train_loader(shards, length, seed=2, rank=rank, world_size=world_size,
                                          shuffle_buffer=4, with_keys=True), 1)
        assert keys == plan_keys(shards, epoch_plan(counts(shards), 2, 0, rank, world_size, 4))
        seen += keys
    assert len(set(seen)) == len(seen) == world_size * length
    assert set(seen) <= set(all_keys) and (world_size > 1 or sorted(seen) == sorted(all_keys))


def test_epochs_reorder_and_each_covers_the_set(shards):
    total = sum(counts(shards))
    epochs = [keys for _, _, keys in take(train_loader(shards, total, seed=1, with_keys=True), 3)]
    assert all(sorted(keys) == sorted(epochs[0]) for keys in epochs) and len(set(epochs[0])) == total
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]


@pytest.fixture(scope="module")
def one_shard(source, tmp_path_factory) -> str:
    """The whole train split in a single shard: the shard order is the same every epoch, so only the
    in-window shuffle and the flips can make one epoch differ from the next."""
    out = str(tmp_path_factory.mktemp("one-shard"))
    write_shards(source, out, ShardConfig(max_count=1000, workers=1), resolution=RES, progress=False)
    assert len(counts(out)) == 1
    return out


def _flip_bits(batch, samples: dict) -> dict[str, bool]:
    """key -> whether the loader delivered the stored image mirrored, for one batch read with keys."""
    images, _, keys = batch
    bits = {}
    for image_chw, key in zip(images, keys):
        image, stored_image = image_chw.permute(1, 2, 0).numpy(), samples[key]
        assert not np.array_equal(stored_image, stored_image[:, ::-1]), key  # the flip is visible
        bits[key] = bool(np.array_equal(image, stored_image[:, ::-1]))
        if not bits[key]:
            np.testing.assert_array_equal(image, stored_image)
    return bits


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_single_shard_is_reshuffled_and_reflipped_every_epoch(one_shard, world_size):
    sizes = counts(one_shard)
    length = sum(sizes) // world_size
    plans = [epoch_plan(sizes, 7, epoch, world_size - 1, world_size, length) for epoch in range(3)]
    for a, b in itertools.combinations(plans, 2):
        assert a[1].tolist() != b[1].tolist()  # the order of the samples
        assert not np.array_equal(a[2], b[2])  # and their flips, position by position
    # Reproducible: the same (seed, epoch, rank, world_size) gives the same plan.
    for epoch, plan in enumerate(plans):
        again = epoch_plan(sizes, 7, epoch, world_size - 1, world_size, length)
        assert all(np.array_equal(x, y) for x, y in zip(plan, again))

    # And what the loader delivers: two epochs, one batch each, read through the real shards.
    samples = {key: image for key, image, _ in stored(one_shard, "train")[0]}
    args = dict(seed=7, rank=world_size - 1, world_size=world_size, shuffle_buffer=length, with_keys=True)
    epochs = take(train_loader(one_shard, length, **args), 2)
    (_, _, keys0), (_, _, keys1) = epochs
    assert keys0 == plan_keys(one_shard, plans[0]) and keys1 == plan_keys(one_shard, plans[1])
    if world_size == 1:
        assert sorted(keys0) == sorted(keys1) == sorted(samples)
    assert keys0 != keys1
    flips0, flips1 = (_flip_bits(batch, samples) for batch in epochs)
    assert [flips0[k] for k in keys0] == plans[0][2].tolist() and [flips1[k] for k in keys1] == plans[1][2].tolist()
    common = sorted(flips0.keys() & flips1.keys())
    assert len(common) >= length // 2 and any(flips0[k] != flips1[k] for k in common)
    assert same(epochs, take(train_loader(one_shard, length, **args), 2))


def test_samples_dropped_to_even_out_ranks_change_every_epoch(shards):
    sizes = counts(shards)
    world = next(w for w in (5, 7, 11) if sum(sizes) % w)
    covered = set()
    for epoch in range(12):
        for rank in range(world):
            shard_idx, member_idx, _ = epoch_plan(sizes, 0, epoch, rank, world, 4)
            covered |= set(zip(shard_idx.tolist(), member_idx.tolist()))
    assert len(covered) == sum(sizes)


def test_flips_are_mirrored_stored_images_about_half_the_time(shards):
    samples = {key: (image, label) for shard in stored(shards, "train") for key, image, label in shard}
    flipped = 0
    batches = take(train_loader(shards, 40, seed=9, with_keys=True), 8)  # 320 draws
    for images, labels, keys in batches:
        for image_chw, label, key in zip(images, labels, keys):
            image = image_chw.permute(1, 2, 0).numpy()
            stored_image, stored_label = samples[key]
            assert label == stored_label
            if np.array_equal(image, stored_image[:, ::-1]):
                flipped += 1
            else:
                np.testing.assert_array_equal(image, stored_image)
    assert 0.35 < flipped / (8 * 40) < 0.65


# ---- the shards and their formats -------------------------------------------------------------------


def test_shards_are_plain_webdataset_tars(shards):
    total = sum(counts(shards))
    dataset = wds.WebDataset(shard_paths(shards, "train"), shardshuffle=False)
    samples = list(dataset.decode("rgb8").to_tuple("png", "cls"))
    assert len(samples) == total
    assert all(image.shape == (RES, RES, 3) and image.dtype == np.uint8 for image, _ in samples)
    with tarfile.open(shard_paths(shards, "train")[0]) as tar:
        names = tar.getnames()
    keys = sorted({name.split(".")[0] for name in names})
    assert sorted(names) == sorted([f"{key}.cls" for key in keys] + [f"{key}.png" for key in keys])


@pytest.mark.parametrize("image_format", ["webp", "jpg"])
def test_other_preprocessed_formats_load(source, tmp_path, image_format):
    shard_dir = _shard(source, str(tmp_path / image_format), image_format)
    samples = {key: image for shard in stored(shard_dir, "train") for key, image, _ in shard}
    images, _, keys = next(train_loader(shard_dir, 8, seed=0, with_keys=True))
    for image_chw, key in zip(images, keys):
        image = image_chw.permute(1, 2, 0).numpy()
        assert np.array_equal(image, samples[key]) or np.array_equal(image, samples[key][:, ::-1])
    assert next(iter(eval_batches(shard_dir, "val", 4)))[0].shape == (4, 3, RES, RES)


def test_original_bytes_are_cropped_by_the_loader(source, original_shards):
    crops = {}
    for wnid in sorted(os.listdir(os.path.join(source, "train"))):
        for name in os.listdir(os.path.join(source, "train", wnid)):
            try:
                with Image.open(os.path.join(source, "train", wnid, name)) as image:
                    crops[name.split(".")[0]] = np.asarray(center_crop(image.convert("RGB"), RES))
            except (OSError, SyntaxError, ValueError, EOFError):
                continue
    total = sum(counts(original_shards))
    images, _, keys = next(train_loader(original_shards, total, seed=0, resolution=RES, with_keys=True))
    assert sorted(keys) == sorted(crops)  # the odd files (CMYK, grayscale, PNG bytes) load too
    for image_chw, key in zip(images, keys):
        image = image_chw.permute(1, 2, 0).numpy()
        assert np.array_equal(image, crops[key]) or np.array_equal(image, crops[key][:, ::-1])
    val = sum(s["count"] for s in read_manifest(original_shards)["splits"]["val"]["shards"])
    assert sum(len(y) for _, y in eval_batches(original_shards, "val", 5, resolution=RES)) == val

    with pytest.raises(ValueError, match="resolution"):
        train_loader(original_shards, 4, seed=0)
    with pytest.raises(ValueError, match="resolution"):
        eval_batches(original_shards, "val", 4)


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(batch_size=0), "batch_size=0"),
        (dict(rank=2, world_size=2), r"rank=2 must be in \[0, world_size=2\)"),
        (dict(shuffle_buffer=0), "shuffle_buffer=0"),
        (dict(world_size=1000), "fewer than world_size=1000"),
        (dict(resolution=2 * RES), f"resolution={2 * RES}.*cropped to {RES}"),
    ],
)
def test_bad_arguments_are_named(shards, args, message):
    with pytest.raises(ValueError, match=message):
        train_loader(shards, **{"batch_size": 4, "seed": 0, **args})


def _copy(shards: str, tmp_path) -> tuple[str, str]:
    shard_dir = str(tmp_path / "copy")
    shutil.copytree(shards, shard_dir)
    return shard_dir, shard_paths(shard_dir, "train")[1]


def first_error(loader) -> tuple[type, str]:
    """(type, message) of the error the loader's first batch raises.

    A DataLoader iterator that raised sits in a reference cycle with the traceback's frames; freed later
    by the garbage collector, it then waits out a 5 s timeout per worker. Clearing the frames and keeping
    no reference to the traceback lets it stop its workers at once when the test drops it.
    """
    try:
        next(loader)
    except Exception as e:
        traceback.clear_frames(e.__traceback__)
        return type(e), str(e)
    raise AssertionError("the loader raised no error")


def test_missing_shard_is_named(shards, tmp_path):
    shard_dir, victim = _copy(shards, tmp_path)
    total = sum(counts(shard_dir))
    loader = train_loader(shard_dir, total, seed=0)  # a shard that goes missing after the start
    os.remove(victim)
    kind, message = first_error(loader)
    assert kind is FileNotFoundError and re.search(f"{re.escape(victim)}.*pixelgen shards verify", message)
    with pytest.raises(FileNotFoundError, match=re.escape(victim)):
        train_loader(shard_dir, total, seed=0)


@pytest.mark.parametrize("damage, num_workers", [("fewer samples", 0), ("truncated", 0), ("fewer samples", 2)])
def test_shard_that_differs_from_the_manifest_is_named(shards, tmp_path, damage, num_workers):
    shard_dir, victim = _copy(shards, tmp_path)
    if damage == "fewer samples":
        samples = list(wds.WebDataset(victim, shardshuffle=False))[:-1]
        with wds.TarWriter(victim) as writer:
            for sample in samples:
                writer.write({k: v for k, v in sample.items() if k != "__url__"})
    else:
        os.truncate(victim, os.path.getsize(victim) // 2)
    kind, message = first_error(train_loader(shard_dir, sum(counts(shard_dir)), seed=0, num_workers=num_workers))
    assert kind is ValueError and re.search(f"{re.escape(victim)}.*pixelgen shards verify", message)


def test_image_of_the_wrong_size_is_named(shards, tmp_path):
    shard_dir, _ = _copy(shards, tmp_path)
    manifest = read_manifest(shard_dir)
    manifest["preprocessing"]["resolution"] = RES // 2
    with open(os.path.join(shard_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    kind, message = first_error(train_loader(shard_dir, 4, seed=0))
    assert kind is ValueError and re.search(f"sample '.+' of shard {re.escape(shard_dir)}.*{RES}x{RES}", message)


# ---- eval -----------------------------------------------------------------------------------------


def test_eval_batches_cover_split_once_in_manifest_order(shards):
    samples = [sample for shard in stored(shards, "val") for sample in shard]
    batches = list(eval_batches(shards, "val", batch_size=5))
    sizes = [len(labels) for _, labels in batches]
    assert sizes == [5] * (len(samples) // 5) + ([len(samples) % 5] if len(samples) % 5 else [])
    assert sizes[-1] < 5  # the fixture's val split does not fill the last batch
    images = torch.cat([x for x, _ in batches])
    assert images.dtype == torch.uint8 and images.shape == (len(samples), 3, RES, RES)
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), np.stack([image for _, image, _ in samples]))
    assert torch.cat([y for _, y in batches]).tolist() == [label for _, _, label in samples]
    again = eval_batches(shards, "val", batch_size=5)
    assert same(batches, list(again)) and same(batches, list(again))  # every pass is the same full pass


def test_to_float_maps_uint8_to_unit_range():
    out = to_float(torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1))
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])


def test_batches_are_channels_last_views_that_to_float_makes_contiguous(shards):
    images, _ = next(train_loader(shards, 4, seed=0, num_workers=0))
    assert images.shape[1] == 3 and not images.is_contiguous()  # no host-side layout copy
    out = to_float(images)
    assert out.is_contiguous() and torch.equal(out, to_float(images.contiguous()))


# ---- a resume on another number of ranks --------------------------------------------------------


def test_a_resume_on_another_rank_count_goes_on_with_the_rest_of_the_epoch(shards):
    """2 ranks -> 1 rank -> 2 ranks inside epoch 0 (6 images per global batch throughout): every sample of the
    epoch is read once, each new rank count reads exactly the definition's blocks, and epoch 1 is the last rank
    count's own plan."""
    from pixelgen.data.loader import Segment

    sizes = counts(shards)
    assert sum(sizes) == 36  # 18 per rank at 2 ranks
    args = dict(seed=1, shuffle_buffer=4, with_keys=True)
    a, b, c = Segment(0, 2, 3), Segment(2, 1, 6), Segment(4, 2, 3)
    first = [keys_of(take(train_loader(shards, 3, rank=r, world_size=2, **args), 2)) for r in (0, 1)]
    second = keys_of(take(train_loader(shards, 6, start_batch=2, segments=[a, b], **args), 2))
    third = [keys_of(take(train_loader(shards, 3, rank=r, world_size=2, start_batch=4, segments=[a, b, c], **args), 3))
             for r in (0, 1)]
    epoch0 = first[0] + first[1] + second + third[0][:6] + third[1][:6]
    assert sorted(epoch0) == sorted(plan_keys(shards, _all(sizes, 2)))  # all 36, none twice
    # The definition: the old ranks' unread samples, joined in rank order, cut into one block per new rank.
    old = [epoch_plan(sizes, 1, 0, r, 2, 4) for r in (0, 1)]
    rest = plan_keys(shards, old[0])[6:] + plan_keys(shards, old[1])[6:]
    assert second == rest[:12]
    assert third[0][:6] == rest[12:18] and third[1][:6] == rest[18:24]
    # Epoch 1 is the 2-rank plan, as in a run that never changed.
    for r in (0, 1):
        assert third[r][6:] == plan_keys(shards, epoch_plan(sizes, 1, 1, r, 2, 4))[:3]
    # A run that stays at one rank count is unchanged by naming its one segment.
    plain = keys_of(take(train_loader(shards, 3, rank=1, world_size=2, start_batch=3, **args), 4))
    assert plain == keys_of(take(train_loader(shards, 3, rank=1, world_size=2, start_batch=3, segments=[a], **args), 4))
    with pytest.raises(ValueError, match="is not this run's"):
        train_loader(shards, 3, rank=0, world_size=2, start_batch=4, segments=[a, b], **args)


def _all(sizes, world):
    return tuple(np.concatenate([epoch_plan(sizes, 1, 0, r, world, 4)[i] for r in range(world)]) for i in range(3))


def test_the_cut_after_a_change_drops_only_the_remainder_and_later_epochs_follow():
    from pixelgen.data.loader import Segment, segment_start

    sizes = [7, 6]  # 13 samples: one rank reads 13 per epoch, two read 6 each
    pos = lambda plan: list(zip(plan[0].tolist(), plan[1].tolist()))  # noqa: E731
    # One rank, 2 per batch, for 1 batch; then two ranks of 1: 11 left in epoch 0, 5 each, 1 dropped.
    epoch, blocks = segment_start(sizes, 3, 4, [Segment(0, 1, 2), Segment(1, 2, 1)])
    whole = pos(epoch_plan(sizes, 3, 0, 0, 1, 4))
    assert epoch == 0 and [pos(b) for b in blocks] == [whole[2:7], whole[7:12]]  # whole[12] is the cut's drop
    # A change after the epoch ended (15 batches of 1 on two ranks: 6 in epoch 0, then 6, then 3 in epoch 2).
    epoch, blocks = segment_start(sizes, 3, 4, [Segment(0, 2, 1), Segment(15, 1, 2)])
    e2 = [pos(epoch_plan(sizes, 3, 2, r, 2, 4)) for r in (0, 1)]
    assert epoch == 2 and [pos(b) for b in blocks] == [e2[0][3:] + e2[1][3:]]
    with pytest.raises(ValueError, match="out of order"):
        segment_start(sizes, 3, 4, [Segment(0, 2, 1), Segment(4, 1, 2), Segment(2, 2, 1)])
