"""Typed config for evaluation (FID / IS through torch-fidelity's InceptionV3)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class FIDConfig:
    samples_per_class: int = 50  # ImageNet protocol: 50 per class x 1000 classes = 50k
    batch_size: int = 64
    # torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth). If unset, the
    # environment variable PIXELGEN_INCEPTION_WEIGHTS is used.
    inception_weights: Optional[str] = None
    # With no weights file, build a seeded random-init InceptionV3 instead of failing. The number is then
    # a proxy FID, labelled as such everywhere; only for demos and tests.
    allow_random_features: bool = False
    reference_split: str = "val"
    ema: bool = True  # sample from the EMA weights
    seed: int = 0
    # More sampler settings to score after `sampler`'s, against the same reference statistics: each entry is
    # space-separated sampler keys, e.g. "guidance=semantic semantic_cfg_scale=2.0" or "cfg_scale=1.5".
    sweep: list[str] = field(default_factory=list)


def check_fid(fid: FIDConfig, fail) -> None:
    if fid.samples_per_class <= 0:
        fail("fid.samples_per_class", fid.samples_per_class, "must be positive")
