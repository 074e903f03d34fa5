"""JiT's trunk (Li & He, "Back to Basics: Let Denoising Generative Models Denoise", model_jit.py): a plain ViT on
the noisy pixel patches whose tokens a `linear` decoder turns into the predicted clean image (x-prediction).

What sets it apart from the PixelDiT trunk, each as published:
- a bottleneck patch embedding: p x p x 3 -> `bottleneck` (no bias) -> dim, two linear maps (a p x p conv and a
  1 x 1 conv in the official code, the same arithmetic);
- a fixed 2D sin-cos position embedding added to the patch tokens (MAE's table: the column half first), on top
  of 2D RoPE at integer grid positions (EVA's `VisionRotaryEmbeddingFast`: the row pairs first, as pixelgen's);
- `context_tokens` in-context class tokens (the class embedding plus a learned position each), prepended before
  block `context_start` (0-based) and dropped after the last block; RoPE leaves them unrotated;
- biases in qkv and the SwiGLU, dropout in the middle half of the blocks (H and G), and DiT's timestep
  frequencies (max period 10000, on t in [0, 1]).
The condition c = SiLU(t_emb + y_emb) is the same for every patch; the decoder gets it per patch, broadcast.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .layers import ClassEmbedder, TimestepEmbedder, cached_table, init_linear_xavier, rope_at, run_block, sincos_2d
from .trunk import DiTBlock, TrunkOutput


def jit_rope(head_dim: int, h: int, w: int, context: int, *, device=None):
    """RoPE tables (cos, sin) for `context` unrotated tokens followed by an h x w grid at integer positions."""

    def build():
        rows = torch.arange(h, dtype=torch.float32, device=device)[:, None].expand(h, w).reshape(-1)
        cols = torch.arange(w, dtype=torch.float32, device=device)[None, :].expand(h, w).reshape(-1)
        cos, sin = rope_at(head_dim, rows, cols)
        if context:
            cos = torch.cat([cos.new_ones(context, cos.shape[1]), cos])
            sin = torch.cat([sin.new_zeros(context, sin.shape[1]), sin])
        return cos, sin

    return cached_table(("jit_rope", head_dim, h, w, context), device, build)


def jit_position_embedding(dim: int, h: int, w: int, *, device=None) -> torch.Tensor:
    """[h * w, dim] MAE's fixed 2D sin-cos table as JiT adds it: the column half, then the row half."""
    table = sincos_2d(dim, h, w, device=device)
    return torch.cat([table[..., dim // 2:], table[..., : dim // 2]], dim=-1).reshape(h * w, dim)


class JiTTrunk(nn.Module):
    def __init__(self, *, patch_size: int, dim: int, depth: int, heads: int, mlp_ratio: float, num_classes: int,
                 bottleneck: int, context_tokens: int, context_start: int, dropout: float = 0.0,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.patch_size, self.dim, self.head_dim = patch_size, dim, dim // heads
        self.context_tokens, self.context_start = context_tokens, context_start
        self.activation_checkpointing = activation_checkpointing
        self.embed_in = nn.Linear(3 * patch_size * patch_size, bottleneck, bias=False)
        self.embed_out = nn.Linear(bottleneck, dim)
        self.t_embed = TimestepEmbedder(dim, max_period=10_000.0)
        self.y_embed = ClassEmbedder(num_classes, dim)
        self.context_pos = nn.Parameter(torch.zeros(1, context_tokens, dim))
        middle = range(depth // 4, depth // 4 * 3)  # where JiT-H and G drop out
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, bias=True,
                                              dropout=dropout if i in middle else 0.0) for i in range(depth)])
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(init_linear_xavier)  # JiT's basic init, then its embedding and adaLN-Zero inits
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        nn.init.normal_(self.context_pos, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)

    def forward(self, x_BCHW, t_B, y_B, capture_block: Optional[int] = None) -> TrunkOutput:
        p = self.patch_size
        h, w = x_BCHW.shape[-2] // p, x_BCHW.shape[-1] // p
        patches = rearrange(x_BCHW, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        s_BLD = self.embed_out(self.embed_in(patches))
        s_BLD = s_BLD + jit_position_embedding(self.dim, h, w, device=x_BCHW.device).to(s_BLD.dtype)
        y_BD = self.y_embed(y_B)
        c_BD = F.silu(self.t_embed(t_B) + y_BD)
        context, hidden = 0, None
        for i, block in enumerate(self.blocks):
            if i == self.context_start and self.context_tokens:
                context = self.context_tokens
                s_BLD = torch.cat([y_BD[:, None] + self.context_pos.to(s_BLD.dtype), s_BLD], dim=1)
            rope = jit_rope(self.head_dim, h, w, context, device=x_BCHW.device)
            s_BLD = run_block(block, s_BLD, c_BD, rope, checkpointing=self.activation_checkpointing)
            if i + 1 == capture_block:
                hidden = s_BLD[:, context:]
        tokens = s_BLD[:, context:]
        return TrunkOutput(tokens, c_BD[:, None].expand(-1, tokens.shape[1], -1), hidden)
