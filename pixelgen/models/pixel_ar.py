"""The pixel AR decoder: the second level of method B.

Each patch is its own sequence, causal over its p*p pixels in raster order and conditioned on the patch's
semantic z (added to every token and standing alone as the start token). A pixel is 3 values in 0..255, each
predicted from all earlier pixels, the earlier channels of the same pixel and z:
- categorical: a 256-way softmax per channel; G sees R, B sees R and G (channel-autoregressive);
- logistic: a discretised logistic mixture per channel (PixelCNN++), whose means shift linearly with the
  earlier channels; its 256 bin probabilities sum to one, so both heads expose the same per-channel logits.
Optional context: the pixels of already generated neighbouring patches, as a prefix of the sequence (none;
prev = the left neighbour; window = left, up-left, up, up-right), placed at their true offsets by 2D RoPE.

Sequence of one patch: [context pixels (slots x P)] [start = z] [pixel 0] ... [pixel P-2]; the last P outputs
predict pixels 0 .. P-1. Token j of the pixel part sits at pixel j's (row, col), the pixel it predicts.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from pixelgen.viz import to_uint8

from .config import PixelARContext, PixelAROutput
from .layers import CausalTransformer, RMSNorm, ZConditioned, cached_table, init_linear_xavier, rope_at

OUTPUTS, CONTEXTS = tuple(PixelAROutput), tuple(PixelARContext)
_SLOTS = {"none": (), "prev": ((0, -1),), "window": ((0, -1), (-1, -1), (-1, 0), (-1, 1))}
LEVELS = 256


def to_values(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> integer values 0..255 (exact for images that came from uint8): the evaluation's uint8
    conversion, as long indices."""
    return to_uint8(x).long()


def to_pixels(values: torch.Tensor) -> torch.Tensor:
    return values.float() / 127.5 - 1


def log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(a) - sigmoid(b)) for a > b, without cancellation."""
    return a + torch.log(-torch.expm1(b - a)) - F.softplus(a) - F.softplus(b)


def logistic_bin_logp(values: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin) of a logistic discretised into 256 bins over [-1, 1]; the edge bins take the tails, so the 256
    bins of one distribution sum to one. values broadcast against mean/log_scale."""
    x = to_pixels(values)
    inv_s = torch.exp(-log_scale)
    upper = inv_s * (x - mean + 1 / 255)
    lower = inv_s * (x - mean - 1 / 255)
    inner = log_sigmoid_diff(upper, lower)
    return torch.where(values == 0, F.logsigmoid(upper), torch.where(values == LEVELS - 1, -F.softplus(lower), inner))


