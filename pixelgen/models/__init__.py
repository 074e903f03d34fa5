"""Generator networks and the registry of named sizes.

Build with `pixelgen.families.build_generator(model_cfg, resolution)`: each family (pixelgen/families/) composes
its generator from the pieces here. The patch size is not part of a named size: it stays
with `model.trunk.patch_size` (16 for the ImageNet-256 models, e.g. 4 for 32 px smoke runs).
"""

from dataclasses import dataclass, replace

import torch.nn as nn

from .ar_generator import ARGenerator
from .config import DecoderConfig, Init, ModelConfig, TrunkConfig
from .decoder import ACTIVATIONS, ADALN, ATTENTION, DCTS, KINDS, NORMS, PatchLinearHead, PixelDecoder
from .generator import PixelGenerator, repa_projector
from .teachers import TEACHERS
from .trunk import PatchTrunk, TrunkOutput

DECODER_KINDS = (*KINDS, "linear", "pixel_ar")


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


def check_networks(model_cfg: ModelConfig, trunk: TrunkConfig, dec: DecoderConfig, resolution: int, fail) -> None:
    """The checks every family's networks share (patch grid, head widths, decoder choices); the family's own
    follow (pixelgen.families.check_model_config). `fail(key below model., value, why)` raises."""
    choices = {"decoder.kind": (dec.kind, DECODER_KINDS), "decoder.attention": (dec.attention, ATTENTION),
               "decoder.adaln": (dec.adaln, ADALN), "decoder.norm": (dec.norm, NORMS),
               "decoder.activation": (dec.activation, ACTIVATIONS), "decoder.dct": (dec.dct, DCTS),
               "init": (model_cfg.init, tuple(Init))}
    for key, (value, known) in choices.items():
        if value not in known:
            fail(key, value, f"must be one of {', '.join(known)}")
    if dec.dct != "pixelgen" and dec.kind != "mlp":
        fail("decoder.dct", dec.dct, f"the in-patch position features are the mlp decoder's; the {dec.kind} decoder "
                                     f"has none: leave decoder.dct at pixelgen or set decoder.kind=mlp")
    for key, default in (("norm", "rms"), ("activation", "gelu")):
        if getattr(dec, key) != default and dec.kind not in KINDS:
            fail(f"decoder.{key}", getattr(dec, key), f"the {dec.kind} decoder does not take it (only "
                                                      f"{', '.join(KINDS)} do): leave decoder.{key} at {default}")
    p = trunk.patch_size
    if p <= 0 or resolution % p:
        fail("trunk.patch_size", p, f"must divide data.resolution={resolution} (e.g. {resolution // 8 or 1})")
    # 2D RoPE splits each head into row and column halves of rotary pairs.
    if trunk.dim % trunk.heads or (trunk.dim // trunk.heads) % 4:
        fail("trunk.heads", trunk.heads, f"must divide model.trunk.dim={trunk.dim} into heads of a multiple of 4")
    if dec.kind == "pit":
        width = attention_width(trunk, dec)
        if width % dec.heads or (width // dec.heads) % 4:
            fail("decoder.heads", dec.heads,
                 f"must divide the decoder's attention width {width} (decoder.attn_dim) into heads of a multiple of 4")
    if dec.kind != "mlp" and dec.pixel_dim % 4:
        fail("decoder.pixel_dim", dec.pixel_dim, "must be a multiple of 4 (2D sin-cos pixel positions)")
    if dec.mlp_hidden is not None and dec.mlp_hidden <= 0:
        fail("decoder.mlp_hidden", dec.mlp_hidden, "must be positive (or null for mlp_ratio x pixel_dim)")
    if model_cfg.repa.weight < 0:
        fail("repa.weight", model_cfg.repa.weight, "must be >= 0 (0 = REPA off)")
    if not 0.0 <= model_cfg.class_dropout < 1.0:
        fail("class_dropout", model_cfg.class_dropout, "must be in [0, 1)")


def pixel_decoder(patch_size: int, trunk_cfg: TrunkConfig, dec_cfg: DecoderConfig,
                  init: Init = Init.pixelgen) -> PixelDecoder | PatchLinearHead:
    if dec_cfg.kind == "linear":  # its only width is the trunk's
        return PatchLinearHead(patch_size=patch_size, dim=trunk_cfg.dim)
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
        norm=dec_cfg.norm,
        activation=dec_cfg.activation,
        dct=dec_cfg.dct,
        activation_checkpointing=dec_cfg.activation_checkpointing,
        init=init,
    )


def pixel_generator(model_cfg: ModelConfig, trunk: nn.Module, trunk_cfg: TrunkConfig, dec_cfg: DecoderConfig,
                    resolution: int) -> PixelGenerator:
    """A diffusion trunk's generator: the trunk, a pixel decoder, and REPA's projector when REPA is on."""
    decoder = pixel_decoder(trunk_cfg.patch_size, trunk_cfg, dec_cfg, model_cfg.init)
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
    "check_networks",
    "count_params",
    "pixel_decoder",
    "pixel_generator",
    "resolve_size",
]
