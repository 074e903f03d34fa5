import copy
import itertools

import pytest
import torch

from pixelgen.models import SIZES, build_generator, count_params
from pixelgen.models.config import DecoderConfig, ModelConfig, TrunkConfig
from pixelgen.models.layers import apply_rope, rope_2d

NUM_CLASSES = 10


def tiny_cfg(**decoder_kw) -> ModelConfig:
    return ModelConfig(
        trunk=TrunkConfig(size="tiny", patch_size=4), decoder=DecoderConfig(**decoder_kw), num_classes=NUM_CLASSES
    )


def tiny_model(seed=0, **decoder_kw):
    torch.manual_seed(seed)
    return build_generator(tiny_cfg(**decoder_kw), resolution=32)


@torch.no_grad()
def wake_zero_inits(model, std=0.2):
    """Give every all-zero parameter (adaLN, output layer, biases) random values so every path carries signal."""
    for p in model.parameters():
        if not p.any():
            p.normal_(0.0, std)
    return model


def inputs(B=2, H=32, W=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, H, W, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, NUM_CLASSES + 1, (B,), generator=g)
    return x, t, y


def test_untrained_model_outputs_exact_zero_with_right_shape():
    model = tiny_model()
    x, t, y = inputs(B=3)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


def test_output_shape_non_square_after_waking():
    model = wake_zero_inits(tiny_model())
    x, t, y = inputs(H=16, W=32)
    out = model(x, t, y)
    assert out.shape == x.shape and out.abs().sum() > 0


def test_rope_scores_depend_only_on_offset():
    head_dim, h, w = 16, 4, 5
    cos, sin = rope_2d(head_dim, h, w)
    g = torch.Generator().manual_seed(0)
    q_LD = apply_rope(torch.randn(head_dim, generator=g).expand(h * w, head_dim), cos, sin)
    k_LD = apply_rope(torch.randn(head_dim, generator=g).expand(h * w, head_dim), cos, sin)
    scores = q_LD @ k_LD.T
    by_offset = {}
    for (i, (ri, ci)), (j, (rj, cj)) in itertools.product(enumerate(itertools.product(range(h), range(w))), repeat=2):
        by_offset.setdefault((ri - rj, ci - cj), []).append(scores[i, j])
    for vals in by_offset.values():
        assert torch.allclose(torch.stack(vals), vals[0], atol=1e-5)
    # Both axes matter: moving along a row or a column changes the score.
    assert not torch.allclose(by_offset[(0, 1)][0], by_offset[(0, 0)][0])
    assert not torch.allclose(by_offset[(1, 0)][0], by_offset[(0, 0)][0])
    with pytest.raises(ValueError):
        rope_2d(6, 2, 2)


def test_pixelwise_adaln_differs_per_pixel():
    model = tiny_model()
    block = model.decoder.blocks[0]
    cond = torch.randn(2, 64, 64)  # [B, L, D] at 32 px / patch 4
    assert all(not m.any() for m in block.modulation(cond))  # zero-init
    with torch.no_grad():
        block.adaLN.weight.normal_()
    for m_NPD in block.modulation(cond):
        assert m_NPD.shape == (2 * 64, 16, 8)
        # Spread across the p*p pixels of each patch: every pixel gets its own modulation.
        assert (m_NPD.std(dim=1) > 1e-3).all()


def test_decoder_attention_is_global_across_patches():
    model = wake_zero_inits(tiny_model())
    x, t, y = inputs()
    _, cond = model.trunk(x, t, y)
    x2 = x.clone()
    x2[:, :, :4, :4] += 1.0  # top-left patch only
    with torch.no_grad():
        a, b = model.decoder(x, cond), model.decoder(x2, cond)  # same condition: only the decoder sees the change
    far = (slice(None), slice(None), slice(28, 32), slice(28, 32))  # bottom-right patch
    assert (a[far] - b[far]).abs().max() > 1e-6


def test_trunk_attention_is_global_across_patches():
    model = wake_zero_inits(tiny_model())
    x, t, y = inputs()
    x2 = x.clone()
    x2[:, :, :4, :4] += 1.0
    with torch.no_grad():
        s, _ = model.trunk(x, t, y)
        s2, _ = model.trunk(x2, t, y)
    assert (s[:, -1] - s2[:, -1]).abs().max() > 1e-6


def test_gradients_reach_every_parameter():
    model = wake_zero_inits(tiny_model())
    x, t, _ = inputs()
    y = torch.tensor([3, NUM_CLASSES])
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_frozen_trunk_gets_no_gradients():
    model = wake_zero_inits(tiny_model())
    model.trunk.requires_grad_(False)
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert count_params(model, trainable_only=True) == count_params(model.decoder)


def test_activation_checkpointing_matches():
    plain = wake_zero_inits(tiny_model())
    ckpt = tiny_model(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert all(block.activation_checkpointing for block in ckpt.decoder.blocks)
    x, t, y = inputs()
    out_plain, out_ckpt = plain(x, t, y), ckpt(x, t, y)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name,expected", [("B", 184e6), ("L", 569e6), ("XL", 797e6)])
def test_paper_param_counts(name, expected):
    cfg = ModelConfig(trunk=TrunkConfig(size=name, patch_size=16))  # ImageNet: 1000 classes, patch 16
    with torch.device("meta"):
        model = build_generator(cfg, resolution=256)
    n = count_params(model)
    print(f"PixelDiT-{name}: {n / 1e6:.1f}M params (paper {expected / 1e6:.0f}M)")
    assert abs(n - expected) / expected < 0.05


def test_size_overrides_dims_and_leaves_config_alone():
    cfg = tiny_cfg()
    model = build_generator(cfg, resolution=32)
    assert model.trunk.dim == SIZES["tiny"].dim and len(model.trunk.blocks) == SIZES["tiny"].depth
    assert model.decoder.pixel_dim == SIZES["tiny"].pixel_dim
    assert cfg.trunk.dim == TrunkConfig().dim
    assert 1e5 < count_params(model) < 1e6
    clone = copy.deepcopy(cfg)
    clone.trunk.size = None
    clone.trunk.dim, clone.trunk.depth, clone.trunk.heads, clone.decoder.heads = 32, 1, 2, 2
    assert build_generator(clone, resolution=32).trunk.dim == 32


def test_unknown_size_and_bad_resolution_are_rejected():
    with pytest.raises(ValueError, match=r"model\.trunk\.size.*tiny.*XL"):
        build_generator(ModelConfig(trunk=TrunkConfig(size="huge")), resolution=256)
    with pytest.raises(ValueError, match="patch_size"):
        build_generator(tiny_cfg(), resolution=30)
