"""What every converter of an official checkpoint shares: the result, the error, and a reader of the official
state dict that checks each tensor's shape and reports what it left unread."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


class CheckpointMismatch(ValueError):
    """The checkpoint is not one this converter knows how to map (named key, shape, what to do)."""


@dataclass
class Converted:
    state: dict[str, Tensor]  # pixelgen generator state dict (fp32)
    model: dict  # the model.* keys of a run config that builds the generator these weights fit
    notes: list[str] = field(default_factory=list)  # what was read off the checkpoint, for the user
    objective: dict = field(default_factory=dict)  # objective.* keys the weights need (e.g. x-prediction)
    resolution: int | None = None  # the image size, where the weights fix it (a learned or tabled grid)


class Reader:
    """Takes tensors out of the official state dict by name, checking each shape; reports leftovers."""

    def __init__(self, state: dict[str, Tensor], what: str):
        self.state, self.what, self.used = state, what, set()

    def __call__(self, key: str, shape: tuple | None = None) -> Tensor:
        if key not in self.state:
            raise CheckpointMismatch(f"{self.what}: no tensor '{key}' in the checkpoint, which a {self.what} "
                                     f"checkpoint has: is this the right kind, and the model's own state dict?")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointMismatch(f"{self.what}: '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)} "
                                     f"from the rest of the checkpoint")
        self.used.add(key)
        return value.detach().float().cpu().clone()

    def count(self, pattern: str) -> int:
        found = {int(m.group(1)) for k in self.state if (m := re.fullmatch(pattern, k))}
        if found != set(range(len(found))):
            raise CheckpointMismatch(f"{self.what}: blocks matching '{pattern}' are numbered {sorted(found)}, "
                                     f"not 0..n-1: the checkpoint is incomplete")
        return len(found)

    def leftovers(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def rope_pair_order(head_dim: int) -> Tensor:
    """Channel index into the official head layout for each pixelgen channel: pixelgen's rotary pair p rotates
    with the row at frequency p (p < head_dim/4) or with the column at frequency p - head_dim/4; the official
    pair 2f rotates with the column and 2f + 1 with the row, both at frequency f."""
    quarter = head_dim // 4
    pairs = [2 * p + 1 if p < quarter else 2 * (p - quarter) for p in range(head_dim // 2)]
    return torch.tensor([2 * q + c for q in pairs for c in (0, 1)])


def _qkv(read: Reader, prefix: str, dim: int, head_dim: int, in_dim: int) -> Tensor:
    w = read(f"{prefix}.qkv.weight", (3 * dim, in_dim)).view(3, dim // head_dim, head_dim, in_dim)
    order = rope_pair_order(head_dim)
    w[0], w[1] = w[0][:, order], w[1][:, order]  # q and k; v carries no position
    return w.reshape(3 * dim, in_dim)


def interleaved_rope_attention(read: Reader, src: str, dst: str, dim: int, head_dim: int, in_dim: int) -> dict[str, Tensor]:
    """A PixNerd-lineage attention (PixelDiT, DeCo: qkv without bias, per-head qk-norm, `precompute_freqs_cis_2d`
    RoPE) as pixelgen's Attention: the q and k rows and the qk-norm weights in pixelgen's pair order."""
    order = rope_pair_order(head_dim)
    return {f"{dst}.qkv.weight": _qkv(read, src, dim, head_dim, in_dim),
            f"{dst}.q_norm.weight": read(f"{src}.q_norm.weight", (head_dim,))[order],
            f"{dst}.k_norm.weight": read(f"{src}.k_norm.weight", (head_dim,))[order],
            f"{dst}.proj.weight": read(f"{src}.proj.weight", (dim, dim)),
            f"{dst}.proj.bias": read(f"{src}.proj.bias", (dim,))}


def pixnerd_trunk(read: Reader, blocks: str, *, dim: int, depth: int, head_dim: int,
                  num_classes: int) -> dict[str, Tensor]:
    """The PixNerd-lineage trunk (PixelDiT's patch blocks, DeCo's blocks: s/t/y embedders, then RMSNorm, the
    interleaved-RoPE attention, SwiGLU at mlp_ratio 4 and a bare 6-way adaLN per block, named `blocks`.i) as
    pixelgen's PatchTrunk."""
    hidden = int(2 * 4.0 * dim / 3)  # SwiGLU at mlp_ratio 4, as the official FeedForward(dim, 4 * dim)
    out = {"trunk.patch_embed.weight": read("s_embedder.proj.weight"),
           "trunk.patch_embed.bias": read("s_embedder.proj.bias", (dim,)),
           "trunk.semantic.y_embed.table.weight": read("y_embedder.embedding_table.weight", (num_classes + 1, dim))}
    for i in (0, 2):
        out[f"trunk.semantic.t_embed.mlp.{i}.weight"] = read(f"t_embedder.mlp.{i}.weight", (dim, 256 if i == 0 else dim))
        out[f"trunk.semantic.t_embed.mlp.{i}.bias"] = read(f"t_embedder.mlp.{i}.bias", (dim,))
    for i in range(depth):
        src, dst = f"{blocks}.{i}", f"trunk.semantic.blocks.{i}"
        out[f"{dst}.norm1.weight"] = read(f"{src}.norm1.weight", (dim,))
        out[f"{dst}.norm2.weight"] = read(f"{src}.norm2.weight", (dim,))
        out.update(interleaved_rope_attention(read, f"{src}.attn", f"{dst}.attn", dim, head_dim, dim))
        out[f"{dst}.mlp.w1.weight"] = read(f"{src}.mlp.w1.weight", (hidden, dim))
        out[f"{dst}.mlp.w3.weight"] = read(f"{src}.mlp.w3.weight", (hidden, dim))
        out[f"{dst}.mlp.w2.weight"] = read(f"{src}.mlp.w2.weight", (dim, hidden))
        out[f"{dst}.adaLN.weight"] = read(f"{src}.adaLN_modulation.0.weight", (6 * dim, dim))
        out[f"{dst}.adaLN.bias"] = read(f"{src}.adaLN_modulation.0.bias", (6 * dim,))
    return out
