"""Typed configs for the data components (sharding and loading)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    # ImageNet-layout source folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.
    imagenet_dir: Optional[str] = None
    # Existing shard folder (with manifest.json) to use instead of running the shard stage.
    shard_dir: Optional[str] = None
    resolution: int = 256  # images are ADM-center-cropped to this size when sharded
    num_classes: int = 1000
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 1000


@dataclass
class ShardConfig:
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    max_count: int = 1000  # samples per shard
    workers: int = 2  # encoder processes
    seed: int = 0  # seeded global shuffle before writing
    image_format: str = "png"  # png (lossless) or jpg
    jpeg_quality: int = 95
