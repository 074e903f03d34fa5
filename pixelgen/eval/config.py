"""Typed config for evaluation (FID, IS, sFID, precision/recall through torch-fidelity's InceptionV3)."""

import os
import zipfile
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional


class Metric(StrEnum):
    fid = "fid"
    isc = "is"  # Inception Score
    sfid = "sfid"  # FID of ADM's spatial features (mixed_6/conv, first 7 channels)
    precision_recall = "precision_recall"  # k = 3 manifolds of Inception pool3 features (ADM's protocol)


SPLIT_REFERENCES = ("train", "val")
# What each metric needs from a reference .npz file (ADM's reference batches hold all of these).
REFERENCE_KEYS = {Metric.fid: ("mu", "sigma"), Metric.isc: (), Metric.sfid: ("mu_s", "sigma_s"),
                  Metric.precision_recall: ("arr_0",)}


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
    # The reference the generated images are scored against: `train` (statistics of the ADM-center-cropped
    # training images, what published ImageNet FIDs use), `val`, or an .npz file: ADM's reference batch
    # (VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s, sigma_s and 10k images in arr_0) or statistics alone
    # (mu, sigma, as JiT's jit_in256_stats.npz; then metrics: [fid, is]).
    reference: str = "train"
    metrics: list[str] = field(default_factory=lambda: [m.value for m in Metric])
    # Reference images for precision/recall from a split (the first ones of the shuffled shards); ADM's 10k.
    reference_images: int = 10_000
    # The generator scored: ema (the first of the last training stage's ema_decays), ema-<decay> (another of
    # them, e.g. ema-0.9996), model (the trained weights, not averaged), or a .safetensors file of any export.
    weights: str = "ema"
    seed: int = 0
    # Images per chunk file: the unit of work ranks share, of resumption (a preempted stage finishes its chunk;
    # a killed one loses at most one per rank) and of host memory. Best a multiple of batch_size.
    chunk_size: int = 500
    # More sampler settings to score after `sampler`'s, against the same reference statistics: each entry is
    # space-separated sampler keys, e.g. "guidance=semantic semantic_cfg_scale=2.0" or "cfg_scale=1.5", and
    # optionally weights=<a value of fid.weights> ("cfg_scale=1.5 weights=ema-0.9999": CFG scale x EMA decay).
    sweep: list[str] = field(default_factory=list)


def check_fid(fid: FIDConfig, fail) -> None:
    if fid.samples_per_class <= 0:
        fail("fid.samples_per_class", fid.samples_per_class, "must be positive")
    if not fid.metrics or Metric.fid not in fid.metrics:
        fail("fid.metrics", list(fid.metrics), f"must include fid; known metrics: {', '.join(Metric)}")
    unknown = [m for m in fid.metrics if m not in set(Metric)]
    if unknown:
        fail("fid.metrics", list(fid.metrics), f"unknown metric(s) {unknown}; known metrics: {', '.join(Metric)}")
    if fid.chunk_size < 1:
        fail("fid.chunk_size", fid.chunk_size, "must be at least 1 image")
    if fid.reference_images < 2:
        fail("fid.reference_images", fid.reference_images, "must be at least 2")
    if fid.reference not in SPLIT_REFERENCES:
        missing = missing_reference_keys(fid.reference, fid.metrics)
        if missing:
            fail("fid.reference", fid.reference, missing)


def ema_decay(weights: str) -> Optional[float]:
    """The decay of `fid.weights=ema-<decay>`, else None."""
    if not weights.startswith("ema-"):
        return None
    try:
        return float(weights.removeprefix("ema-"))
    except ValueError:
        return None


def missing_reference_keys(path: str, metrics: list[str]) -> Optional[str]:
    """Why the reference file cannot give `metrics` (None when it can): it is missing, not an npz, or lacks the
    arrays a metric needs. Reads the archive's index only, not the arrays."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return (f"is neither {' nor '.join(SPLIT_REFERENCES)} nor an existing file: point it at a reference .npz "
                f"(e.g. ADM's VIRTUAL_imagenet256_labeled.npz) or use a split")
    try:
        with zipfile.ZipFile(path) as z:
            keys = {name.removesuffix(".npy") for name in z.namelist()}
    except (zipfile.BadZipFile, OSError) as err:
        return f"is not a readable .npz file ({err})"
    lacking = [(m, [k for k in REFERENCE_KEYS[Metric(m)] if k not in keys]) for m in metrics if m in set(Metric)]
    lacking = [(m, ks) for m, ks in lacking if ks]
    if lacking:
        what = "; ".join(f"{m} needs {', '.join(ks)}" for m, ks in lacking)
        return (f"the file holds {sorted(keys)}, but {what}: take those metrics out of fid.metrics (e.g. "
                f"fid.metrics=[fid,is] for a statistics-only file) or use a reference that has them")
    return None
