"""The semantic AR: the first level of methods B and C.

A causal transformer over the patches of an image in raster order. Position 0 holds the class token, position i
the embedded pixels of patch i-1 (teacher-forced in training); the output at position i is the semantic
condition of patch i: logits over a dictionary of teacher features (discrete) or a continuous z. Token i is
placed at patch i's grid position (2D RoPE), so position 0 sits where the first patch will be.
"""

import torch
import torch.nn as nn
from einops import rearrange

from .config import ARMode, ARTarget, Dictionary
from .layers import ClassEmbedder, CausalTransformer, init_linear_xavier, rope_2d

MODES, TARGETS, DICTIONARIES = tuple(ARMode), tuple(ARTarget), tuple(Dictionary)


@torch.no_grad()
def nearest_entry(features_ND: torch.Tensor, dictionary_KD: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the dictionary entry nearest (Euclidean) to each feature, [N]; in fp32, in chunks of features."""
    d = dictionary_KD.float()
    d_sq = (d * d).sum(-1)
    out = []
    for f in features_ND.float().split(chunk):
        # ||f - d||^2 = ||f||^2 - 2 f.d + ||d||^2; ||f||^2 is the same for every entry of a row.
        out.append((d_sq[None] - 2 * f @ d.T).argmin(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=features_ND.device)


@torch.no_grad()
def kmeans(features_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k distinct random features; an entry left empty is moved to the feature farthest
    from its own entry, so all k entries stay in use. Returns [k, D] (fp32)."""
    x = features_ND.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} features for {k} entries, got {n}")
    centers = x[torch.randperm(n, generator=generator, device="cpu")[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = nearest_entry(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None].float()
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            dist = (x - centers[nearest_entry(x, centers)]).pow(2).sum(-1)
            centers[empty] = x[dist.topk(empty.numel()).indices]
    return centers


class SemanticAR(nn.Module):
    """forward(x_BCHW, y_B) -> h [B, L, dim] (teacher-forced); `head(h)` -> dictionary logits [.., K] (discrete) or
    z [.., z_dim] (continuous). Sampling drives it one position at a time through `run` with a cache.

    The dictionary is in the state dict (a persistent buffer, or a parameter when learned): it travels with every
    checkpoint and exported weights file.
    """

    def __init__(self, *, patch_size: int, grid: tuple[int, int], dim: int, depth: int, heads: int,
                 mlp_ratio: float, num_classes: int, mode: str, dict_size: int, z_dim: int,
                 learned_dictionary: bool = False, activation_checkpointing: bool = False):
        super().__init__()
        self.patch_size, self.grid, self.dim, self.mode, self.z_dim = patch_size, grid, dim, mode, z_dim
        self.y_embed = ClassEmbedder(num_classes, dim)
        self.patch_embed = nn.Linear(3 * patch_size * patch_size, dim)
        self.body = CausalTransformer(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                      activation_checkpointing=activation_checkpointing)
        if mode == "discrete":
            self.head = nn.Linear(dim, dict_size)
            # Filled by the trunk stage's k-means; a parameter when it trains further, else a buffer.
            if learned_dictionary:
                self.dictionary = nn.Parameter(torch.zeros(dict_size, z_dim))
            else:
                self.register_buffer("dictionary", torch.zeros(dict_size, z_dim))
        else:
            self.head = nn.Linear(dim, z_dim)
        self.apply(init_linear_xavier)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.zeros_(self.head.weight)  # uniform logits / zero z before training
        nn.init.zeros_(self.head.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def rope(self, device):
        return rope_2d(self.body.head_dim, *self.grid, device=device)

    def embed_patches(self, patches_BN3pp: torch.Tensor) -> torch.Tensor:
        """Patches [B, n, 3, p, p] (pixels in [-1, 1]) -> input tokens [B, n, dim]."""
        return self.patch_embed(rearrange(patches_BN3pp, "b n c p1 p2 -> b n (c p1 p2)"))

    def embed_class(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.y_embed(y_B)[:, None]

    def inputs(self, x_BCHW: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        """Teacher-forced input tokens [B, L, dim]: the class, then patches 0 .. L-2."""
        p = self.patch_size
        patches = rearrange(x_BCHW, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=p, p2=p)
        return torch.cat([self.embed_class(y_B), self.embed_patches(patches[:, :-1])], dim=1)

    def run(self, tokens_BnD: torch.Tensor, start: int, rope, caches=None) -> torch.Tensor:
        """The transformer on positions start .. start+n-1 (with `caches`: the ones after those cached)."""
        cos, sin = rope
        n = tokens_BnD.shape[1]
        return self.body(tokens_BnD, (cos[start:start + n], sin[start:start + n]), caches)

    def forward(self, x_BCHW: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        return self.run(self.inputs(x_BCHW, y_B), 0, self.rope(x_BCHW.device))

    def new_cache(self) -> list[dict]:
        return self.body.new_cache()
