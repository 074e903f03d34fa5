"""Pixel-level decoders: produce the pixels of each patch from the noisy image and the trunk's per-patch
condition. One decoder class, three block kinds (the design space of the research posts):

- pit: PixelDiT's PiT blocks. AdaLN, attention (`compact`: the p*p pixel tokens of a patch compressed to one
  token and attended across all patches, as published; `pixel`: attention among the pixels of each patch at
  its own width), then a per-pixel MLP.
- mlp: attention-free per-pixel MLP blocks with in-patch DCT position features (DeCo-like; with norm layer,
  activation silu, dct deco and adaln factored, DeCo's decoder exactly: pixelgen.models.official.deco).
- mixer: MLP-mixer blocks: a token-mixing MLP across the pixels of a patch, then a per-pixel MLP.

Pixel tokens stay grouped by patch as [N, P, D] (N = B*L patches in row-major order, P = p*p pixels), so
per-pixel ops are plain Linears. Every kind zero-initialises its modulation and output layer, so the untrained
decoder predicts exactly zero, and every kind can recompute its blocks in backward (activation checkpointing).
The blocks' norms (`norm`) and MLP activation (`activation`) are one choice for every kind.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import ActivationKind, AdaLNKind, AttentionKind, DCTKind, DecoderKind, Init, NormKind
from .layers import MLP, Attention, RMSNorm, init_linears, make_norm, modulate, rope_2d, run_block, sincos_2d

# PixelDecoder's; linear (PatchLinearHead) and pixel_ar are their own
KINDS = tuple(k for k in DecoderKind if k not in (DecoderKind.pixel_ar, DecoderKind.linear))
ATTENTION, ADALN = tuple(AttentionKind), tuple(AdaLNKind)
NORMS, ACTIVATIONS, DCTS = tuple(NormKind), tuple(ActivationKind), tuple(DCTKind)


class PixelAdaLN(nn.Module):
    """`n` modulation tensors (shifts, scales, gates) for the pixels of every patch, each [N, P or 1, D].

    pixel: Linear(cond -> n*P*D) on the patch token, a different vector for every pixel (PixelDiT; costs
    cond_dim*n*P*D parameters per block, 28M for XL). patch: Linear(cond -> n*D), one vector shared by the
    patch's pixels. factored: Linear(D -> n*D) on a per-pixel condition the decoder embeds once (DeCo).
    """

    def __init__(self, mode: str, *, cond_dim: int, pixel_dim: int, pixels: int, n: int):
        super().__init__()
        self.mode, self.n, self.pixel_dim = mode, n, pixel_dim
        in_dim = pixel_dim if mode == "factored" else cond_dim
        out_dim = n * pixel_dim * (pixels if mode == "pixel" else 1)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, cond):
        """cond: [B, L, cond_dim] (pixel, patch) or the decoder's per-pixel condition [N, P, D] (factored)."""
        out = self.linear(cond)
        if self.mode == "pixel":
            return rearrange(out, "b l (n p d) -> n (b l) p d", n=self.n, d=self.pixel_dim).unbind(0)
        if self.mode == "patch":
            return rearrange(out, "b l (n d) -> n (b l) 1 d", n=self.n).unbind(0)
        return rearrange(out, "N p (n d) -> n N p d", n=self.n).unbind(0)


class PiTBlock(nn.Module):
    def __init__(self, *, pixel_dim, pixels, attention, attn_dim, heads, mlp_hidden, adaln_mode, cond_dim, norm,
                 activation):
        super().__init__()
        self.attention = attention
        self.adaLN = PixelAdaLN(adaln_mode, cond_dim=cond_dim, pixel_dim=pixel_dim, pixels=pixels, n=6)
        self.norm1 = make_norm(norm, pixel_dim)
        if attention == "compact":
            self.compress = nn.Linear(pixels * pixel_dim, attn_dim)
            self.attn = Attention(attn_dim, heads)
            self.expand = nn.Linear(attn_dim, pixels * pixel_dim)
        else:
            self.attn = Attention(attn_dim, heads, io_dim=pixel_dim)
        self.norm2 = make_norm(norm, pixel_dim)
        self.mlp = MLP(pixel_dim, mlp_hidden, activation)

    def forward(self, x_NPD, cond, rope, batch: int):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond)
        h_NPD = modulate(self.norm1(x_NPD), shift1, scale1)
        if self.attention == "compact":  # one token per patch, attention across the L patches of an image
            h_BLF = self.compress(rearrange(h_NPD, "(b l) p d -> b l (p d)", b=batch))
            h_NPD = rearrange(self.expand(self.attn(h_BLF, rope)), "b l (p d) -> (b l) p d", p=x_NPD.shape[1])
        else:  # the P pixels of each patch attend to each other
            h_NPD = self.attn(h_NPD, rope)
        x_NPD = x_NPD + gate1 * h_NPD
        return x_NPD + gate2 * self.mlp(modulate(self.norm2(x_NPD), shift2, scale2))


