"""Loaders over the shards written by `pixelgen.data.shards`: an endless training stream and an exact eval pass.

The training stream is a pure function of (seed, batch index, rank, world_size): the sample order comes
from `epoch_plan`, computed in the main process from the manifest counts alone, and DataLoader workers
only read and decode the samples a batch names, reaching them by offset inside the tar shards. So the
stream does not depend on num_workers, resumes at any batch without replaying the ones before, and
every rank gets the same number of samples, which keeps distributed training in step.

A run resumed on another number of ranks (`Segment`s: the rank counts it ran at, and from which batch) goes
on with the rest of the current epoch: the samples each old rank had not reached yet, joined in rank order,
are cut into one contiguous block per new rank (the last len % new_world are dropped, as every epoch drops
total % world_size), and the epochs after it are the new rank count's own `epoch_plan`s. So no sample of
the epoch is seen twice or skipped, but for those few dropped at the cut.

Batches stay uint8 on the host (4x less to copy than float); `to_float` converts them on the device.
"""

import functools
import io
import itertools
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pixelgen.data import to_float  # noqa: F401  re-exported: the loader's batches meet it first
from pixelgen.data.shards import BAD_FILE_ERRORS, MANIFEST, center_crop, read_manifest, shard_paths

# Looked up in this order, so a sample's image member is found whatever format its shard was written in.
IMAGE_EXTENSIONS = ("png", "webp", "jpg")
CROPS = ("adm_center", "none")
# Shards each loader process keeps open and indexed; the plan touches only a few at a time.
OPEN_SHARDS = 16

# A sample's members: extension -> (byte offset of the data in the tar, size).
Members = dict[str, tuple[int, int]]


def _repair_hint(shard_dir: str) -> str:
    return (
        f"run `pixelgen shards verify {shard_dir}` to check the folder and rerun the shard stage "
        "(`pixelgen stage shard`) to rewrite the damaged shards"
    )


class _Target(NamedTuple):
    resolution: int
    crop: bool  # the shards hold original images, so the loader center-crops them


def _target(shard_dir: str, manifest: dict, resolution: int | None) -> _Target:
    """The size the loader delivers and whether it must crop, from the manifest and the caller's resolution."""
    preprocessing = manifest["preprocessing"]
    # Manifests written before original-bytes shards existed have no "crop"; their images were all cropped.
    crop = preprocessing.get("crop", "adm_center")
    if crop not in CROPS:
        raise ValueError(
            f"{os.path.join(shard_dir, MANIFEST)} has preprocessing.crop={crop!r}, which this loader does not "
            f"know (expected one of {CROPS}); rewrite the folder with the shard stage (`pixelgen stage shard`)"
        )
    if crop == "none":
        if resolution is None:
            raise ValueError(
                f"the shards in {shard_dir} hold original images that the loader crops, so it needs a "
                "resolution: pass resolution (data.resolution)"
            )
        if resolution < 1:
            raise ValueError(f"resolution={resolution} must be >= 1")
        return _Target(resolution, crop=True)
    stored = preprocessing["resolution"]
    if resolution is not None and resolution != stored:
        raise ValueError(
            f"resolution={resolution} was requested but the shards in {shard_dir} are cropped to {stored}; "
            f"set data.resolution to {stored} or reshard at {resolution}"
        )
    return _Target(stored, crop=False)


def _image_ext(exts: Iterable[str], where: str) -> str:
    """The extension of a sample's image member, after checking the sample also has its .cls label."""
    present = set(exts)
    image_exts = [ext for ext in IMAGE_EXTENSIONS if ext in present]
    if not image_exts or "cls" not in present:
        raise ValueError(
            f"{where} has members {sorted(present)}, not an image (one of {IMAGE_EXTENSIONS}) and a .cls label; "
            "rewrite the shards with the shard stage (`pixelgen stage shard`)"
        )
    return image_exts[0]


