"""Tiny methods B and C can memorise a handful of images: both AR levels, the objective and the sampler learn.

Runs benchmarks/ar_overfit.py's functions at 16 px (4 px patches) on 4 images: method B (semantic AR + pixel AR,
categorical) for 300 steps and method C (semantic AR + per-patch diffusion head) for 150, both levels trained
jointly, sampled at temperature 0.1 (about 30 s on one CPU thread). The bounds are loose: with seeds 0-2 the
loss fell 108-167x (B) and 33-41x (C), the samples' error fell to 0.00001-0.002x (B) and 0.014-0.018x (C) of
step 0's, and every sample was nearest its own target (worst own/other distance 0.020).
"""

import pytest
import torch

from tests.conftest import load_benchmark


@pytest.mark.parametrize("method, steps", [("B", 300), ("C", 150)])
def test_tiny_ar_overfits_four_images(method, steps):
    overfit = load_benchmark("ar_overfit")
    cfg = overfit.AROverfitConfig(method=method, images=4, steps=steps, checkpoints=(0.0, 1.0), seed=0)
    result = overfit.overfit(cfg)
    report = overfit.summary(result)

    # Every training patch has its own dictionary entry: the objective's teacher is the dictionary's teacher.
    assert result.entries_used == cfg.entries, report
    assert result.loss_start() > 10 * result.loss_end(), report
    # At step 0 the semantic AR's logits are uniform (zero-initialised head) and the decoder is untrained: B
    # draws near-random pixels, C returns its starting noise (the zero-initialised head predicts v = 0).
    assert result.mse(cfg.steps) < 0.25 * result.mse(0), report
    # Each sample must be its own class's image, not another class's or a blend of all of them.
    nearest = result.nearest(cfg.steps)
    assert torch.equal(nearest, torch.arange(cfg.images)), f"nearest targets {nearest.tolist()}\n{report}"
