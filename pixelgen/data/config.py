"""Typed configs for the data components (sharding and loading)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    # ImageNet source: train/<wnid>/*.JPEG; val as <wnid>/ folders or flat with LOC_val_solution.csv or the
    # devkit's ground truth; or the Kaggle release root (ILSVRC/Data/CLS-LOC/...). See docs/data.md.
    imagenet_dir: Optional[str] = None
    # Existing shard folder (with manifest.json) to use instead of running the shard stage.
    shard_dir: Optional[str] = None
    resolution: int = 256  # ADM center crop size (applied when sharding, or when loading original bytes)
    num_classes: int = 1000
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples permuted together within a rank's share of an epoch


@dataclass
class ShardConfig:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    # png / webp: ADM center crop to data.resolution, lossless; jpg: the crop at jpeg_quality;
    # original: the source file bytes as they are (the loader crops).
    image_format: str = "png"
    jpeg_quality: int = 95
    max_count: int = 1000  # samples per shard at most
    # Target shard size: samples per shard are lowered to fit, from the mean size of a probe of 64 images.
    # Defaults give ~1300 shards for ImageNet train at 256 px (~1000 samples of ~120 KB each).
    max_bytes: int = 500_000_000
    workers: int = 2  # encoder processes per task
    # Tasks of a SLURM job array sharing the work; task i writes the i-th contiguous range of shards.
    array_tasks: int = 1
    seed: int = 0  # seeded global shuffle before writing
    # Labels for a flat val folder when they are not found next to it (LOC_val_solution.csv, or the devkit's
    # ILSVRC2012_validation_ground_truth.txt with meta.mat beside it).
    val_labels: Optional[str] = None


FORMATS = ("png", "webp", "jpg", "original")


def check_shard(cfg: ShardConfig, resolution: int) -> None:
    """Raise ValueError naming the first bad `shard.*` key (or data.resolution) and what it takes."""
    if cfg.image_format not in FORMATS:
        raise ValueError(f"shard.image_format={cfg.image_format!r}; use one of {FORMATS}")
    if not cfg.splits:
        raise ValueError("shard.splits is empty; list at least one split, e.g. ['train', 'val']")
    for name, value in (("shard.max_count", cfg.max_count), ("shard.max_bytes", cfg.max_bytes),
                        ("shard.workers", cfg.workers), ("shard.array_tasks", cfg.array_tasks),
                        ("data.resolution", resolution)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if cfg.image_format == "jpg" and not 1 <= cfg.jpeg_quality <= 100:
        raise ValueError(f"shard.jpeg_quality={cfg.jpeg_quality} must be in [1, 100]")
