"""Methods B and C as one generator: the semantic AR trunk plus a decoder conditioned on its z per patch.

- method B: `PixelARDecoder` (pixel_ar.py);
- method C: `PatchDiffusionHead`, a MAR-style per-patch denoiser made of the diffusion model zoo's decoder
  blocks (pit / mlp / mixer): the 16x16x3 patch is one 768-value target, denoised given z.
The loss and the samplers live in pixelgen/ar.py, apart from the networks.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .layers import TimestepEmbedder, ZConditioned
from .pixel_ar import to_values
from .semantic_ar import SemanticAR, nearest_entry


class PatchDiffusionHead(ZConditioned):
    """forward(x_t [N, 3, p, p], t [N], c [N, dim]) -> the prediction for each patch (velocity or x0, as the
    objective says). `net` is a PixelDecoder over single-patch images whose per-patch condition is
    SiLU(t_emb + c), c = the projected z (or the learned null condition)."""

    def __init__(self, net: nn.Module, *, z_dim: int, dim: int):
        super().__init__(z_dim, dim)
        self.net = net
        self.t_embed = TimestepEmbedder(dim)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)

    def forward(self, x_N3pp: torch.Tensor, t_N: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        cond = F.silu(self.t_embed(t_N) + c_ND)[:, None]  # [N, 1, dim]: one patch per "image"
        return self.net(x_N3pp, cond)


class ARGenerator(nn.Module):
    """`trunk` (SemanticAR) and `decoder` (PixelARDecoder or PatchDiffusionHead); the decoder stage trains
    `decoder.*` with the trunk frozen, as for the diffusion families. forward is the teacher-forced pass that
    pixelgen.ar's `ARObjective.loss` drives (through the DeepSpeed engine); `pixelgen.ar.generate` samples."""

    def __init__(self, trunk: SemanticAR, decoder: nn.Module, *, num_classes: int, resolution: int):
        super().__init__()
        self.trunk = trunk
        self.decoder = decoder
        self.num_classes = num_classes
        self.null_class = num_classes
        self.resolution = resolution
        self.patch_size = trunk.patch_size

    @property
    def method(self) -> str:
        return "diffusion" if isinstance(self.decoder, PatchDiffusionHead) else "pixel_ar"

    def forward(self, x_BCHW, y_B, *, semantic: bool, decoder: bool, features=None, indices=None,
                z_from_trunk: bool = False, drop=None, x_t=None, t=None, patches=None) -> dict:
        """The teacher-forced pass; every read of the weights (the dictionary included) happens in here, where
        ZeRO-3 has gathered them.

        Each patch's ground-truth z: discrete, the dictionary entry `indices` [B, L] name, or the entry nearest
        to the teacher's `features` [B, L, Dt] ("targets" = those indices, "entries" = the entries); continuous,
        the features themselves; `z_from_trunk`: the AR's own output instead (end to end).
        semantic: "semantic" = the AR's head per patch [B, L, K or z_dim].
        decoder, on the patches `patches` [B, n] of each image (None: all, n = L) given their z, with `drop`
        [B*n] marking rows that get the null condition: "logp" [B*n, P, 3], each pixel channel's log-probability
        (pixel AR), or "pred" for the noisy patches x_t [m*B*n, 3, p, p] at times t, m draws per patch."""
        out = {}
        B, L = x_BCHW.shape[0], self.trunk.num_patches
        z_all = None
        if self.trunk.mode == "discrete" and (features is not None or indices is not None):
            if indices is None:
                indices = nearest_entry(features.flatten(0, 1), self.trunk.dictionary).view(B, L)
            out["targets"] = indices
            z_all = out["entries"] = self.trunk.dictionary[indices]
        elif features is not None:
            z_all = features
        if semantic or z_from_trunk:
            out["semantic"] = self.trunk.head(self.trunk(x_BCHW, y_B))
        if z_from_trunk:
            z_all = out["semantic"]
        if not decoder:
            return out
        if patches is None:
            patches = torch.arange(L, device=x_BCHW.device).expand(B, L)
        batch = torch.arange(B, device=x_BCHW.device)[:, None]
        c = self.decoder.condition(z_all[batch, patches].flatten(0, 1), drop)
        if self.method == "diffusion":
            out["pred"] = self.decoder(x_t, t, c.repeat(x_t.shape[0] // c.shape[0], 1))
            return out
        p = self.patch_size
        values = rearrange(to_values(x_BCHW), "b c (h p1) (w p2) -> b (h w) (p1 p2) c", p1=p, p2=p)
        ctx, inside = self.decoder.context(values, patches)
        own = values[batch, patches].flatten(0, 1)
        h = self.decoder(own, c, ctx.flatten(0, 1), inside.flatten(0, 1))
        out["logp"] = self.decoder.log_prob(h, own)
        return out