class MLPBlock(nn.Module):
    """DeCo's ResBlock: AdaLN, a per-pixel MLP, a gated residual; no interaction between pixels."""

    def __init__(self, *, pixel_dim, pixels, mlp_hidden, adaln_mode, cond_dim, norm, activation):
        super().__init__()
        self.adaLN = PixelAdaLN(adaln_mode, cond_dim=cond_dim, pixel_dim=pixel_dim, pixels=pixels, n=3)
        self.norm = make_norm(norm, pixel_dim)
        self.mlp = MLP(pixel_dim, mlp_hidden, activation)

    def forward(self, x_NPD, cond, rope, batch: int):
        shift, scale, gate = self.adaLN(cond)
        return x_NPD + gate * self.mlp(modulate(self.norm(x_NPD), shift, scale))


class MixerBlock(nn.Module):
    """MLP-mixer over the pixels of a patch: the token MLP mixes pixels (per channel), the channel MLP mixes
    features (per pixel); both AdaLN-modulated and gated."""

    def __init__(self, *, pixel_dim, pixels, mlp_hidden, token_hidden, adaln_mode, cond_dim, norm, activation):
        super().__init__()
        self.adaLN = PixelAdaLN(adaln_mode, cond_dim=cond_dim, pixel_dim=pixel_dim, pixels=pixels, n=6)
        self.norm1 = make_norm(norm, pixel_dim)
        self.token_mlp = MLP(pixels, token_hidden, activation)
        self.norm2 = make_norm(norm, pixel_dim)
        self.mlp = MLP(pixel_dim, mlp_hidden, activation)

    def forward(self, x_NPD, cond, rope, batch: int):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond)
        h_NDP = rearrange(modulate(self.norm1(x_NPD), shift1, scale1), "n p d -> n d p")
        x_NPD = x_NPD + gate1 * rearrange(self.token_mlp(h_NDP), "n d p -> n p d")
        return x_NPD + gate2 * self.mlp(modulate(self.norm2(x_NPD), shift2, scale2))


def dct_features(patch_size: int, max_freq: int = 8) -> torch.Tensor:
    """[p*p, f*f] 2D DCT-II basis values at each pixel of a patch (f = min(p, max_freq)): pixelgen's in-patch
    position features after DeCo's idea, smooth at low frequency so neighbouring pixels get similar codes."""
    f = min(patch_size, max_freq)
    pos = torch.arange(patch_size, dtype=torch.float32)
    basis_PF = torch.cos(math.pi * (2 * pos[:, None] + 1) * torch.arange(f)[None] / (2 * patch_size))
    return rearrange(basis_PF[:, None, :, None] * basis_PF[None, :, None, :], "i j u v -> (i j) (u v)")


def deco_features(patch_size: int, freqs: int = 8) -> torch.Tensor:
    """[p*p, freqs^2] DeCo's in-patch position features, for its checkpoints: not a DCT basis (the frequencies
    linspace(0, freqs, freqs) are not integers, the positions linspace(0, 1, p) include the patch's edges), and
    damped by 1 / (1 + f_a f_b). Feature a * freqs + b of pixel (i, j) takes frequency f_a along the column
    position x_j and f_b along the row position y_i, where dct_features puts the row first."""
    f = torch.linspace(0, freqs, freqs)
    cos_PF = torch.cos(torch.linspace(0, 1, patch_size)[:, None] * f[None] * math.pi)  # [position, frequency]
    table_ijab = cos_PF[None, :, :, None] * cos_PF[:, None, None, :] / (1 + f[:, None] * f[None, :])
    return rearrange(table_ijab, "i j a b -> (i j) (a b)")


POSITION_FEATURES = {"pixelgen": dct_features, "deco": deco_features}


