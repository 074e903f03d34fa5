"""Generator networks and the registry of named sizes.

Build with `build_generator(model_cfg, resolution)`. The patch size is not part of a named size: it stays
with `model.trunk.patch_size` (16 for the ImageNet-256 models, e.g. 4 for 32 px smoke runs).
"""

from dataclasses import dataclass, replace

import torch.nn as nn

from .ar_generator import ARGenerator, PatchDiffusionHead
from .config import DecoderConfig, ModelConfig, TrunkConfig
from .decoder import ADALN, ATTENTION, KINDS, PixelDecoder
from .generator import PixelGenerator, repa_projector
from .pixel_ar import CONTEXTS, OUTPUTS, PixelARDecoder
from .semantic_ar import DICTIONARIES, MODES, TARGETS, SemanticAR
from .teachers import TEACHERS
from .trunk import PatchTrunk, TrunkOutput

TRUNK_KINDS = ("pixeldit", "dino_student", "semantic_ar")
DECODER_KINDS = (*KINDS, "pixel_ar")


@dataclass(frozen=True)
class ModelSize:
    dim: int  # trunk width
    depth: int  # trunk (patch-level) blocks
    heads: int  # trunk heads
    pixel_dim: int
    pixel_depth: int  # PiT blocks
    pixel_heads: int  # heads of the decoder's compacted attention


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(dim=64, depth=2, heads=4, pixel_dim=8, pixel_depth=1, pixel_heads=4),  # CPU tests
    "small": ModelSize(dim=384, depth=8, heads=6, pixel_dim=16, pixel_depth=2, pixel_heads=6),  # quick GPU runs
    # PixelDiT paper sizes (pixel dim 16, patch 16); decoder heads = trunk heads as in the official code.
    "B": ModelSize(dim=768, depth=12, heads=12, pixel_dim=16, pixel_depth=2, pixel_heads=12),
    "L": ModelSize(dim=1024, depth=22, heads=16, pixel_dim=16, pixel_depth=4, pixel_heads=16),
    "XL": ModelSize(dim=1152, depth=26, heads=16, pixel_dim=16, pixel_depth=4, pixel_heads=16),
}


def resolve_size(model_cfg: ModelConfig) -> tuple[TrunkConfig, DecoderConfig]:
    """The trunk/decoder configs with `trunk.size`'s dims applied (the input config is left untouched)."""
    trunk, decoder = model_cfg.trunk, model_cfg.decoder
    if trunk.size is None:
        return trunk, decoder
    if trunk.size not in SIZES:
        raise ValueError(f"key 'model.trunk.size' = {trunk.size!r}: unknown size; known sizes: {', '.join(SIZES)}")
    size = SIZES[trunk.size]
    trunk = replace(trunk, dim=size.dim, depth=size.depth, heads=size.heads)
    decoder = replace(decoder, pixel_dim=size.pixel_dim, depth=size.pixel_depth, heads=size.pixel_heads)
    return trunk, decoder


def attention_width(trunk: TrunkConfig, decoder: DecoderConfig) -> int:
    if decoder.attn_dim is not None:
        return decoder.attn_dim
    return trunk.dim if decoder.attention == "compact" else decoder.pixel_dim


