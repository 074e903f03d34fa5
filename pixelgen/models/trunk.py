"""PixelDiT patch-level trunk: a DiT over p x p pixel patches that produces one semantic token per patch."""

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import Init
from .layers import (
    Attention,
    ClassEmbedder,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    init_linear_xavier,
    init_linears,
    modulate,
    rope_2d,
    run_block,
)


class TrunkOutput(NamedTuple):
    tokens: torch.Tensor  # s_BLD: one semantic token per patch, row-major patch order
    cond: torch.Tensor  # SiLU(t_emb + s) per patch: the pixel-level decoder's condition
    hidden: Optional[torch.Tensor] = None  # the output of block `capture_block` (1-indexed), for REPA
    student: Optional[torch.Tensor] = None  # dino_student only: the encoder's patch tokens, for its alignment loss


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (shift/scale/gate for attention and MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=bias, dropout=dropout)  # bias, dropout: JiT's
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio, bias=bias, dropout=dropout)
        # A bare Linear: the trunk's condition is already SiLU'd.
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x_BLD, c_BD, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c_BD)[:, None].chunk(6, dim=-1)
        x_BLD = x_BLD + gate1 * self.attn(modulate(self.norm1(x_BLD), shift1, scale1), rope)
        x_BLD = x_BLD + gate2 * self.mlp(modulate(self.norm2(x_BLD), shift2, scale2))
        return x_BLD


class SemanticBlocks(nn.Module):
    """`depth` DiT blocks over patch tokens, conditioned on c = SiLU(t_emb + y_emb); owns the t and y embedders,
    so freezing a trunk freezes all conditioning. Shared by every trunk kind."""

    def __init__(self, *, dim: int, depth: int, heads: int, mlp_ratio: float, num_classes: int,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.dim = dim
        self.head_dim = dim // heads
        self.activation_checkpointing = activation_checkpointing
        self.t_embed = TimestepEmbedder(dim)
        self.y_embed = ClassEmbedder(num_classes, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio) for _ in range(depth)])

    def initialize_weights(self, init: Init = Init.pixelgen):
        init_linears(self, init)  # then DiT's embedding and adaLN-Zero inits, which PixelDiT's code shares
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)

    def forward(self, s_BLD, t_B, y_B, grid: tuple[int, int], capture_block: Optional[int] = None):
        """Returns (tokens, cond, hidden after block `capture_block` or None)."""
        t_BD = self.t_embed(t_B)
        c_BD = F.silu(t_BD + self.y_embed(y_B))
        rope = rope_2d(self.head_dim, *grid, device=s_BLD.device)
        hidden = None
        for i, block in enumerate(self.blocks, start=1):
            s_BLD = run_block(block, s_BLD, c_BD, rope, checkpointing=self.activation_checkpointing)
            if i == capture_block:
                hidden = s_BLD
        return s_BLD, F.silu(t_BD[:, None] + s_BLD), hidden


class PatchTrunk(nn.Module):
    """Embeds p x p patches linearly (no absolute position embedding: 2D RoPE inside attention) and runs the
    semantic DiT blocks over them."""

    def __init__(self, *, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float, num_classes: int,
                 activation_checkpointing: bool = False, init: Init = Init.pixelgen):
        super().__init__()
        self.patch_size = patch_size
        self.dim = dim
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, dim)
        self.semantic = SemanticBlocks(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                       num_classes=num_classes, activation_checkpointing=activation_checkpointing)
        self.initialize_weights(init)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.semantic.blocks

    def initialize_weights(self, init: Init = Init.pixelgen):
        init_linear_xavier(self.patch_embed)  # either init: the official PixelDiT code's is xavier too
        self.semantic.initialize_weights(init)

    def forward(self, x_BCHW, t_B, y_B, capture_block: Optional[int] = None) -> TrunkOutput:
        p = self.patch_size
        h, w = x_BCHW.shape[-2] // p, x_BCHW.shape[-1] // p
        patches = rearrange(x_BCHW, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        tokens, cond, hidden = self.semantic(self.patch_embed(patches), t_B, y_B, (h, w), capture_block)
        return TrunkOutput(tokens, cond, hidden)
