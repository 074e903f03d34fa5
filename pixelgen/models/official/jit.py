"""JiT (LTH14/JiT, model_jit.py `JiT`): pixelgen's jit trunk plus its `linear` decoder compute the same function
in the official layouts (the RoPE pair order, the sin-cos table and the patch output order are JiT's), so the
conversion renames, splits the fused SwiGLU input projection and flattens the two patch-embedding convolutions.

Not in the tensors: the block the in-context class tokens join before (`in_context_start`). It is read from the
checkpoint's training arguments (args.model, e.g. "JiT-B/16") when the file has them, else the published value
for the model's depth, else the caller must say (`context_start`).
"""

from __future__ import annotations

import math

import torch

from ..jit import jit_position_embedding
from .common import CheckpointMismatch, Converted, Reader, Tensor

# Where the weights are in a checkpoint main_jit.py saves: {model, model_ema1 (0.9999, what JiT samples with),
# model_ema2 (0.9996), optimizer, epoch, args}; each a Denoiser state dict, the network under "net.".
CHECKPOINT = {"ema": ("model_ema1", "net."), "ema2": ("model_ema2", "net."), "model": ("model", "net.")}
# (in_context_start, published sizes) by depth: B 12 blocks, L 24, H 32, G 40 (model_jit.py, the paper's Table 9).
CONTEXT_START = {12: 4, 24: 8, 32: 10, 40: 10}
SIZES = {"B": 12, "L": 24, "H": 32, "G": 40}  # depth of each size args.model may name ("JiT-B/16")
DROPOUT = {32: 0.2, 40: 0.2}  # H and G drop out in the middle half of their blocks


