import copy
import itertools
import math

import pytest
import torch

from pixelgen.families import build_generator
from pixelgen.models import SIZES, count_params
from pixelgen.models.config import DecoderConfig, ModelConfig, RepaConfig, TrunkConfig
from pixelgen.models.layers import RMSNorm, apply_rope, rope_2d

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


# The decoder design space: every kind, attention mode and AdaLN mode.
VARIANTS = {
    "pit-compact": dict(kind="pit"),
    "pit-pixel": dict(kind="pit", attention="pixel", attn_dim=16, heads=2),
    "pit-patch-adaln": dict(kind="pit", adaln="patch"),
    "pit-factored": dict(kind="pit", adaln="factored", mlp_hidden=24),
    "mlp": dict(kind="mlp", depth=2),
    "mlp-patch-adaln": dict(kind="mlp", adaln="patch"),
    "mixer": dict(kind="mixer"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_decoder_variant_starts_at_zero_and_trains_every_parameter(variant):
    model = tiny_model(**VARIANTS[variant])
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    wake_zero_inits(model)
    model(x, t, torch.tensor([3, NUM_CLASSES])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["pixel", "factored"])
def test_pixelwise_adaln_differs_per_pixel(mode):
    model = tiny_model(adaln=mode)
    block = model.decoder.blocks[0]
    cond = torch.randn(2, 64, 64)  # [B, L, D] at 32 px / patch 4
    block_cond = cond
    if mode == "factored":
        block_cond = torch.nn.functional.silu(model.decoder.cond_embed(cond).reshape(2 * 64, 16, 8))
    assert all(not m.any() for m in block.adaLN(block_cond))  # zero-init
    with torch.no_grad():
        block.adaLN.linear.weight.normal_()
    for m_NPD in block.adaLN(block_cond):
        assert m_NPD.shape == (2 * 64, 16, 8)
        # Spread across the p*p pixels of each patch: every pixel gets its own modulation.
        assert (m_NPD.std(dim=1) > 1e-3).all()


def test_patch_adaln_is_shared_by_the_pixels_of_a_patch():
    model = tiny_model(adaln="patch")
    block = model.decoder.blocks[0]
    with torch.no_grad():
        block.adaLN.linear.weight.normal_()
    cond = torch.randn(2, 64, 64)
    for m in block.adaLN(cond):
        assert m.shape == (2 * 64, 1, 8)  # one vector per patch, broadcast over its pixels
        assert m.std(dim=0).mean() > 1e-3  # but different patches differ
    # Pixel-wise AdaLN costs p*p times the parameters of the shared one.
    pixelwise = tiny_model().decoder.blocks[0].adaLN.linear.weight.numel()
    assert pixelwise == 16 * block.adaLN.linear.weight.numel()


def decoder_change(model, changed):
    """Decoder outputs for x and for x with `changed` (a slice) perturbed, with the same trunk condition."""
    x, t, y = inputs()
    cond = model.trunk(x, t, y).cond
    x2 = x.clone()
    x2[changed] += 1.0
    with torch.no_grad():
        return model.decoder(x, cond), model.decoder(x2, cond)


@pytest.mark.parametrize("variant,reaches_other_patches,reaches_same_patch", [
    ("pit-compact", True, True),  # compacted attention spans the image
    ("pit-pixel", False, True),  # attention among the pixels of a patch only
    ("mixer", False, True),  # token mixing within a patch
    ("mlp", False, False),  # per pixel: no interaction at all
])
def test_what_each_decoder_kind_lets_a_pixel_see(variant, reaches_other_patches, reaches_same_patch):
    model = wake_zero_inits(tiny_model(**VARIANTS[variant]))
    a, b = decoder_change(model, (slice(None), slice(None), 0, 0))  # one pixel of the top-left patch
    diff = (a - b).abs()
    assert diff[:, :, 0, 0].max() > 1e-6  # the pixel itself
    assert (diff[:, :, 3, 3].max() > 1e-6) == reaches_same_patch  # another pixel of its patch
    assert (diff[:, :, 28:, 28:].max() > 1e-6) == reaches_other_patches  # the bottom-right patch


def test_pixel_attention_runs_wider_than_the_pixels():
    model = tiny_model(attention="pixel", attn_dim=32, heads=4)
    attn = model.decoder.blocks[0].attn
    assert attn.qkv.in_features == 8 and attn.qkv.out_features == 3 * 32 and attn.proj.out_features == 8
    assert attn.heads == 4 and model.decoder.head_dim == 8
    assert model.decoder.blocks[0].mlp.fc1.out_features == 4 * 8
    assert tiny_model(mlp_hidden=40).decoder.blocks[0].mlp.fc1.out_features == 40


def test_decoder_attention_is_global_across_patches():
    model = wake_zero_inits(tiny_model())
    a, b = decoder_change(model, (slice(None), slice(None), slice(0, 4), slice(0, 4)))  # top-left patch only
    far = (slice(None), slice(None), slice(28, 32), slice(28, 32))  # bottom-right patch
    assert (a[far] - b[far]).abs().max() > 1e-6


def test_trunk_attention_is_global_across_patches():
    model = wake_zero_inits(tiny_model())
    x, t, y = inputs()
    x2 = x.clone()
    x2[:, :, :4, :4] += 1.0
    with torch.no_grad():
        s, s2 = model.trunk(x, t, y).tokens, model.trunk(x2, t, y).tokens
    assert (s[:, -1] - s2[:, -1]).abs().max() > 1e-6


def test_repa_features_are_the_projected_output_of_block_k():
    cfg = tiny_cfg()
    cfg.repa = RepaConfig(weight=0.5, block=1, projector_dim=48)
    torch.manual_seed(0)
    model = wake_zero_inits(build_generator(cfg, resolution=32))
    seen = {}
    model.trunk.blocks[0].register_forward_hook(lambda m, args, out: seen.update(block1=out))
    x, t, y = inputs()
    pred, features = model(x, t, y, return_features=True)
    torch.testing.assert_close(pred, model(x, t, y))  # asking for features changes nothing else
    assert features["repa"].shape == (2, 64, 768)  # DINOv2-B width, one token per patch
    torch.testing.assert_close(features["repa"], model.projector(seen["block1"]))
    assert [m.out_features for m in model.projector if hasattr(m, "out_features")] == [48, 48, 768]
    assert tiny_model()(x, t, y, return_features=True)[1] == {}  # no projector: no REPA features


def test_frozen_trunk_gets_no_gradients():
    """The decoder stage's freeze_trunk, through the family's predicate applied as the engine applies it."""
    from omegaconf import OmegaConf

    from pipeline.config import ExperimentConfig
    from pixelgen import families

    cfg = OmegaConf.structured(ExperimentConfig)
    assert cfg.train_decoder.freeze_trunk  # the default
    trains = families.get("pixeldit").trainable(cfg, "train_decoder")
    model = wake_zero_inits(tiny_model())
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    x, t, y = inputs()
    model(x, t, y).square().mean().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert count_params(model, trainable_only=True) == count_params(model.decoder)


@pytest.mark.parametrize("variant", ["pit-compact", "pit-pixel", "mlp", "mixer"])
def test_activation_checkpointing_matches(variant):
    plain = wake_zero_inits(tiny_model(**VARIANTS[variant]))
    torch.manual_seed(0)
    cfg = tiny_cfg(activation_checkpointing=True, **VARIANTS[variant])
    cfg.trunk.activation_checkpointing = True
    ckpt = build_generator(cfg, resolution=32)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.decoder.activation_checkpointing and ckpt.trunk.semantic.activation_checkpointing
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
    assert abs(n - expected) / expected < 0.02


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


@pytest.mark.parametrize("field,value,key", [
    ("kind", "unet", "model.decoder.kind"),
    ("attention", "local", "model.decoder.attention"),
    ("adaln", "global", "model.decoder.adaln"),
    ("attn_dim", 20, "model.decoder.heads"),  # the tiny size sets 4 heads: 20 / 4 = 5 is no RoPE head
    ("mlp_hidden", 0, "model.decoder.mlp_hidden"),
])
def test_bad_decoder_keys_are_named(field, value, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_generator(tiny_cfg(**{field: value}), resolution=32)


def test_bad_repa_block_is_named():
    cfg = tiny_cfg()
    cfg.repa = RepaConfig(weight=0.5, block=3)  # the tiny trunk has 2 blocks
    with pytest.raises(ValueError, match=r"model\.repa\.block"):
        build_generator(cfg, resolution=32)



# --------------------------------------------------------------------------------- initialisation (model.init)
def init_model(init: str, **decoder_kw):
    cfg = tiny_cfg(**decoder_kw)
    cfg.init = init
    torch.manual_seed(0)
    return build_generator(cfg, resolution=32)


def xavier_std(linear) -> float:
    fan_out, fan_in = linear.weight.shape
    return math.sqrt(2 / (fan_in + fan_out))


def assert_close_to(value, expected, rel, what):
    assert abs(value / expected - 1) < rel, f"{what}: {value:.4f}, expected {expected:.4f}"


def generic_linears(model):
    """Linears that neither init names: PiT's compaction, a SwiGLU weight, attention's output projection."""
    block = model.trunk.blocks[0]
    return {"compress": model.decoder.blocks[0].compress, "w1": block.mlp.w1, "attn.proj": block.attn.proj}


def assert_special_inits(model):
    """What both inits share, as the official PixelDiT code sets it: a xavier patch embedding with zero bias,
    N(0, 0.02) class table and timestep-MLP weights, zero AdaLN and output layer, RMSNorm weights of one."""
    trunk, dec = model.trunk, model.decoder
    assert_close_to(trunk.patch_embed.weight.std().item(), xavier_std(trunk.patch_embed), 0.05, "patch embed std")
    assert not trunk.patch_embed.bias.any()
    weights = {"class table": trunk.semantic.y_embed.table.weight, "t mlp 0": trunk.semantic.t_embed.mlp[0].weight,
               "t mlp 2": trunk.semantic.t_embed.mlp[2].weight}
    for what, w in weights.items():
        assert_close_to(w.std().item(), 0.02, 0.15, what)
    zeros = [p for b in trunk.blocks for p in b.adaLN.parameters()]
    zeros += [p for b in dec.blocks for p in b.adaLN.parameters()] + list(dec.final.parameters())
    assert not any(p.any() for p in zeros)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, RMSNorm))


def test_published_init_leaves_pytorchs_default_where_the_official_code_does():
    model = init_model("published")
    assert_special_inits(model)
    for what, linear in generic_linears(model).items():
        # PyTorch's default: weights kaiming-uniform(a=sqrt 5) = U(-b, b), biases U(-b, b), b = 1/sqrt(fan_in)
        bound = linear.weight.shape[1] ** -0.5
        assert linear.weight.abs().max() <= bound, what
        assert_close_to(linear.weight.std().item(), bound / math.sqrt(3), 0.05, f"{what} std")
        if linear.bias is not None:
            assert linear.bias.abs().max() <= bound and linear.bias.std() > bound / 3, f"{what} bias"
    # The timestep MLP's biases keep theirs too (the official code sets only its weights).
    assert model.trunk.semantic.t_embed.mlp[0].bias.std() > 0


def test_pixelgen_init_is_xavier_with_zero_biases():
    model = init_model("pixelgen")
    assert_special_inits(model)
    for what, linear in generic_linears(model).items():
        assert_close_to(linear.weight.std().item(), xavier_std(linear), 0.05, f"{what} std")
        assert linear.bias is None or not linear.bias.any(), f"{what} bias"
    assert not model.trunk.semantic.t_embed.mlp[0].bias.any()


@pytest.mark.parametrize("init", ["pixelgen", "published"])
def test_untrained_generator_predicts_zero_under_either_init(init):
    x, t, y = inputs()
    for kind in ("pit", "mlp", "mixer"):
        out = init_model(init, kind=kind)(x, t, y)
        assert torch.equal(out, torch.zeros_like(out)), kind


@pytest.mark.parametrize("kind", ["dino_student", "semantic_ar"])
def test_published_init_is_refused_where_there_is_no_official_code_to_follow(kind):
    from pixelgen.families import check_model_config

    cfg = ModelConfig(trunk=TrunkConfig(kind=kind, size="tiny", patch_size=16), num_classes=NUM_CLASSES)
    check_model_config(cfg, 32)
    cfg.init = "published"
    with pytest.raises(ValueError, match=rf"'model\.init' = 'published'.*{kind}.*model\.init=pixelgen"):
        check_model_config(cfg, 32)


# ------------------------------------------------------------------------------------ cached position tables
def _outputs(model, x, t, y):
    """A forward, its gradients and a CFG sampling run (the model twice per step), of one model."""
    from pixelgen.diffusion import sample
    from pixelgen.models.config import SamplerConfig

    model.zero_grad()
    out = model(x, t, y)
    out.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    cfg = SamplerConfig(kind="heun", steps=2, cfg_scale=2.0, cfg_interval=(0.0, 1.0))
    # The sampler integrates in fp32: a bf16 model samples under autocast, as the trainer's sample grids do.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
        samples = sample(model, y[:2] % NUM_CLASSES, shape=(3, *x.shape[-2:]), cfg=cfg, num_classes=NUM_CLASSES,
                         generator=torch.Generator().manual_seed(3))
    return [out.detach(), samples, *grads]


@pytest.mark.parametrize("variant", ["pit-compact", "pit-pixel", "mixer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_position_tables_give_bit_identical_forward_gradients_and_samples(variant, dtype, monkeypatch):
    from pixelgen.models import layers

    monkeypatch.setattr(layers, "_TABLES", {})  # a cold cache, filled by the first cached run below
    model = wake_zero_inits(tiny_model(**VARIANTS[variant])).to(dtype)  # bf16: what DeepSpeed's bf16 mode does
    for H, W in [(32, 32), (16, 32)]:  # the trunk's and decoder's grids follow the input
        x, t, y = inputs(H=H, W=W)
        x = x.to(dtype)
        with layers.tables_uncached():  # every table rebuilt per call, as before the cache
            reference = _outputs(model, x, t, y)
        for run in ("cold", "warm"):
            for got, want in zip(_outputs(model, x, t, y), reference, strict=True):
                assert torch.equal(got, want), f"{variant} {dtype} {H}x{W}, {run} cache: output differs from per-call"
    assert layers._TABLES, "nothing was cached"
    assert all(a.dtype == torch.float32 for table in layers._TABLES.values()
               for a in (table if isinstance(table, tuple) else (table,))), "a cached table is not fp32"


def test_position_tables_are_built_once_per_arguments_and_device(monkeypatch):
    from pixelgen.models import layers
    from pixelgen.models.layers import sincos_2d, timestep_frequencies

    monkeypatch.setattr(layers, "_TABLES", {})
    cos, sin = rope_2d(16, 4, 5, device="cpu")
    again = rope_2d(16, 4, 5, device=torch.device("cpu"))
    assert again[0] is cos and again[1] is sin
    assert rope_2d(16, 4, 6)[0] is not cos and rope_2d(16, 4, 5, extent=8.0)[0] is not cos
    assert sincos_2d(8, 3, 4, device="cpu") is sincos_2d(8, 3, 4, device="cpu")
    assert timestep_frequencies(256, 10.0, device="cpu") is timestep_frequencies(256, 10.0, device="cpu")
    with layers.tables_uncached():
        fresh = rope_2d(16, 4, 5)
    assert fresh[0] is not cos and torch.equal(fresh[0], cos) and torch.equal(fresh[1], sin)
    # A table first built where its ops could run differently (autocast, inference mode) is the one built plainly.
    monkeypatch.setattr(layers, "_TABLES", {})
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        primed = rope_2d(16, 4, 5), sincos_2d(8, 3, 4), timestep_frequencies(256, 10.0)
    assert not any(t.is_inference() for t in (*primed[0], primed[1], primed[2]))
    assert all(torch.equal(a, b) for a, b in zip((*primed[0], primed[1], primed[2]), (cos, sin, sincos_2d(8, 3, 4),
                                                                                      timestep_frequencies(256, 10.0))))
    assert primed[0][0] is rope_2d(16, 4, 5)[0]


def test_a_table_first_built_under_inference_mode_serves_training(monkeypatch):
    from pixelgen.models import layers

    monkeypatch.setattr(layers, "_TABLES", {})
    model = wake_zero_inits(tiny_model())
    x, t, y = inputs()
    with torch.inference_mode():  # how the FID stage samples: the first forward fills the cache
        model(x, t, y)
    model(x, t, y).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fake_and_meta_tables_are_never_cached(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from pixelgen.models import layers

    monkeypatch.setattr(layers, "_TABLES", {})
    with FakeTensorMode():  # the memory estimator's trace: a cached real tensor would be rejected here
        fake = rope_2d(16, 4, 5, device="cpu")
    assert isinstance(fake[0], FakeTensor)
    assert rope_2d(16, 4, 5, device="meta")[0].is_meta
    assert not layers._TABLES
    real = rope_2d(16, 4, 5, device="cpu")
    assert not isinstance(real[0], FakeTensor) and not real[0].is_meta
    with FakeTensorMode():
        assert isinstance(rope_2d(16, 4, 5, device="cpu")[0], FakeTensor)  # not the cached real one
    with torch.device("meta"):
        assert rope_2d(16, 4, 5)[0].is_meta


def test_state_dict_holds_no_position_tables():
    model = tiny_model()
    before = {name: tuple(v.shape) for name, v in model.state_dict().items()}
    model(*inputs())
    assert {name: tuple(v.shape) for name, v in model.state_dict().items()} == before
    assert set(before) == {name for name, _ in model.named_parameters()}


# ------------------------------------------------------------------------------------- SDPA kernels on CUDA
def test_the_cuda_kernel_decision_follows_torchs_rules():
    from pixelgen.models.layers import sdpa_cuda_kernel, sdpa_head_dim

    bf16, fp32 = torch.bfloat16, torch.float32
    assert sdpa_cuda_kernel(64, bf16) == "flash" and sdpa_cuda_kernel(256, bf16) == "flash"
    assert sdpa_cuda_kernel(64, bf16, masked=True) == "efficient"  # flash takes no explicit mask
    assert sdpa_cuda_kernel(320, bf16) == "efficient"  # wider than flash's 256
    assert sdpa_cuda_kernel(64, fp32) == "efficient"  # flash is fp16/bf16 only
    assert sdpa_cuda_kernel(4, fp32) == "efficient"  # fp32 needs a multiple of 4
    assert [sdpa_cuda_kernel(d, bf16) for d in (4, 12, 6)] == ["math"] * 3
    assert sdpa_cuda_kernel(6, fp32) == "math"
    assert [sdpa_head_dim(d) for d in (4, 6, 8, 12, 64)] == [8, 8, 8, 16, 64]
    assert all(sdpa_cuda_kernel(sdpa_head_dim(d), bf16) == "flash" for d in range(1, 257))


@pytest.mark.parametrize("kind", ["plain", "causal", "masked"])
def test_zero_padded_heads_give_the_same_attention_and_gradients(kind):
    from pixelgen.models.layers import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3 if kind == "masked" else None
    mask = mask | torch.eye(9, dtype=torch.bool) if mask is not None else None
    outs, grads = [], []
    for pad_to in (None, 8, 16):
        out = sdpa(q, k, v, attn_mask=mask, is_causal=kind == "causal", pad_to=pad_to)
        assert out.shape == q.shape
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.arange(4.0, dtype=out.dtype)).sum(), (q, k, v)))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)
        for a, b in zip(grad, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The scale is the unpadded head's: SDPA's default for the padded width would change the result.
    wrong = torch.nn.functional.scaled_dot_product_attention(
        *(torch.nn.functional.pad(t, (0, 4)) for t in (q, k, v)), attn_mask=mask, is_causal=kind == "causal")
    assert not torch.allclose(wrong[..., :4], outs[0])


def test_causal_attention_without_a_cache_uses_sdpas_own_mask_and_matches_the_explicit_one(monkeypatch):
    from pixelgen.models import layers

    torch.manual_seed(0)
    attn = layers.Attention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    rope = tuple(t.double() for t in rope_2d(8, 1, 7))
    seen = []
    real = layers.sdpa
    monkeypatch.setattr(layers, "sdpa", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    out = attn(x, rope, causal=True)
    assert seen[-1]["is_causal"] and seen[-1]["attn_mask"] is None
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = layers.apply_rope(attn.q_norm(q), *rope), layers.apply_rope(attn.k_norm(k), *rope)
    expected = attn.proj(real(q, k, v, attn_mask=mask).transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Token by token through the cache: the first step is square (is_causal), later ones see all that is cached.
    cache, steps = {}, []
    for i in range(7):
        steps.append(attn(x[:, i:i + 1], tuple(t[i:i + 1] for t in rope), causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), out, rtol=1e-10, atol=1e-10)


def test_the_attention_report_names_heads_the_fused_kernels_do_not_take():
    from pixelgen.models.layers import attention_report

    narrow = tiny_model(kind="pit", attention="pixel", attn_dim=16)  # pixel attention: 4 heads of 4
    lines = attention_report(narrow)
    assert len(lines) == 1 and "4 heads of width 4" in lines[0] and "math kernel" in lines[0]
    assert "padded to 8 for flash attention (2.0x" in lines[0] and "decoder" in lines[0]
    assert attention_report(tiny_model(kind="pit", attention="pixel", attn_dim=32)) == []


# ------------------------------------------------------------------- decoder.norm / activation / dct (DeCo's)
# A seeded tiny generator's output (woken, H=16 x W=32) per decoder variant, computed before these keys existed:
# (sum, sum of |out|, out[0, 0, 0, :3]). Their defaults must leave every decoder computing what it did.
BEFORE_DECODER_OPTIONS = {
    "pit": ({"kind": "pit"}, -447.7592425458133, 1254.1401665695012, [0.118209, -0.359092, 0.042877]),
    "pit-pixel": ({"kind": "pit", "attention": "pixel", "attn_dim": 16}, -73.77666074596345, 1271.7139730416238,
                  [-0.733302, -0.132494, -0.549108]),
    "mlp": ({"kind": "mlp", "depth": 2}, -19.827576231211424, 1339.552950706333, [0.439988, 0.35972, -0.107198]),
    "mlp-factored": ({"kind": "mlp", "adaln": "factored", "mlp_hidden": 8}, -41.03588395193219, 1240.767865728587,
                     [0.202901, -0.495134, -1.019457]),
    "mixer": ({"kind": "mixer"}, 44.83932556025684, 1745.2060863804072, [1.174421, 0.008759, -0.122105]),
}


@pytest.mark.parametrize("variant", list(BEFORE_DECODER_OPTIONS))
def test_the_new_decoder_keys_default_to_what_every_decoder_computed_before(variant):
    from pixelgen.models.decoder import dct_features

    kw, total, total_abs, first = BEFORE_DECODER_OPTIONS[variant]
    model = wake_zero_inits(tiny_model(**kw))
    x, t, y = inputs(H=16, W=32)
    with torch.no_grad():
        out = model(x, t, y).double()
    assert out.sum().item() == pytest.approx(total, rel=1e-6, abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(total_abs, rel=1e-6)
    assert out[0, 0, 0, :3].tolist() == pytest.approx(first, abs=1e-5)
    # The same modules as before: RMSNorms (the final one with its weight), exact-GELU MLPs, the DCT-II table.
    dec = model.decoder
    norms = [m for name, m in dec.named_modules() if name.split(".")[-1].startswith(("norm", "final_norm"))]
    assert norms and all(type(m) is RMSNorm for m in norms)
    assert all(m.act is torch.nn.functional.gelu for m in dec.modules() if type(m).__name__ == "MLP")
    if kw["kind"] == "mlp":
        assert torch.equal(dec.dct_PF, dct_features(4))


def test_decoder_norm_and_activation_apply_to_every_block_kind():
    from pixelgen.models.layers import LayerNorm

    x, t, y = inputs()
    for kind in ("pit", "mlp", "mixer"):
        model = tiny_model(kind=kind, norm="layer", activation="silu")
        assert torch.equal(model(x, t, y), torch.zeros_like(x)), kind  # still zero-initialised at the output
        keys = model.decoder.state_dict()
        assert "final_norm.weight" not in keys and any(k.endswith(("norm.bias", "norm1.bias")) for k in keys), kind  # DeCo's shape
        assert all(type(m) is not RMSNorm for name, m in model.decoder.named_modules() if "norm" in name
                   and ".attn." not in name), kind  # qk-norm stays RMS: it is attention's, not the block's
        assert isinstance(model.decoder.final_norm, LayerNorm)
        mlps = [m for m in model.decoder.modules() if type(m).__name__ == "MLP"]
        assert mlps and all(m.act is torch.nn.functional.silu for m in mlps), kind


@pytest.mark.parametrize("kw,key", [
    ({"kind": "pit", "dct": "deco"}, "model.decoder.dct"),  # only the mlp decoder has in-patch position features
    ({"kind": "mixer", "dct": "deco"}, "model.decoder.dct"),
    ({"kind": "linear", "norm": "layer"}, "model.decoder.norm"),  # JiT's head has one norm of its own
    ({"kind": "linear", "activation": "silu"}, "model.decoder.activation"),
    ({"kind": "mlp", "norm": "batch"}, "model.decoder.norm"),
    ({"kind": "mlp", "dct": "dst"}, "model.decoder.dct"),
])
def test_decoder_options_a_kind_does_not_take_are_refused_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_generator(tiny_cfg(**kw), resolution=32)