class PixelDecoder(nn.Module):
    def __init__(self, *, kind: str, patch_size: int, cond_dim: int, pixel_dim: int, depth: int, heads: int,
                 attention: str, attn_dim: int, mlp_hidden: int, adaln: str, norm: str = NormKind.rms,
                 activation: str = ActivationKind.gelu, dct: str = DCTKind.pixelgen,
                 activation_checkpointing: bool = False, init: Init = Init.pixelgen):
        super().__init__()
        self.kind, self.attention, self.adaln = kind, attention, adaln
        self.patch_size = patch_size
        self.pixel_dim = pixel_dim
        self.head_dim = attn_dim // heads
        self.activation_checkpointing = activation_checkpointing
        pixels = patch_size * patch_size
        if kind == "mlp":
            self.register_buffer("dct_PF", POSITION_FEATURES[dct](patch_size), persistent=False)
            self.pixel_embed = nn.Linear(3 + self.dct_PF.shape[1], pixel_dim)
        else:
            self.pixel_embed = nn.Linear(3, pixel_dim)  # plus a fixed 2D sin-cos over the whole image
        if adaln == "factored":
            self.cond_embed = nn.Linear(cond_dim, pixels * pixel_dim)
        common = dict(pixel_dim=pixel_dim, pixels=pixels, mlp_hidden=mlp_hidden, adaln_mode=adaln, cond_dim=cond_dim,
                      norm=norm, activation=activation)
        if kind == "pit":
            blocks = [PiTBlock(attention=attention, attn_dim=attn_dim, heads=heads, **common) for _ in range(depth)]
        elif kind == "mlp":
            blocks = [MLPBlock(**common) for _ in range(depth)]
        else:
            # The token MLP stays as wide as the patch (P -> P -> P); the width knobs act on the channel MLP.
            blocks = [MixerBlock(token_hidden=pixels, **common) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = make_norm(norm, pixel_dim, before_output=True)
        self.final = nn.Linear(pixel_dim, 3)
        self.initialize_weights(init)

    def initialize_weights(self, init: Init = Init.pixelgen):
        init_linears(self, init)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN.linear.weight)
            nn.init.zeros_(block.adaLN.linear.bias)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def embed(self, x_BCHW):
        """Per-pixel tokens [N, P, D] of the noisy image."""
        p = self.patch_size
        B, _, H, W = x_BCHW.shape
        if self.kind == "mlp":
            px_NPC = rearrange(x_BCHW, "b c (h p1) (w p2) -> (b h w) (p1 p2) c", p1=p, p2=p)
            dct_NPF = self.dct_PF.to(px_NPC.dtype).expand(px_NPC.shape[0], -1, -1)
            return self.pixel_embed(torch.cat([px_NPC, dct_NPF], dim=-1))
        px_BHWD = self.pixel_embed(rearrange(x_BCHW, "b c h w -> b h w c"))
        px_BHWD = px_BHWD + sincos_2d(self.pixel_dim, H, W, device=x_BCHW.device).to(px_BHWD.dtype)
        return rearrange(px_BHWD, "b (h p1) (w p2) d -> (b h w) (p1 p2) d", p1=p, p2=p)

    def forward(self, x_BCHW, cond_BLD, tokens_BLD=None):
        """x_BCHW: the noisy image; cond_BLD: SiLU(t_emb + s) per patch, from the trunk (tokens_BLD, the trunk's
        tokens themselves, are for the linear head). Returns [B, 3, H, W]."""
        p = self.patch_size
        B, _, H, W = x_BCHW.shape
        px_NPD = self.embed(x_BCHW)
        cond = cond_BLD
        if self.adaln == "factored":
            cond = F.silu(rearrange(self.cond_embed(cond_BLD), "b l (p d) -> (b l) p d", d=self.pixel_dim))
        rope = None
        if self.kind == "pit":
            grid = (H // p, W // p) if self.attention == "compact" else (p, p)
            rope = rope_2d(self.head_dim, *grid, device=x_BCHW.device)
        for block in self.blocks:
            px_NPD = run_block(block, px_NPD, cond, rope, B, checkpointing=self.activation_checkpointing)
        out_NPC = self.final(self.final_norm(px_NPD))
        return rearrange(out_NPC, "(b h w) (p1 p2) c -> b c (h p1) (w p2)", b=B, h=H // p, p1=p)


class PatchLinearHead(nn.Module):
    """Decoder kind `linear`: each patch's pixels from its trunk token by one Linear, after RMSNorm and an AdaLN
    shift and scale from the decoder's condition: JiT's output layer (under a PixelDiT trunk, DiT's, on the
    per-patch condition). Its p*p*3 outputs are ordered (row, column, channel) within the patch, as JiT's; zero-
    initialised like every decoder's output, so the untrained model predicts exactly zero."""

    def __init__(self, *, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.norm = RMSNorm(dim)
        self.adaLN = nn.Linear(dim, 2 * dim)  # a bare Linear: the condition is already SiLU'd
        self.linear = nn.Linear(dim, patch_size * patch_size * 3)
        for layer in (self.adaLN, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_BCHW, cond_BLD, tokens_BLD):
        p = self.patch_size
        shift, scale = self.adaLN(cond_BLD).chunk(2, dim=-1)
        out_BLF = self.linear(modulate(self.norm(tokens_BLD), shift, scale))
        return rearrange(out_BLF, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=x_BCHW.shape[-2] // p, p1=p, p2=p)