def _decode(data: bytes, target: _Target, where: str, flip: bool = False) -> np.ndarray:
    """Image bytes -> uint8 RGB [H, W, 3] at the target resolution, mirrored left-right when `flip`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # convert() forces the full decode, so damaged bytes fail here with the sample named.
            rgb = image.convert("RGB")
    except BAD_FILE_ERRORS as e:
        raise ValueError(f"cannot decode the image of {where} ({type(e).__name__}: {e})") from e
    if target.crop:
        rgb = center_crop(rgb, target.resolution)
    if rgb.size != (target.resolution, target.resolution):
        raise ValueError(
            f"{where} decodes to {rgb.width}x{rgb.height}, not the {target.resolution}x{target.resolution} "
            "its manifest promises; rewrite the shards with the shard stage (`pixelgen stage shard`)"
        )
    if flip:  # in PIL: a reversed-stride numpy copy of the same image is ~10x slower
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(rgb)


def _index_shard(path: str, expected: int) -> list[tuple[str, Members]]:
    """(key, members) for every sample of a tar shard, in order, from its headers alone."""
    samples: list[tuple[str, Members]] = []
    shard_dir = os.path.dirname(path)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                head, slash, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not info.isfile() or not dot:
                    continue
                # Like webdataset: the key ends at the first dot, and consecutive members with one key are a sample.
                key = head + slash + stem
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext.lower()] = (info.offset_data, info.size)
    except tarfile.TarError as e:
        raise ValueError(f"shard {path} is not a readable tar file ({e}); {_repair_hint(shard_dir)}") from e
    if len(samples) != expected:
        raise ValueError(
            f"shard {path} holds {len(samples)} samples but {os.path.join(shard_dir, MANIFEST)} lists "
            f"{expected}; {_repair_hint(shard_dir)}"
        )
    return samples


def _open_shard(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} is missing; {_repair_hint(os.path.dirname(path))}") from None


class _ShardReader:
    """Random access to the samples of tar shards, each shard indexed and opened lazily by the reading process."""

    def __init__(self, paths: list[str], counts: list[int]):
        self.paths = paths
        self.counts = counts
        self._pid = os.getpid()
        self._open: OrderedDict[int, tuple[int, list[tuple[str, Members]]]] = OrderedDict()

    def _shard(self, shard: int) -> tuple[int, list[tuple[str, Members]]]:
        if self._pid != os.getpid():
            # A forked or unpickled copy: the descriptors belong to the parent (or are not even valid
            # here), so leave them alone and open this process's own.
            self._pid, self._open = os.getpid(), OrderedDict()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        fd = _open_shard(self.paths[shard])
        try:
            entry = fd, _index_shard(self.paths[shard], self.counts[shard])
        except BaseException:
            os.close(fd)
            raise
        self._open[shard] = entry
        if len(self._open) > OPEN_SHARDS:
            os.close(self._open.popitem(last=False)[1][0])
        return entry

    def sample(self, shard: int, member: int) -> tuple[str, Members]:
        return self._shard(shard)[1][member]

    def read(self, shard: int, span: tuple[int, int]) -> bytes:
        offset, size = span
        data = os.pread(self._shard(shard)[0], size, offset)
        if len(data) != size:
            path = self.paths[shard]
            raise ValueError(f"shard {path} ended early while reading; {_repair_hint(os.path.dirname(path))}")
        return data

    def __del__(self) -> None:
        # With num_workers=0 the reader lives in the training process: close its shards with the loader.
        if self._pid == os.getpid():
            for fd, _ in self._open.values():
                os.close(fd)


class _TrainSamples(torch.utils.data.Dataset):
    """Map-style dataset over (shard index, member index, flip) items -> (image [H, W, 3] uint8, label, key)."""

    def __init__(self, reader: _ShardReader, target: _Target):
        self.reader = reader
        self.target = target

    def __getitem__(self, item: tuple[int, int, bool]) -> tuple[np.ndarray, int, str]:
        shard, member, flip = item
        key, members = self.reader.sample(shard, member)
        where = f"sample {key!r} of shard {self.reader.paths[shard]}"
        image = _decode(self.reader.read(shard, members[_image_ext(members, where)]), self.target, where, flip)
        label = int(self.reader.read(shard, members["cls"]))
        return image, label, key


def _check_plan_args(total: int, seed: int, rank: int, world_size: int, shuffle_buffer: int, source: str) -> None:
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (1 keeps the shard order)")
    if world_size > total:
        raise ValueError(
            f"{source} has {total} samples, fewer than world_size={world_size}: every rank needs at least one; "
            "train on fewer ranks or on a larger data set"
        )


def epoch_plan(
    counts: list[int], seed: int, epoch: int, rank: int, world_size: int, shuffle_buffer: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One rank's samples of one epoch, in order, as (shard index, member index, flip) arrays.

    The epoch visits the shards in an order drawn from (seed, epoch), the same on every rank; rank r
    takes the block [r*L, (r+1)*L) of that sample sequence with L = total // world_size (the rest of
    the epoch is dropped, so every rank gets L samples) and shuffles it inside consecutive windows of
    `shuffle_buffer` samples. Each sample also gets a horizontal-flip bit. Blocks and windows keep a
    worker's reads within a few shards at a time.
    """
    counts_arr = np.asarray(counts, dtype=np.int64)
    total = int(counts_arr.sum())
    _check_plan_args(total, seed, rank, world_size, shuffle_buffer, f"the plan over {len(counts)} shards")
    length = total // world_size

    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    ordered_counts = counts_arr[order]
    shard_idx = np.repeat(order, ordered_counts)
    member_idx = np.arange(total) - np.repeat(np.cumsum(ordered_counts) - ordered_counts, ordered_counts)
    block = slice(rank * length, (rank + 1) * length)

    # One generator draws every window's order and the flips. world_size (never 0) comes last because
    # SeedSequence takes entropy that only adds trailing zeros for the same seed: [seed, epoch, 0] would
    # repeat the shard order's stream.
    rng = np.random.default_rng([seed, epoch, rank, world_size])
    window = min(shuffle_buffer, length)
    windows = -(-length // window)
    sort_keys = rng.random((windows, window))
    sort_keys.reshape(-1)[length:] = np.inf  # padding of the last, partial window sorts last and is cut off
    within = (np.argsort(sort_keys, axis=1) + window * np.arange(windows)[:, None]).reshape(-1)[:length]
    flip = rng.random(length) < 0.5
    return shard_idx[block][within], member_idx[block][within], flip


@dataclass(frozen=True)
class Segment:
    """A stretch of a training run at one rank count: from batch `from_batch` on (every rank's batch index is
    the same), `world_size` ranks each take batches of `batch_size`."""

    from_batch: int
    world_size: int
    batch_size: int


Plan = tuple[np.ndarray, np.ndarray, np.ndarray]  # (shard index, member index, flip), as epoch_plan returns


def _cat(blocks: list[Plan]) -> Plan:
    return tuple(np.concatenate([b[i] for b in blocks]) for i in range(3))


def segment_start(counts: list[int], seed: int, shuffle_buffer: int, segments: list[Segment]) -> tuple[int, list[Plan]]:
    """(epoch, each rank's block of it) where the last segment starts: the rest of the epoch the segment before
    had reached, redistributed over the last segment's ranks (see the module docstring). One segment: epoch 0,
    its `epoch_plan` blocks."""
    total = sum(counts)
    first = segments[0]
    if first.from_batch != 0:
        raise ValueError(f"the first segment starts at batch {first.from_batch}, not 0")
    epoch = 0
    blocks = [epoch_plan(counts, seed, 0, r, first.world_size, shuffle_buffer) for r in range(first.world_size)]
    for seg, nxt in zip(segments, segments[1:]):
        if nxt.from_batch < seg.from_batch:
            raise ValueError(f"segments out of order: batch {nxt.from_batch} after {seg.from_batch}")
        _check_plan_args(total, seed, 0, nxt.world_size, shuffle_buffer, f"segment from batch {nxt.from_batch}")
        n = (nxt.from_batch - seg.from_batch) * seg.batch_size  # samples each rank took in this segment
        if n >= len(blocks[0][0]):  # past the segment's first (partial) epoch: into the plain epochs after it
            n -= len(blocks[0][0])
            skip, n = divmod(n, total // seg.world_size)
            epoch += 1 + skip
            blocks = [epoch_plan(counts, seed, epoch, r, seg.world_size, shuffle_buffer)
                      for r in range(seg.world_size)]
        rest = _cat([tuple(column[n:] for column in b) for b in blocks])
        share = len(rest[0]) // nxt.world_size
        blocks = [tuple(column[r * share:(r + 1) * share] for column in rest) for r in range(nxt.world_size)]
    return epoch, blocks


@dataclass(frozen=True)
class _BatchPlan:
    """The batch sampler: one rank's endless stream of epoch blocks, cut into batches of (shard, member, flip)."""

    counts: list[int]
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    batch_size: int
    start_batch: int
    segments: tuple[Segment, ...] = ()  # the run's rank counts before this one's; () = always this one

    def _samples(self) -> Iterator[tuple[int, int, bool]]:
        length = sum(self.counts) // self.world_size
        position = self.start_batch * self.batch_size
        first_epoch = 0
        if len(self.segments) > 1:
            last = self.segments[-1]
            epoch, blocks = segment_start(self.counts, self.seed, self.shuffle_buffer, list(self.segments))
            own, position = blocks[self.rank], (self.start_batch - last.from_batch) * self.batch_size
            for start in range(position, len(own[0]), self.batch_size):
                yield from zip(*(column[start : start + self.batch_size].tolist() for column in own))
            position, first_epoch = max(0, position - len(own[0])), epoch + 1
        skip, offset = divmod(position, length)
        for epoch in itertools.count(first_epoch + skip):
            plan = epoch_plan(self.counts, self.seed, epoch, self.rank, self.world_size, self.shuffle_buffer)
            # A batch-sized slice at a time: a whole ImageNet epoch as Python ints would take ~100 MB per rank.
            for start in range(offset, length, self.batch_size):
                yield from zip(*(column[start : start + self.batch_size].tolist() for column in plan))
            offset = 0

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        samples = self._samples()
        while True:
            yield list(itertools.islice(samples, self.batch_size))


def _collate(samples: list[tuple[np.ndarray, int, str]], with_keys: bool = False) -> tuple:
    images_bhwc = torch.from_numpy(np.stack([image for image, _, _ in samples]))
    labels = torch.tensor([label for _, label, _ in samples], dtype=torch.int64)
    # A channels-last view, not a copy: to_float writes the contiguous [B, 3, H, W] floats on the device.
    batch = images_bhwc.permute(0, 3, 1, 2), labels
    return (*batch, [key for _, _, key in samples]) if with_keys else batch


def train_loader(
    shard_dir: str,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    start_batch: int = 0,
    segments: Iterable[Segment] = (),
    resolution: int | None = None,
    with_keys: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Endless (images_uint8 [B, 3, H, W], labels [B] int64) batches (plus keys: list[str] when with_keys).

    Batch b holds positions [b*B, (b+1)*B) of this rank's stream, the concatenation of its `epoch_plan`
    blocks for epochs 0, 1, ...; a batch may span two epochs. The stream depends on (seed, rank,
    world_size, shuffle_buffer, batch_size) only, and `start_batch=k` starts at batch k directly.
    `segments`: the rank counts the run trained at before, oldest first, the last being this one (see the
    module docstring); at most one segment, the stream is this rank count's alone.
    `resolution` is required for shards of original images (the loader crops them) and must match
    the manifest for preprocessed ones.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} must be >= 0")
    manifest = read_manifest(shard_dir)
    paths = shard_paths(shard_dir, "train")
    counts = [shard["count"] for shard in manifest["splits"]["train"]["shards"]]
    _check_plan_args(sum(counts), seed, rank, world_size, shuffle_buffer, f"the train split of {shard_dir}")
    segments = tuple(segments)
    if segments and (segments[-1].world_size, segments[-1].batch_size) != (world_size, batch_size) \
            or segments and start_batch < segments[-1].from_batch:
        raise ValueError(f"the last segment {segments[-1]} is not this run's ({world_size} ranks of batches of "
                         f"{batch_size} from batch {start_batch} on)")
    target = _target(shard_dir, manifest, resolution)
    # Checked up front so a missing shard fails the start of training, not the epoch that first reaches it.
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} is missing; {_repair_hint(shard_dir)}")

    loader = torch.utils.data.DataLoader(
        _TrainSamples(_ShardReader(paths, counts), target),
        batch_sampler=_BatchPlan(counts, seed, rank, world_size, shuffle_buffer, batch_size, start_batch, segments),
        num_workers=num_workers,
        collate_fn=functools.partial(_collate, with_keys=with_keys),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        # The DataLoader draws its workers' base seed from this generator; without one it would advance
        # the global torch RNG that training uses. The workers draw no random numbers.
        generator=torch.Generator(),
    )
    return iter(loader)


def _eval_sample(sample: dict, target: _Target) -> tuple[np.ndarray, int, str]:
    where = f"sample {sample['__key__']!r} of shard {sample['__url__']}"
    members = [name for name in sample if not name.startswith("__")]  # webdataset's __key__ and __url__
    image = _decode(sample[_image_ext(members, where)], target, where)
    return image, int(sample["cls"]), sample["__key__"]


def eval_batches(
    shard_dir: str, split: str, batch_size: int, resolution: int | None = None, shards: list[int] | None = None
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of `split` exactly once, in manifest order, as (images_uint8 [B, 3, H, W], labels [B]);
    only the shards numbered `shards` (their manifest positions), if given.

    Each iteration is a fresh deterministic pass; the last batch may be smaller. `resolution` is as
    for `train_loader`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    target = _target(shard_dir, read_manifest(shard_dir), resolution)
    paths = shard_paths(shard_dir, split)
    return wds.DataPipeline(
        wds.SimpleShardList(paths if shards is None else [paths[i] for i in shards]),
        wds.tarfile_to_samples(),
        wds.map(functools.partial(_eval_sample, target=target)),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
