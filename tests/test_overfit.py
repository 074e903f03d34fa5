"""A tiny PixelDiT can memorise a handful of images: the trunk, the PiT decoder and the flow objective learn.

Runs benchmarks/overfit.py's functions at 16 px on 4 images (about 20 s on one CPU thread). The bounds are
loose: with seeds 0-2 the loss fell 18-22x and the samples' error fell to 0.01-0.02x of step 0's.
"""

import torch

from tests.conftest import load_benchmark


def test_tiny_model_overfits_four_images():
    overfit = load_benchmark("overfit")
    cfg = overfit.OverfitConfig(
        images=4, resolution=16, dim=64, pixel_dim=8, steps=400, lr=3e-3, sampler="euler", sample_steps=10,
        checkpoints=(0.0, 1.0), seed=0,
    )
    result = overfit.overfit(cfg)
    report = overfit.summary(result)

    assert result.loss_start() > 10 * result.loss_end(), report
    # At step 0 the zero-initialised model predicts v = 0, so the "samples" are the starting noise itself.
    assert result.mse(cfg.steps) < 0.25 * result.mse(0), report
    # Each sample must be its own class's image, not a blend of all of them (the mean image is about equally
    # far from every target, so it would fail this).
    nearest = result.distances(cfg.steps).argmin(dim=1)
    assert torch.equal(nearest, torch.arange(cfg.images)), f"nearest targets {nearest.tolist()}\n{report}"