def check_model_config(model_cfg: ModelConfig, resolution: int) -> tuple[TrunkConfig, DecoderConfig]:
    """Every cross-field check of the model keys; raises ValueError naming the key. Returns the resolved configs."""
    trunk, dec = resolve_size(model_cfg)

    def fail(key, value, why):
        raise ValueError(f"key 'model.{key}' = {value!r}: {why}")

    choices = {"trunk.kind": (trunk.kind, TRUNK_KINDS), "decoder.kind": (dec.kind, DECODER_KINDS),
               "decoder.attention": (dec.attention, ATTENTION), "decoder.adaln": (dec.adaln, ADALN)}
    for key, (value, known) in choices.items():
        if value not in known:
            fail(key, value, f"must be one of {', '.join(known)}")
    p = trunk.patch_size
    if p <= 0 or resolution % p:
        fail("trunk.patch_size", p, f"must divide data.resolution={resolution} (e.g. {resolution // 8 or 1})")
    if trunk.kind == "dino_student":
        teacher = trunk.student.teacher
        if teacher.name not in TEACHERS or TEACHERS[teacher.name].patch_size != p:
            fail("trunk.student.teacher.name", teacher.name,
                 f"the student needs a /{p} DINO encoder; with patch 16 use vit_small_patch16_dinov3")
        if trunk.student.lora_rank < 0:
            fail("trunk.student.lora_rank", trunk.student.lora_rank, "must be >= 0 (0 = full fine-tuning)")
    if trunk.kind == "semantic_ar":
        _check_ar(model_cfg, trunk, dec, fail)
    elif dec.kind == "pixel_ar":
        fail("decoder.kind", dec.kind, "the pixel AR decoder needs the semantic AR trunk: set model.trunk.kind=semantic_ar")
    # 2D RoPE splits each head into row and column halves of rotary pairs.
    if trunk.dim % trunk.heads or (trunk.dim // trunk.heads) % 4:
        fail("trunk.heads", trunk.heads, f"must divide model.trunk.dim={trunk.dim} into heads of a multiple of 4")
    if dec.kind == "pit":
        width = attention_width(trunk, dec)
        if width % dec.heads or (width // dec.heads) % 4:
            fail("decoder.heads", dec.heads,
                 f"must divide the decoder's attention width {width} (decoder.attn_dim) into heads of a multiple of 4")
    if dec.kind == "pixel_ar" and (dec.pixel_dim % dec.heads or (dec.pixel_dim // dec.heads) % 4):
        fail("decoder.heads", dec.heads,
             f"must divide the pixel AR's width model.decoder.pixel_dim={dec.pixel_dim} into heads of a multiple of 4")
    if dec.kind != "mlp" and dec.pixel_dim % 4:
        fail("decoder.pixel_dim", dec.pixel_dim, "must be a multiple of 4 (2D sin-cos pixel positions)")
    if dec.mlp_hidden is not None and dec.mlp_hidden <= 0:
        fail("decoder.mlp_hidden", dec.mlp_hidden, "must be positive (or null for mlp_ratio x pixel_dim)")
    repa = model_cfg.repa
    if repa.weight < 0:
        fail("repa.weight", repa.weight, "must be >= 0 (0 = REPA off)")
    if repa.weight > 0:
        if repa.teacher.name not in TEACHERS:
            fail("repa.teacher.name", repa.teacher.name, f"must be one of {', '.join(TEACHERS)}")
        if not 1 <= repa.block <= trunk.depth:
            fail("repa.block", repa.block, f"must be a trunk block between 1 and model.trunk.depth={trunk.depth}")
    return trunk, dec


def _check_ar(model_cfg: ModelConfig, trunk: TrunkConfig, dec: DecoderConfig, fail) -> None:
    ar = trunk.ar
    choices = {"trunk.ar.mode": (ar.mode, MODES), "trunk.ar.target": (ar.target, TARGETS),
               "trunk.ar.dictionary": (ar.dictionary, DICTIONARIES),
               "decoder.pixel_ar.output": (dec.pixel_ar.output, OUTPUTS),
               "decoder.pixel_ar.context": (dec.pixel_ar.context, CONTEXTS)}
    for key, (value, known) in choices.items():
        if value not in known:
            fail(key, value, f"must be one of {', '.join(known)}")
    if ar.mode == "discrete" and ar.target != "teacher":
        fail("trunk.ar.target", ar.target, "the discrete mode's dictionary comes from the teacher: use target=teacher")
    if ar.mode == "continuous" and ar.dictionary != "kmeans":
        fail("trunk.ar.dictionary", ar.dictionary, "only the discrete mode has a dictionary: remove the key")
    if ar.mode == "discrete" and ar.dict_size < 2:
        fail("trunk.ar.dict_size", ar.dict_size, "must be at least 2 (the published setting is 4096)")
    if ar.kmeans_images < 1 or ar.kmeans_iters < 1:
        fail("trunk.ar.kmeans_images", ar.kmeans_images, "kmeans_images and kmeans_iters must be positive")
    if ar.z_dim <= 0:
        fail("trunk.ar.z_dim", ar.z_dim, "must be positive")
    if ar.teacher.name not in TEACHERS:
        fail("trunk.ar.teacher.name", ar.teacher.name, f"must be one of {', '.join(TEACHERS)}")
    if dec.pixel_ar.mixtures < 1:
        fail("decoder.pixel_ar.mixtures", dec.pixel_ar.mixtures, "must be at least 1")
    if model_cfg.repa.weight > 0:
        fail("repa.weight", model_cfg.repa.weight, "REPA aligns a diffusion trunk; the semantic AR learns the "
             "teacher's features directly: set model.repa.weight=0")


def z_width(model_cfg: ModelConfig) -> int:
    """The width of the semantic AR's z: the teacher's feature width, or trunk.ar.z_dim without a teacher."""
    ar = model_cfg.trunk.ar
    if ar.mode == "continuous" and ar.target == "end_to_end":
        return ar.z_dim
    return TEACHERS[ar.teacher.name].dim


def _build_ar(model_cfg: ModelConfig, trunk_cfg: TrunkConfig, dec_cfg: DecoderConfig, resolution: int) -> ARGenerator:
    p = trunk_cfg.patch_size
    grid = (resolution // p, resolution // p)
    ar, z_dim = trunk_cfg.ar, z_width(model_cfg)
    trunk = SemanticAR(patch_size=p, grid=grid, dim=trunk_cfg.dim, depth=trunk_cfg.depth, heads=trunk_cfg.heads,
                       mlp_ratio=trunk_cfg.mlp_ratio, num_classes=model_cfg.num_classes, mode=ar.mode,
                       dict_size=ar.dict_size, z_dim=z_dim, learned_dictionary=ar.dictionary == "learned",
                       activation_checkpointing=trunk_cfg.activation_checkpointing)
    if dec_cfg.kind == "pixel_ar":
        decoder = PixelARDecoder(patch_size=p, grid=grid, z_dim=z_dim, dim=dec_cfg.pixel_dim, depth=dec_cfg.depth,
                                 heads=dec_cfg.heads, mlp_ratio=dec_cfg.mlp_ratio, output=dec_cfg.pixel_ar.output,
                                 mixtures=dec_cfg.pixel_ar.mixtures, context=dec_cfg.pixel_ar.context,
                                 activation_checkpointing=dec_cfg.activation_checkpointing)
    else:
        decoder = PatchDiffusionHead(_pixel_decoder(p, trunk_cfg, dec_cfg), z_dim=z_dim, dim=trunk_cfg.dim)
    return ARGenerator(trunk, decoder, num_classes=model_cfg.num_classes, resolution=resolution)


def _pixel_decoder(patch_size: int, trunk_cfg: TrunkConfig, dec_cfg: DecoderConfig) -> PixelDecoder:
    return PixelDecoder(
        kind=dec_cfg.kind,
        patch_size=patch_size,
        cond_dim=trunk_cfg.dim,
        pixel_dim=dec_cfg.pixel_dim,
        depth=dec_cfg.depth,
        heads=dec_cfg.heads,
        attention=dec_cfg.attention,
        attn_dim=attention_width(trunk_cfg, dec_cfg),
        mlp_hidden=dec_cfg.mlp_hidden or int(dec_cfg.mlp_ratio * dec_cfg.pixel_dim),
        adaln=dec_cfg.adaln,
        activation_checkpointing=dec_cfg.activation_checkpointing,
    )


def build_generator(model_cfg: ModelConfig, resolution: int, *,
                    pretrained: bool = True) -> PixelGenerator | ARGenerator:
    """`pretrained=False` skips loading teacher weights into a DINO student (for weights loaded on top)."""
    trunk_cfg, dec_cfg = check_model_config(model_cfg, resolution)
    if trunk_cfg.kind == "semantic_ar":
        return _build_ar(model_cfg, trunk_cfg, dec_cfg, resolution)
    common = dict(dim=trunk_cfg.dim, depth=trunk_cfg.depth, heads=trunk_cfg.heads, mlp_ratio=trunk_cfg.mlp_ratio,
                  num_classes=model_cfg.num_classes, activation_checkpointing=trunk_cfg.activation_checkpointing)
    if trunk_cfg.kind == "pixeldit":
        trunk = PatchTrunk(patch_size=trunk_cfg.patch_size, **common)
    else:
        from .student import DinoStudentTrunk  # imports timm

        trunk = DinoStudentTrunk(student=trunk_cfg.student, pretrained=pretrained, **common)
    decoder = _pixel_decoder(trunk_cfg.patch_size, trunk_cfg, dec_cfg)
    projector, repa_block = None, None
    if model_cfg.repa.weight > 0:
        repa_block = model_cfg.repa.block
        hidden = model_cfg.repa.projector_dim or trunk_cfg.dim
        projector = repa_projector(trunk_cfg.dim, hidden, TEACHERS[model_cfg.repa.teacher.name].dim)
    return PixelGenerator(trunk, decoder, num_classes=model_cfg.num_classes, resolution=resolution,
                          projector=projector, repa_block=repa_block)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ARGenerator",
    "SIZES",
    "TEACHERS",
    "ModelSize",
    "PatchTrunk",
    "PixelDecoder",
    "PixelGenerator",
    "TrunkOutput",
    "build_generator",
    "check_model_config",
    "count_params",
    "z_width",
    "resolve_size",
]
