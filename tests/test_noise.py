"""Per-image random streams: what image i draws does not depend on the batch that draws it."""

import pytest
import torch

from pixelgen import noise
from pixelgen.diffusion import sample
from pixelgen.models.config import SamplerConfig


def test_an_images_draws_do_not_depend_on_its_batch():
    whole = noise.Streams(7, range(6))
    a = whole.randn((6, 3, 4, 4))
    part = noise.Streams(7, [4, 2])
    assert torch.equal(part.randn((2, 3, 4, 4)), a[[4, 2]])
    # Later draws continue each stream: the second draw of image 2 is the same in any batch too.
    b = whole.rand((6, 5))
    assert torch.equal(part.rand((2, 5)), b[[4, 2]])
    # Another seed, other numbers; neighbouring images are not related.
    assert not torch.equal(noise.Streams(8, range(6)).randn((6, 3, 4, 4)), a)
    assert abs(torch.corrcoef(a.flatten(1)[:2])[0, 1]) < 0.5


def test_a_draw_of_k_batches_of_rows_takes_k_draws_from_each_stream():
    # A guided batch draws its conditional and unconditional halves: rows b and B + b are image b's.
    two = noise.Streams(0, range(3)).randn((6, 4))
    one = noise.Streams(0, range(3))
    first, second = one.randn((3, 4)), one.randn((3, 4))
    assert torch.equal(two, torch.cat([first, second]))
    with pytest.raises(ValueError, match="multiple of the batch"):
        noise.Streams(0, range(3)).randn((4, 4))


def test_categorical_from_streams_follows_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7]).repeat(20000, 1)
    idx = noise.categorical(probs * 3.0, noise.Streams(1, range(20000)))  # unnormalised rows are fine
    assert idx.shape == (20000, 1)
    freq = torch.bincount(idx[:, 0], minlength=4).float() / 20000
    assert freq[1] == 0  # a zero-probability entry is never drawn
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.2, 0.7]), atol=0.012, rtol=0)
    # The same images draw the same indices whatever the batch.
    again = noise.categorical(probs[:5] * 3.0, noise.Streams(1, range(5)))
    assert torch.equal(again, idx[:5])
    # With a plain generator (training grids), torch.multinomial as before.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(noise.categorical(probs[:50], g1), torch.multinomial(probs[:50], 1, generator=g2))


def test_diffusion_samples_of_an_image_are_the_same_in_any_batch():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t, y):
        return net(x) * (1 + t[:, None, None, None]) + y[:, None, None, None].float() * 0.01

    cfg = SamplerConfig(kind="heun", steps=3, cfg_scale=1.0)
    y = torch.arange(6) % 3
    big = sample(model, y, shape=(3, 8, 8), cfg=cfg, num_classes=3, generator=noise.Streams(5, range(6)))
    small = sample(model, y[[1, 4]], shape=(3, 8, 8), cfg=cfg, num_classes=3, generator=noise.Streams(5, [1, 4]))
    torch.testing.assert_close(small, big[[1, 4]], atol=1e-6, rtol=0)
