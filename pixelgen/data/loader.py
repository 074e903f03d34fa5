"""Loaders over the shards written by `pixelgen.data.shards`: an endless training stream and an exact eval pass.

Batches stay uint8 on the host (4x less to copy than float); `to_float` converts them on the device.
"""

import functools
import itertools
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from pixelgen.data.shards import shard_paths


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _stream_seed(seed: int, rank: int, world_size: int, stage: str) -> int:
    """Seed for one pipeline stage in the current loader worker; evaluated inside the worker."""
    entropy = np.random.SeedSequence([seed, rank, world_size, _worker_id(), int.from_bytes(stage.encode(), "little")])
    return int(entropy.generate_state(1)[0])


def _shuffle(samples, bufsize: int, seed: int, rank: int, world_size: int):
    rng = random.Random(_stream_seed(seed, rank, world_size, "shuffle"))
    return wds.shuffle(bufsize, rng=rng)(samples)


def _random_hflip(samples, seed: int, rank: int, world_size: int):
    # One generator per worker, drawn in stream order: each sample's flip is fixed by its stream position.
    rng = np.random.default_rng(_stream_seed(seed, rank, world_size, "flip"))
    for image_hwc, label in samples:
        if rng.random() < 0.5:
            image_hwc = np.ascontiguousarray(image_hwc[:, ::-1])
        yield image_hwc, label


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images_bhwc = torch.from_numpy(np.stack([image for image, _ in samples]))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images_bhwc.permute(0, 3, 1, 2).contiguous(), labels


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images_uint8 [B, 3, H, W], labels [B] int64) batches from the train shards.

    Shards are resampled with replacement, so there are no epochs. The stream is a deterministic
    function of (seed, rank, world_size, num_workers); `start_batch=k` resumes it at batch k.
    """
    urls = shard_paths(shard_dir, "train")
    seeded = dict(seed=seed, rank=rank, world_size=world_size)
    pipeline = wds.DataPipeline(
        # deterministic=True: the shard sequence comes from the seeds alone, not pid and time.
        wds.ResampledShards(
            urls,
            seed=seed,
            worker_seed=functools.partial(_stream_seed, seed, rank, world_size, "shards"),
            deterministic=True,
        ),
        wds.tarfile_to_samples(),
        functools.partial(_shuffle, bufsize=shuffle_buffer, **seeded),
        wds.decode("rgb8"),
        wds.to_tuple("png;jpg", "cls"),
        functools.partial(_random_hflip, **seeded),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        # The DataLoader draws its worker base seed from this generator instead of the global torch RNG.
        generator=torch.Generator().manual_seed(seed),
    )
    # The DataLoader takes batches from its workers round-robin, so the merged order is fixed too.
    # Resuming replays and drops the first start_batch batches: O(start_batch) decoding work.
    return itertools.islice(loader, start_batch, None)


def eval_batches(shard_dir: str, split: str, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of `split` exactly once, in manifest order, as (images_uint8 [B, 3, H, W], labels [B]).

    Each iteration is a fresh deterministic pass; the last batch may be smaller.
    """
    return wds.DataPipeline(
        wds.SimpleShardList(shard_paths(shard_dir, split)),
        wds.tarfile_to_samples(),
        wds.decode("rgb8"),
        wds.to_tuple("png;jpg", "cls"),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; call it after moving the batch to the device."""
    return images_uint8.to(torch.float32).div_(127.5).sub_(1.0)
