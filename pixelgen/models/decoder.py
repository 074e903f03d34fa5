"""PixelDiT pixel-level decoder: PiT blocks over per-pixel tokens, conditioned pixel by pixel on the trunk's
per-patch semantic tokens.

Pixel tokens are kept grouped by patch as [B*L, p*p, D_pix] (L patches, row-major), so per-pixel ops are
plain Linears and the global attention runs over L compacted patch tokens instead of H*W pixels.
"""

import torch
import torch.nn as nn
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .layers import MLP, Attention, RMSNorm, init_linear_xavier, modulate, rope_2d, sincos_2d


class PiTBlock(nn.Module):
    def __init__(
        self,
        *,
        pixel_dim: int,
        cond_dim: int,
        patch_size: int,
        attn_dim: int,
        heads: int,
        mlp_ratio: float,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.pixel_dim = pixel_dim
        self.activation_checkpointing = activation_checkpointing
        p2 = patch_size * patch_size
        # Pixel-wise AdaLN: a separate (shift, scale, gate) x 2 for each of the p*p pixels of a patch.
        self.adaLN = nn.Linear(cond_dim, 6 * p2 * pixel_dim)
        self.norm1 = RMSNorm(pixel_dim)
        self.compress = nn.Linear(p2 * pixel_dim, attn_dim)
        self.attn = Attention(attn_dim, heads)
        self.expand = nn.Linear(attn_dim, p2 * pixel_dim)
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = MLP(pixel_dim, mlp_ratio)

    def modulation(self, cond_BLD):
        """(shift1, scale1, gate1, shift2, scale2, gate2), each [B*L, p*p, D_pix]."""
        mod = rearrange(self.adaLN(cond_BLD), "b l (six p2 d) -> six (b l) p2 d", six=6, d=self.pixel_dim)
        return mod.unbind(0)

    def forward(self, x_NPD, cond_BLD, rope):
        # The adaLN output alone is 6*p*p*D_pix floats per patch, so recomputing beats storing it.
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x_NPD, cond_BLD, rope, use_reentrant=False)
        return self._forward(x_NPD, cond_BLD, rope)

    def _forward(self, x_NPD, cond_BLD, rope):  # N = B*L patches, P = p*p pixels
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond_BLD)
        h_BLF = rearrange(modulate(self.norm1(x_NPD), shift1, scale1), "(b l) p d -> b l (p d)", b=cond_BLD.shape[0])
        h_BLF = self.expand(self.attn(self.compress(h_BLF), rope))
        x_NPD = x_NPD + gate1 * rearrange(h_BLF, "b l (p d) -> (b l) p d", d=self.pixel_dim)
        x_NPD = x_NPD + gate2 * self.mlp(modulate(self.norm2(x_NPD), shift2, scale2))
        return x_NPD


class PiTDecoder(nn.Module):
    def __init__(
        self,
        *,
        patch_size: int,
        cond_dim: int,
        pixel_dim: int,
        depth: int,
        heads: int,
        attn_dim: int | None = None,
        mlp_ratio: float = 4.0,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        attn_dim = cond_dim if attn_dim is None else attn_dim
        self.patch_size = patch_size
        self.pixel_dim = pixel_dim
        self.head_dim = attn_dim // heads
        self.pixel_embed = nn.Linear(3, pixel_dim)
        self.blocks = nn.ModuleList(
            [
                PiTBlock(
                    pixel_dim=pixel_dim,
                    cond_dim=cond_dim,
                    patch_size=patch_size,
                    attn_dim=attn_dim,
                    heads=heads,
                    mlp_ratio=mlp_ratio,
                    activation_checkpointing=activation_checkpointing,
                )
                for _ in range(depth)
            ]
        )
        self.final_norm = RMSNorm(pixel_dim)
        self.final = nn.Linear(pixel_dim, 3)
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(init_linear_xavier)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.weight)
            nn.init.zeros_(block.adaLN.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def forward(self, x_BCHW, cond_BLD):
        """x_BCHW: the noisy image; cond_BLD: SiLU(t_emb + s) per patch, from the trunk. Returns [B, 3, H, W]."""
        p = self.patch_size
        B, _, H, W = x_BCHW.shape
        px_BHWD = self.pixel_embed(rearrange(x_BCHW, "b c h w -> b h w c"))
        px_BHWD = px_BHWD + sincos_2d(self.pixel_dim, H, W, device=x_BCHW.device).to(px_BHWD.dtype)
        px_NPD = rearrange(px_BHWD, "b (h p1) (w p2) d -> (b h w) (p1 p2) d", p1=p, p2=p)
        rope = rope_2d(self.head_dim, H // p, W // p, device=x_BCHW.device)
        for block in self.blocks:
            px_NPD = block(px_NPD, cond_BLD, rope)
        out_NPC = self.final(self.final_norm(px_NPD))
        return rearrange(out_NPC, "(b h w) (p1 p2) c -> b c (h p1) (w p2)", b=B, h=H // p, p1=p)
