import copy
import re

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelgen.models.config import StudentConfig, TeacherConfig
from pixelgen.models.lora import add_lora
from pixelgen.models.student import DinoStudentTrunk, eva_patch_tokens
from pixelgen.models.teachers import DinoTeacher, create_dino, dino_normalize, load_dino_weights, neg_cosine
from tests.test_models import wake_zero_inits

V2 = "vit_base_patch14_dinov2"
V3 = "vit_small_patch16_dinov3"
DEPTH = 2


def random_cfg(name):
    return TeacherConfig(name=name, allow_random_init=True, depth=DEPTH)


def file_cfg(name, path):
    return TeacherConfig(name=name, weights=str(path), depth=DEPTH)


def random_dino(name, seed):
    """A random teacher with its LayerScales at 1, as in trained DINOs, rather than timm's 1e-5 init, under which the
    blocks barely change the tokens and the tests below could not see what happens inside them."""
    torch.manual_seed(seed)
    model = create_dino(random_cfg(name))
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith(("gamma", "gamma_1", "gamma_2")):
                p.fill_(1.0)
    return model


def images(B=2, H=32, W=48, seed=1):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """timm-format .safetensors files of random depth-2 teachers."""
    folder = tmp_path_factory.mktemp("dino")
    files = {}
    for seed, name in enumerate((V2, V3)):
        files[name] = folder / f"{name}.safetensors"
        safetensors.torch.save_file(random_dino(name, seed).state_dict(), str(files[name]))
    return files


def to_meta_dinov2(sd):
    """Inverse of timm's _convert_dinov2 for DINOv2 without registers: Meta's file also holds iBOT's mask token,
    which is how timm's checkpoint_filter_fn recognises it; the other keys are timm's."""
    return {**sd, "mask_token": torch.randn(1, sd["cls_token"].shape[-1])}


def to_meta_dinov3(sd):
    """Inverse of the DINOv3 branch of timm's eva.checkpoint_filter_fn: Meta's names for registers and LayerScale,
    the mask token, the saved RoPE periods, and a qkv bias whose k part is masked out by bias_mask."""
    rename = {"reg_token": "storage_tokens", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
    out = {}
    for k, v in sd.items():
        for timm_name, meta_name in rename.items():
            k = k.replace(timm_name, meta_name)
        out[k] = v
    dim = sd["cls_token"].shape[-1]
    out["mask_token"] = torch.randn(1, dim)
    out["rope_embed.periods"] = torch.rand(16)
    for i in range(DEPTH):
        bias, mask = torch.zeros(3 * dim), torch.ones(3 * dim)
        bias[dim:2 * dim], mask[dim:2 * dim] = torch.randn(dim), 0.0
        out[f"blocks.{i}.attn.qkv.bias"], out[f"blocks.{i}.attn.qkv.bias_mask"] = bias, mask
    return out


# --- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [V2, V3])
def test_safetensors_weights_load_bit_exact(weights, name):
    saved = safetensors.torch.load_file(str(weights[name]))
    torch.manual_seed(123)
    fresh = create_dino(random_cfg(name)).state_dict()
    torch.manual_seed(123)
    loaded = create_dino(file_cfg(name, weights[name])).state_dict()
    assert loaded.keys() == saved.keys()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("name, to_meta, H", [(V2, to_meta_dinov2, 28), (V3, to_meta_dinov3, 32)])
def test_original_release_checkpoint_loads_and_matches(weights, tmp_path, name, to_meta, H):
    timm_model = create_dino(file_cfg(name, weights[name]))
    meta_file = tmp_path / "meta.pth"
    torch.save(to_meta(timm_model.state_dict()), meta_file)
    converted = create_dino(file_cfg(name, meta_file))
    for k, v in timm_model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    x = images(H=H, W=H)
    with torch.no_grad():
        assert torch.equal(converted.forward_features(x), timm_model.forward_features(x))


def test_missing_and_unknown_teachers_are_named():
    with pytest.raises(ValueError, match=r"teacher\.weights.*vit_small_patch16_dinov3.*allow_random_init"):
        create_dino(TeacherConfig(name=V3, depth=DEPTH))
    with pytest.raises(FileNotFoundError, match="/no/such/dino.safetensors"):
        create_dino(TeacherConfig(name=V3, weights="/no/such/dino.safetensors", depth=DEPTH))
    with pytest.raises(ValueError, match=r"teacher\.name 'vit_tiny_dinov9'.*vit_base_patch14_dinov2"):
        create_dino(TeacherConfig(name="vit_tiny_dinov9", allow_random_init=True))
    # pretrained=False (a model whose weights are loaded on top afterwards) needs no file.
    assert create_dino(TeacherConfig(name=V3, depth=DEPTH), pretrained=False).embed_dim == 384


def test_bad_weights_files_are_named(weights, tmp_path):
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights[V3]))}.*missing keys"):
        create_dino(file_cfg(V2, weights[V3]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights[V2]))}.*missing keys"):
        create_dino(file_cfg(V3, weights[V2]))
    for suffix in (".safetensors", ".pth"):
        corrupt = tmp_path / f"corrupt{suffix}"
        corrupt.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=f"cannot read teacher weights {re.escape(str(corrupt))}"):
            create_dino(file_cfg(V3, corrupt))
    # A nonzero q/v bias that timm's DINOv3-S has no parameter for is refused, not dropped.
    meta = to_meta_dinov3(safetensors.torch.load_file(str(weights[V3])))
    meta["blocks.1.attn.qkv.bias"][0] = 0.5
    biased = tmp_path / "biased.pth"
    torch.save(meta, biased)
    with pytest.raises(ValueError, match=rf"{re.escape(str(biased))}.*nonzero qkv biases"):
        create_dino(file_cfg(V3, biased))
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        load_dino_weights(random_dino(V3, 0), tmp_path / "gone.pth")


