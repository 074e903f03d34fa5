"""Generator networks and the registry of named sizes.

Build with `build_generator(model_cfg, resolution)`. The patch size is not part of a named size: it stays
with `model.trunk.patch_size` (16 for the ImageNet-256 models, e.g. 4 for 32 px smoke runs).
"""

from dataclasses import dataclass, replace

import torch.nn as nn

from .config import DecoderConfig, ModelConfig, TrunkConfig
from .decoder import PiTDecoder
from .generator import PixelGenerator
from .trunk import PatchTrunk


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
        raise ValueError(f"unknown model.trunk.size {trunk.size!r}; known sizes: {', '.join(SIZES)}")
    size = SIZES[trunk.size]
    trunk = replace(trunk, dim=size.dim, depth=size.depth, heads=size.heads)
    decoder = replace(decoder, pixel_dim=size.pixel_dim, depth=size.pixel_depth, heads=size.pixel_heads)
    return trunk, decoder


def build_generator(model_cfg: ModelConfig, resolution: int) -> PixelGenerator:
    trunk_cfg, dec_cfg = resolve_size(model_cfg)
    if trunk_cfg.kind != "pixeldit":
        raise ValueError(f"unknown model.trunk.kind {trunk_cfg.kind!r}; known kinds: pixeldit")
    if dec_cfg.kind != "pit":
        raise ValueError(f"unknown model.decoder.kind {dec_cfg.kind!r}; known kinds: pit")
    if resolution % trunk_cfg.patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of model.trunk.patch_size={trunk_cfg.patch_size}")
    # 2D RoPE splits each head into row and column halves of rotary pairs.
    attn_dim = trunk_cfg.dim if dec_cfg.attn_dim is None else dec_cfg.attn_dim
    heads_by_dim = {"model.trunk": (trunk_cfg.dim, trunk_cfg.heads), "model.decoder": (attn_dim, dec_cfg.heads)}
    for where, (dim, heads) in heads_by_dim.items():
        if dim % heads or (dim // heads) % 4:
            raise ValueError(f"{where}: attention dim {dim} / heads {heads} must give a head dim divisible by 4")
    trunk = PatchTrunk(
        patch_size=trunk_cfg.patch_size,
        dim=trunk_cfg.dim,
        depth=trunk_cfg.depth,
        heads=trunk_cfg.heads,
        mlp_ratio=trunk_cfg.mlp_ratio,
        num_classes=model_cfg.num_classes,
    )
    decoder = PiTDecoder(
        patch_size=trunk_cfg.patch_size,
        cond_dim=trunk_cfg.dim,
        pixel_dim=dec_cfg.pixel_dim,
        depth=dec_cfg.depth,
        heads=dec_cfg.heads,
        attn_dim=attn_dim,
        mlp_ratio=dec_cfg.mlp_ratio,
        activation_checkpointing=dec_cfg.activation_checkpointing,
    )
    return PixelGenerator(trunk, decoder, num_classes=model_cfg.num_classes, resolution=resolution)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "SIZES",
    "ModelSize",
    "PatchTrunk",
    "PiTDecoder",
    "PixelGenerator",
    "build_generator",
    "count_params",
    "resolve_size",
]