class PixelARDecoder(ZConditioned):
    def __init__(self, *, patch_size: int, grid: tuple[int, int], z_dim: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, output: str, mixtures: int, context: str, activation_checkpointing: bool = False):
        super().__init__(z_dim, dim)
        self.patch_size, self.grid, self.output, self.mixtures = patch_size, grid, output, mixtures
        self.pixels = patch_size * patch_size
        self.slots = _SLOTS[context]
        self.value_embed = nn.Embedding(3 * LEVELS, dim)  # channel c, value v -> row c * 256 + v
        self.start = nn.Parameter(torch.zeros(dim))
        self.slot_embed = nn.Embedding(len(self.slots) + 1, dim)  # the last row marks a slot outside the image
        self.body = CausalTransformer(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                      activation_checkpointing=activation_checkpointing)
        if output == "categorical":
            # Earlier channels' values enter channel c's head: (G|R), (B|R), (B|G) -> rows 0, 1, 2 times 256.
            self.channel_embed = nn.Embedding(3 * LEVELS, dim)
            self.heads = nn.ModuleList(nn.Sequential(RMSNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                                     nn.Linear(dim, LEVELS)) for _ in range(3))
        else:
            # Per channel: K mixture logits, means, log-scales; then K coefficients for G|R and 2K for B|R,G.
            self.params = nn.Sequential(RMSNorm(dim), nn.Linear(dim, 12 * mixtures))
        self.apply(init_linear_xavier)
        for table in (self.value_embed, self.slot_embed) + ((self.channel_embed,) if output == "categorical" else ()):
            nn.init.normal_(table.weight, std=0.02)
        self._register_positions()

    def _register_positions(self):
        p = self.patch_size
        r, c = torch.arange(self.pixels) // p, torch.arange(self.pixels) % p
        rows = [dr * p + r for dr, _ in self.slots] + [r]
        cols = [dc * p + c for _, dc in self.slots] + [c]
        # Positions of the whole input sequence: the context pixels, then the start token at pixel 0 and pixel
        # token j at pixel j + 1 (the last pixel is never an input).
        self.register_buffer("pos_rows", torch.cat(rows), persistent=False)
        self.register_buffer("pos_cols", torch.cat(cols), persistent=False)

    @property
    def context_len(self) -> int:
        return len(self.slots) * self.pixels

    @property
    def seq_len(self) -> int:
        return self.context_len + self.pixels

    def rope(self):
        """cos/sin [seq_len, head_dim/2] of the sequence positions, built once per device (`cached_table`): the
        positions are a function of the patch size and the context slots alone."""
        key = ("PixelARDecoder.rope", self.body.head_dim, self.patch_size, self.slots)
        return cached_table(key, self.pos_rows.device,
                            lambda: rope_at(self.body.head_dim, self.pos_rows, self.pos_cols))

    # ------------------------------------------------------------------------------------------ inputs
    def embed_values(self, values_N3: torch.Tensor) -> torch.Tensor:
        """[..., 3] values -> [..., dim]: the sum of one embedding per channel."""
        offsets = torch.arange(3, device=values_N3.device) * LEVELS
        return self.value_embed(values_N3 + offsets).sum(-2)

    def context(self, values_BLP3: torch.Tensor, patches_Bn: torch.Tensor):
        """The context slots of patches `patches_Bn` (indices per image [B, n]) from the images' values
        [B, L, P, 3] (patch-major): ([B, n, S, P, 3] values, [B, n, S] inside the image). Slots outside the
        image hold zeros."""
        gw = self.grid[1]
        B, n = patches_Bn.shape
        rows, cols = patches_Bn // gw, patches_Bn % gw
        batch = torch.arange(B, device=patches_Bn.device)[:, None]
        vals, inside = [], []
        for dr, dc in self.slots:
            r, c = rows + dr, cols + dc
            ok = (r >= 0) & (c >= 0) & (c < gw)
            idx = torch.where(ok, r * gw + c, torch.zeros_like(r))
            vals.append(values_BLP3[batch, idx] * ok[..., None, None])
            inside.append(ok)
        if not vals:
            return (values_BLP3.new_zeros(B, n, 0, self.pixels, 3),
                    torch.zeros(B, n, 0, dtype=torch.bool, device=values_BLP3.device))
        return torch.stack(vals, 2), torch.stack(inside, 2)

    def context_tokens(self, ctx_NSP3: torch.Tensor, inside_NS: torch.Tensor) -> torch.Tensor:
        S = ctx_NSP3.shape[1]
        slot = torch.where(inside_NS, torch.arange(S, device=ctx_NSP3.device), S)
        tokens = self.embed_values(ctx_NSP3) + self.slot_embed(slot)[:, :, None]
        return rearrange(tokens, "n s p d -> n (s p) d")

    def prefix_tokens(self, c_ND, ctx_NSP3=None, inside_NS=None) -> torch.Tensor:
        """The context tokens and the start token [N, context_len + 1, dim]: what comes before pixel 0."""
        start = (self.start + c_ND)[:, None]
        if not self.slots:
            return start
        return torch.cat([self.context_tokens(ctx_NSP3, inside_NS), start], dim=1)

    def pixel_tokens(self, values_NJ3: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        return self.embed_values(values_NJ3) + c_ND[:, None]

    # ---------------------------------------------------------------------------------------- network
    def run(self, tokens_NnD: torch.Tensor, start: int, rope, caches=None) -> torch.Tensor:
        """The transformer on sequence positions start .. start+n-1 (with `caches`: those after the cached ones)."""
        cos, sin = rope
        n = tokens_NnD.shape[1]
        return self.body(tokens_NnD, (cos[start:start + n], sin[start:start + n]), caches)

    def forward(self, values_NP3: torch.Tensor, c_ND: torch.Tensor, ctx_NSP3=None, inside_NS=None) -> torch.Tensor:
        """Teacher-forced: hidden states [N, P, dim], output j predicting pixel j."""
        tokens = torch.cat([self.prefix_tokens(c_ND, ctx_NSP3, inside_NS),
                            self.pixel_tokens(values_NP3[:, :-1], c_ND)], dim=1)
        return self.run(tokens, 0, self.rope())[:, -self.pixels:]

    def new_cache(self) -> list[dict]:
        return self.body.new_cache()

    # ------------------------------------------------------------------------------------------ heads
    def _logistic(self, h, prev_values, c: int):
        """(mixture log-weights, means, log-scales) of channel c, each [..., K]."""
        K = self.mixtures
        p = self.params(h).float()
        logit_pi, mean, log_scale = p[..., 3 * K * c: 3 * K * (c + 1)].chunk(3, dim=-1)
        coeffs = torch.tanh(p[..., 9 * K:]).chunk(3, dim=-1)  # G|R, B|R, B|G
        prev = to_pixels(prev_values)
        if c == 1:
            mean = mean + coeffs[0] * prev[..., 0:1]
        elif c == 2:
            mean = mean + coeffs[1] * prev[..., 0:1] + coeffs[2] * prev[..., 1:2]
        return F.log_softmax(logit_pi, dim=-1), mean, log_scale.clamp_min(-7.0)

    def channel_logits(self, h: torch.Tensor, prev_values: torch.Tensor, c: int) -> torch.Tensor:
        """Logits over the 256 values of channel c [..., 256], given the hidden state and the values of the
        channels before it (prev_values [..., c], long). For the logistic head these are normalised log-probs."""
        if self.output == "categorical":
            u = h
            for j in range(c):  # pair rows: (1, 0) -> 0, (2, 0) -> 1, (2, 1) -> 2
                u = u + self.channel_embed((c - 1 + j) * LEVELS + prev_values[..., j])
            return self.heads[c](u).float()
        log_pi, mean, log_scale = self._logistic(h, prev_values, c)
        bins = torch.arange(LEVELS, device=h.device)
        logp = logistic_bin_logp(bins[:, None], mean[..., None, :], log_scale[..., None, :])
        return torch.logsumexp(logp + log_pi[..., None, :], dim=-1)

    def log_prob(self, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log p of each channel [..., 3] given hidden states [..., dim] and the true values [..., 3]."""
        out = []
        for c in range(3):
            if self.output == "categorical":
                logits = self.channel_logits(h, values[..., :c], c)
                out.append(F.log_softmax(logits, dim=-1).gather(-1, values[..., c:c + 1])[..., 0])
            else:
                log_pi, mean, log_scale = self._logistic(h, values[..., :c], c)
                logp = logistic_bin_logp(values[..., c:c + 1], mean, log_scale)
                out.append(torch.logsumexp(logp + log_pi, dim=-1))
        return torch.stack(out, -1)