# --- the frozen teacher ----------------------------------------------------------------------------------------

def test_teacher_is_frozen_and_stays_in_eval(weights):
    teacher = DinoTeacher(create_dino(file_cfg(V2, weights[V2])))
    owner = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(3, teacher.dim)})
    owner.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = images(H=64, W=64).requires_grad_(True)
    pred_BLD = owner["head"](F.avg_pool2d(x, 16).flatten(2).transpose(1, 2))  # [B, 16, D], from a trainable input
    neg_cosine(pred_BLD, teacher(x, (4, 4))).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name, size, grid, resized", [
    (V2, (64, 64), (4, 4), 56),  # REPA-style: /14 teacher, image resized so its grid is the generator's
    (V3, (64, 64), (2, 2), 32),
    (V3, (32, 48), (2, 3), None),  # /16 on a /16 grid: no resize
])
def test_teacher_tokens_follow_the_generator_grid(weights, name, size, grid, resized):
    teacher = DinoTeacher(create_dino(file_cfg(name, weights[name])))
    x = images(H=size[0], W=size[1])
    tokens = teacher(x, grid)
    assert tokens.shape == (2, grid[0] * grid[1], teacher.dim)
    # [-1, 1] -> [0, 1] -> ImageNet mean/std, bicubic resize, patch tokens after the prefix tokens.
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected_in = ((x + 1) / 2 - mean[:, None, None]) / std[:, None, None]
    if resized:
        expected_in = F.interpolate(expected_in, size=(resized, resized), mode="bicubic")
    with torch.no_grad():
        expected = teacher.encoder.forward_features(expected_in)[:, teacher.encoder.num_prefix_tokens:]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)


def test_neg_cosine_known_values():
    a = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert neg_cosine(a, a).abs() < 1e-6
    assert (neg_cosine(a, -a) - 2).abs() < 1e-6
    assert neg_cosine(a, 3.5 * a).abs() < 1e-6  # scale-invariant
    e = torch.eye(8)
    assert (neg_cosine(e[None, :4], e[None, 4:]) - 1).abs() < 1e-6  # orthogonal
    half = torch.cat([a[:, :2], -a[:, 2:4]], dim=1)  # mean over tokens: two aligned, two opposite
    assert (neg_cosine(a[:, :4], half) - 1).abs() < 1e-6
    loss = neg_cosine(a.bfloat16(), a.bfloat16())
    assert loss.dtype == torch.float32 and loss.abs() < 1e-6