# One function, read top to bottom as the official state dict is laid out (embedding, blocks, output layer): split
# into pieces it would pass the same dozen shapes around; the PixNerd-lineage parts shared with PixelDiT and DeCo
# are in common.py.
def convert_jit(state: dict[str, Tensor], args: dict | None = None, context_start: int | None = None) -> Converted:
    read, what = Reader(state, "JiT"), "JiT"
    proj1 = read("x_embedder.proj1.weight")
    if proj1.ndim != 4 or proj1.shape[1] != 3 or proj1.shape[2] != proj1.shape[3]:
        raise CheckpointMismatch(f"{what}: 'x_embedder.proj1.weight' has shape {tuple(proj1.shape)}, not the "
                                 f"[bottleneck, 3, p, p] of a pixel patch embedding")
    bottleneck, _, p, _ = proj1.shape
    proj2 = read("x_embedder.proj2.weight")
    dim = proj2.shape[0]
    if tuple(proj2.shape) != (dim, bottleneck, 1, 1):
        raise CheckpointMismatch(f"{what}: 'x_embedder.proj2.weight' has shape {tuple(proj2.shape)}, expected "
                                 f"{(dim, bottleneck, 1, 1)} (a 1 x 1 convolution from the bottleneck)")
    depth = read.count(r"blocks\.(\d+)\.norm1\.weight")
    head_dim = read("blocks.0.attn.q_norm.weight").shape[0]
    if depth == 0 or dim % head_dim or head_dim % 4:
        raise CheckpointMismatch(f"{what}: {depth} blocks of width {dim} with heads of {head_dim}: not a JiT "
                                 f"state dict pixelgen can take (heads must split the width by a multiple of 4)")
    num_classes = read("y_embedder.embedding_table.weight").shape[0] - 1
    pos = read("pos_embed")
    grid = math.isqrt(pos.shape[1])
    if pos.ndim != 3 or grid * grid != pos.shape[1] or not torch.allclose(
            pos[0], jit_position_embedding(dim, grid, grid), atol=1e-5):
        raise CheckpointMismatch(f"{what}: 'pos_embed' {tuple(pos.shape)} is not JiT's fixed sin-cos table of a "
                                 f"square grid: another position embedding than the converter knows")
    context = state["in_context_posemb"].shape[1] if "in_context_posemb" in state else 0
    name = (args or {}).get("model")
    if context_start is None and context:
        named = SIZES.get(name[4:5]) if isinstance(name, str) and name.startswith("JiT-") else None
        if named and named != depth:
            raise CheckpointMismatch(f"{what}: the checkpoint's training arguments name {name} ({named} blocks), "
                                     f"its weights have {depth}: give the block the in-context tokens join before "
                                     f"(pixelgen import jit ... --context-start N)")
        context_start = CONTEXT_START.get(depth)
        if context_start is None:
            raise CheckpointMismatch(f"{what}: {depth} blocks is none of the published sizes, and the block the "
                                     f"{context} in-context tokens join before is not in the weights: give it "
                                     f"(pixelgen import jit ... --context-start N)")
    hidden = int(2 * 4.0 * dim / 3)
    out: dict[str, Tensor] = {
        "trunk.embed_in.weight": proj1.reshape(bottleneck, 3 * p * p),
        "trunk.embed_out.weight": proj2.reshape(dim, bottleneck),
        "trunk.embed_out.bias": read("x_embedder.proj2.bias", (dim,)),
        "trunk.y_embed.table.weight": read("y_embedder.embedding_table.weight", (num_classes + 1, dim)),
        "trunk.context_pos": read("in_context_posemb", (1, context, dim)) if context else torch.zeros(1, 0, dim),
    }
    for i in (0, 2):
        out[f"trunk.t_embed.mlp.{i}.weight"] = read(f"t_embedder.mlp.{i}.weight", (dim, 256 if i == 0 else dim))
        out[f"trunk.t_embed.mlp.{i}.bias"] = read(f"t_embedder.mlp.{i}.bias", (dim,))
    for i in range(depth):
        src, dst = f"blocks.{i}", f"trunk.blocks.{i}"
        for key in ("norm1.weight", "norm2.weight"):
            out[f"{dst}.{key}"] = read(f"{src}.{key}", (dim,))
        for key in ("q_norm.weight", "k_norm.weight"):
            out[f"{dst}.attn.{key}"] = read(f"{src}.attn.{key}", (head_dim,))
        out[f"{dst}.attn.qkv.weight"] = read(f"{src}.attn.qkv.weight", (3 * dim, dim))
        out[f"{dst}.attn.qkv.bias"] = read(f"{src}.attn.qkv.bias", (3 * dim,))
        out[f"{dst}.attn.proj.weight"] = read(f"{src}.attn.proj.weight", (dim, dim))
        out[f"{dst}.attn.proj.bias"] = read(f"{src}.attn.proj.bias", (dim,))
        # w12 = [gate; value]: SiLU(x1) * x2, pixelgen's SiLU(w1 x) * w3 x; its output w3 is pixelgen's w2.
        w12, b12 = read(f"{src}.mlp.w12.weight", (2 * hidden, dim)), read(f"{src}.mlp.w12.bias", (2 * hidden,))
        out[f"{dst}.mlp.w1.weight"], out[f"{dst}.mlp.w3.weight"] = w12[:hidden], w12[hidden:]
        out[f"{dst}.mlp.w1.bias"], out[f"{dst}.mlp.w3.bias"] = b12[:hidden], b12[hidden:]
        out[f"{dst}.mlp.w2.weight"] = read(f"{src}.mlp.w3.weight", (dim, hidden))
        out[f"{dst}.mlp.w2.bias"] = read(f"{src}.mlp.w3.bias", (dim,))
        out[f"{dst}.adaLN.weight"] = read(f"{src}.adaLN_modulation.1.weight", (6 * dim, dim))
        out[f"{dst}.adaLN.bias"] = read(f"{src}.adaLN_modulation.1.bias", (6 * dim,))
    out["decoder.norm.weight"] = read("final_layer.norm_final.weight", (dim,))
    out["decoder.adaLN.weight"] = read("final_layer.adaLN_modulation.1.weight", (2 * dim, dim))
    out["decoder.adaLN.bias"] = read("final_layer.adaLN_modulation.1.bias", (2 * dim,))
    out["decoder.linear.weight"] = read("final_layer.linear.weight", (3 * p * p, dim))
    out["decoder.linear.bias"] = read("final_layer.linear.bias", (3 * p * p,))
    unused = read.leftovers()
    if unused:
        raise CheckpointMismatch(f"{what}: {len(unused)} tensors of the checkpoint have no place in the model "
                                 f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''})")
    model = {"num_classes": num_classes, "init": "published",  # were the config to train anew
             "trunk": {"kind": "jit", "size": None, "patch_size": p, "dim": dim, "depth": depth,
                       "heads": dim // head_dim, "mlp_ratio": 4.0,
                       "jit": {"bottleneck": bottleneck, "context_tokens": context,
                               "context_start": context_start if context else 0,
                               "dropout": DROPOUT.get(depth, 0.0)}},
             "decoder": {"kind": "linear"}, "repa": {"weight": 0.0}}
    notes = [f"JiT{f' ({name})' if name else ''}: {depth} blocks x {dim} ({dim // head_dim} heads), patch {p}, "
             f"bottleneck {bottleneck}, {context} in-context tokens"
             f"{f' from block {context_start}' if context else ''}, {num_classes} classes, {grid * p} px"]
    return Converted(out, model, notes, objective={"kind": "x_pred"}, resolution=grid * p)


def published(model: dict, resolution: int) -> dict:
    """JiT's objective (x-prediction with the v-loss, t_eps 0.05, noise 1 at 256 px and 2 at 512) and the sampler its
    README evaluates the released weights with: Heun 50 steps, CFG on (0.1, 1.0) at 3.0 (B), 2.4 (L), 2.2 (H) at
    /16 and 2.5 (L), 2.3 (H) at /32."""
    depth, patch = model["trunk"]["depth"], model["trunk"]["patch_size"]
    scales = {16: {12: 3.0, 24: 2.4, 32: 2.2}, 32: {24: 2.5, 32: 2.3}}.get(patch, {})
    sections = {"objective": {"kind": "x_pred", "t_mean": -0.8, "t_std": 0.8, "t_eps": 0.05,
                              "noise_scale": {512: 2.0, 1024: 4.0}.get(resolution, 1.0)},
                "sampler": {"kind": "heun", "steps": 50, "cfg_interval": [0.1, 1.0]}}
    if depth in scales:
        sections["sampler"]["cfg_scale"] = scales[depth]
    return sections