# --- LoRA ------------------------------------------------------------------------------------------------------

def test_lora_starts_as_identity_trains_only_adapters():
    encoder = random_dino(V3, 0)
    x = images(B=1, H=32, W=32)
    with torch.no_grad():
        before = encoder.forward_features(x)
    wrapped = add_lora(encoder, rank=4)
    assert sorted(wrapped) == sorted(f"blocks.{i}.{n}" for i in range(DEPTH)
                                     for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), before)
    trainable = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(wrapped) and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    target = torch.randn_like(before)
    loss = (encoder.forward_features(x) - target).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = encoder.forward_features(x)
    assert (after - target).square().mean() < loss
    assert not torch.allclose(after, before, atol=1e-4)


def test_lora_math_and_saved_names_are_the_format():
    """The exported weights name the adapters `<linear>.lora_A` [rank, in] and `<linear>.lora_B` [out, rank] beside
    `<linear>.base.*`, and the update is base(x) + B A x (scale alpha / rank = 1): what peft's LoRA computes too,
    under other names (docs/architecture.md says why this stays hand-written)."""
    encoder = random_dino(V3, 0)
    add_lora(encoder, rank=4)
    qkv = encoder.blocks[0].attn.qkv
    shapes = {n: tuple(v.shape) for n, v in encoder.state_dict().items() if n.startswith("blocks.0.attn.qkv.")}
    dim = encoder.embed_dim
    assert shapes == {"blocks.0.attn.qkv.base.weight": (3 * dim, dim), "blocks.0.attn.qkv.lora_A": (4, dim),
                      "blocks.0.attn.qkv.lora_B": (3 * dim, 4)}
    assert isinstance(encoder.patch_embed.proj, nn.Conv2d), "the patch embedding's conv (also named proj) got LoRA"
    with pytest.raises(AttributeError):
        qkv.weight  # code reading the weight directly would skip the adapter: it must fail instead
    with torch.no_grad():
        qkv.lora_B.normal_()
    x = torch.randn(3, dim)
    torch.testing.assert_close(qkv(x), qkv.base(x) + (x @ qkv.lora_A.T) @ qkv.lora_B.T, rtol=1e-5, atol=1e-5)


# --- the DINO student ------------------------------------------------------------------------------------------

def make_student(weights_file, lora_rank=0, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = StudentConfig(teacher=file_cfg(V3, weights_file), lora_rank=lora_rank)
    return DinoStudentTrunk(student=cfg, dim=64, depth=2, heads=4, mlp_ratio=2.0, num_classes=10, **kw)


def test_encoder_forward_reproduces_timm_exactly(weights):
    encoder = create_dino(file_cfg(V3, weights[V3]))
    x = dino_normalize(images())
    with torch.no_grad():
        expected = encoder.forward_features(x)[:, encoder.num_prefix_tokens:]
        assert torch.equal(eva_patch_tokens(encoder, x), expected)
    assert torch.equal(eva_patch_tokens(encoder, x, checkpointing=True), expected)


def test_time_token_is_an_unrotated_prefix_token(weights):
    """The student's forward equals timm's own prefix-token handling (6 prefix tokens on a copy of the encoder);
    rotating the time token like a patch instead gives a different result, so the comparison can tell."""
    student = make_student(weights[V3])
    x = dino_normalize(images())
    t_BD = student.t_token(torch.tensor([0.2, 0.9]))
    reference = copy.deepcopy(student.encoder)
    for block in reference.blocks:
        block.attn.num_prefix_tokens = 6

    def run(encoder, rope_fn):
        tokens, rope = encoder._pos_embed(encoder.patch_embed(x))
        tokens = torch.cat([tokens[:, :5], t_BD[:, None], tokens[:, 5:]], dim=1)
        rope = rope_fn(rope)
        for block in encoder.blocks:
            tokens = block(tokens, rope=rope)
        return encoder.norm(tokens)[:, 6:]

    with torch.no_grad():
        got = eva_patch_tokens(student.encoder, x, t_BD)
        torch.testing.assert_close(got, run(reference, lambda rope: rope), rtol=0, atol=1e-6)
        rotated_like_first_patch = run(student.encoder, lambda rope: torch.cat([rope[:1], rope]))
        assert not torch.allclose(got, rotated_like_first_patch, atol=1e-4)


def test_student_starts_as_the_teacher_and_reads_t(weights):
    student = make_student(weights[V3])
    teacher = DinoTeacher(create_dino(file_cfg(V3, weights[V3])))
    for k, v in teacher.encoder.state_dict().items():
        assert torch.equal(student.encoder.state_dict()[k], v), k
    x = images()
    y = torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(eva_patch_tokens(student.encoder, dino_normalize(x)), teacher(x, (2, 3)))
        a = student(x, torch.tensor([0.1, 0.1]), y)
        b = student(x, torch.tensor([0.8, 0.8]), y)
    assert not torch.allclose(a.student, b.student) and not torch.allclose(a.cond, b.cond)


def test_student_shapes_and_capture_block(weights):
    student = make_student(weights[V3])
    x, t, y = images(), torch.tensor([0.3, 0.7]), torch.tensor([0, 3])
    captured = {}
    student.semantic.blocks[0].register_forward_hook(lambda m, i, out: captured.setdefault("b1", out))
    with torch.no_grad():
        out = student(x, t, y, capture_block=1)
        plain = student(x, t, y)
    assert out.tokens.shape == out.cond.shape == out.hidden.shape == (2, 6, 64)
    assert out.student.shape == (2, 6, 384)
    assert torch.equal(out.hidden, captured["b1"]) and plain.hidden is None
    assert torch.equal(out.tokens, plain.tokens)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_student_gradients_reach_trainables_not_the_teacher(weights, lora_rank):
    student = make_student(weights[V3], lora_rank=lora_rank, activation_checkpointing=True)
    with torch.no_grad():
        wake_zero_inits(student)
    teacher = DinoTeacher(create_dino(file_cfg(V3, weights[V3])))
    x0 = images()
    x_t = 0.5 * x0 + 0.5 * torch.randn_like(x0)
    out = student(x_t, torch.tensor([0.5, 0.5]), torch.tensor([2, 10]))
    (neg_cosine(out.student, teacher(x0, (2, 3))) + out.cond.square().mean()).backward()
    for name, p in student.named_parameters():
        in_encoder_base = name.startswith("encoder.") and "lora_" not in name
        if lora_rank and in_encoder_base:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    if lora_rank:
        assert any("lora_" in n for n, _ in student.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_alignment_losses_on_known_features(weights):
    from pixelgen.alignment import AlignmentLosses
    from pixelgen.models.config import ModelConfig, RepaConfig, TrunkConfig

    cfg = ModelConfig(trunk=TrunkConfig(patch_size=8, dim=32, depth=2, heads=2), num_classes=4,
                      repa=RepaConfig(weight=0.5, block=1,
                                      teacher=file_cfg("vit_base_patch14_dinov2", weights["vit_base_patch14_dinov2"])))
    align = AlignmentLosses(cfg, resolution=32, device="cpu")
    x0 = images(B=2, H=32, W=32)
    target = DinoTeacher(create_dino(cfg.repa.teacher))(x0, (4, 4))  # the same weights, built independently
    assert target.shape == (2, 16, 768)
    for features, expected in [(target, 0.0), (-target, 2.0), (3.0 * target, 0.0)]:
        (weight, loss), = align({"repa": features}, x0).values()
        assert weight == 0.5 and loss.item() == pytest.approx(expected, abs=1e-5)
    # No REPA weight and no student trunk: nothing to align, so no teacher is built.
    assert not AlignmentLosses(ModelConfig(trunk=TrunkConfig(patch_size=8)), resolution=32, device="cpu")
