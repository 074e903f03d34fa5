"""PixelDiT (NVlabs/PixelDiT, pixdit_core/pixeldit_c2i.py `PixDiT`): pixelgen's PixelDiT family computes the same
function with three layouts of its own, which the conversion maps exactly (tests/test_official.py checks the
forward against the official code's outputs):

- 2D RoPE pair order: the official code interleaves (column, row) rotary pairs per frequency; pixelgen puts every
  row pair first, then every column pair. The q and k rows of each head's projection (and the per-head qk-norm
  weights, which act on the same channels) are permuted; attention scores are unchanged.
- The pixel-level sin-cos embedding: the official code's first half of the channels encodes the column, pixelgen's
  the row. The pixel hidden channels are permuted throughout the decoder (a relabelling every per-channel op,
  RMSNorm included, is equivariant to), so no table needs to change.
- The PiT AdaLN output layout: official rows are (pixel, chunk, channel), pixelgen's (chunk, pixel, channel).
"""

from __future__ import annotations

import torch

from .common import CheckpointMismatch, Converted, Reader, Tensor, interleaved_rope_attention, pixnerd_trunk

# Where the weights are in a checkpoint the official training (PyTorch Lightning) saves: its state_dict holds the
# model under "denoiser." and its EMA (what the paper samples with) under "ema_denoiser.".
CHECKPOINT = {"ema": ("state_dict", "ema_denoiser."), "model": ("state_dict", "denoiser.")}


def sincos_channel_order(dim: int) -> Tensor:
    """Official pixel channel for each pixelgen channel: the row and column halves swap places."""
    return (torch.arange(dim) + dim // 2) % dim


def convert_pixeldit(state: dict[str, Tensor], **_hints) -> Converted:
    read = Reader(state, "PixelDiT")
    what = "PixelDiT"
    embed = read("s_embedder.proj.weight")
    dim, patch_in = embed.shape
    p = int(round((patch_in / 3) ** 0.5))
    if 3 * p * p != patch_in:
        raise CheckpointMismatch(f"{what}: 's_embedder.proj.weight' takes {patch_in} inputs, not 3 x p x p: "
                                 f"pixelgen models RGB pixels (the latent PixDiT variants are not pixel-space)")
    depth = read.count(r"patch_blocks\.(\d+)\.norm1\.weight")
    pixel_depth = read.count(r"pixel_blocks\.(\d+)\.norm1\.weight")
    if depth == 0 or pixel_depth == 0:
        raise CheckpointMismatch(f"{what}: {depth} patch blocks and {pixel_depth} pixel blocks found: both levels "
                                 f"are needed (is this a PixelDiT c2i state dict?)")
    head_dim = read("patch_blocks.0.attn.q_norm.weight").shape[0]
    pixel_head_dim = read("pixel_blocks.0.attn.q_norm.weight").shape[0]
    pixel_dim = read("pixel_embedder.proj.weight").shape[0]
    num_classes = read("y_embedder.embedding_table.weight").shape[0] - 1
    P = p * p
    modulation = read("pixel_blocks.0.adaLN_modulation.0.weight").shape[0]
    if modulation == 4 * P * pixel_dim:
        raise CheckpointMismatch(f"{what}: 'pixel_blocks.0.adaLN_modulation.0.weight' has {modulation} rows = 4 x "
                                 f"{P} pixels x {pixel_dim}: a pit_adaln_post_modulation checkpoint, whose PiT "
                                 f"blocks scale and shift their outputs without gates; pixelgen's PiT block has "
                                 f"the gated (6-way) AdaLN only")
    for hd, key in ((head_dim, "patch_blocks"), (pixel_head_dim, "pixel_blocks")):
        if dim % hd or hd % 4:
            raise CheckpointMismatch(f"{what}: {key}.0.attn.q_norm.weight has {hd} channels, which does not split "
                                     f"the width {dim} into heads of a multiple of 4")
    out = pixnerd_trunk(read, "patch_blocks", dim=dim, depth=depth, head_dim=head_dim, num_classes=num_classes)

    ch = sincos_channel_order(pixel_dim)  # pixelgen pixel channel j holds the official channel ch[j]
    out["decoder.pixel_embed.weight"] = read("pixel_embedder.proj.weight", (pixel_dim, 3))[ch]
    out["decoder.pixel_embed.bias"] = read("pixel_embedder.proj.bias", (pixel_dim,))[ch]
    mlp_hidden = 4 * pixel_dim
    for i in range(pixel_depth):
        src, dst = f"pixel_blocks.{i}", f"decoder.blocks.{i}"
        w = read(f"{src}.adaLN_modulation.0.weight", (6 * P * pixel_dim, dim)).view(P, 6, pixel_dim, dim)
        b = read(f"{src}.adaLN_modulation.0.bias", (6 * P * pixel_dim,)).view(P, 6, pixel_dim)
        out[f"{dst}.adaLN.linear.weight"] = w[:, :, ch].transpose(0, 1).reshape(6 * P * pixel_dim, dim)
        out[f"{dst}.adaLN.linear.bias"] = b[:, :, ch].transpose(0, 1).reshape(-1)
        out[f"{dst}.norm1.weight"] = read(f"{src}.norm1.weight", (pixel_dim,))[ch]
        out[f"{dst}.norm2.weight"] = read(f"{src}.norm2.weight", (pixel_dim,))[ch]
        compress = read(f"{src}.compress_to_attn.weight", (dim, P * pixel_dim)).view(dim, P, pixel_dim)
        out[f"{dst}.compress.weight"] = compress[:, :, ch].reshape(dim, P * pixel_dim)
        out[f"{dst}.compress.bias"] = read(f"{src}.compress_to_attn.bias", (dim,))
        expand = read(f"{src}.expand_from_attn.weight", (P * pixel_dim, dim)).view(P, pixel_dim, dim)
        out[f"{dst}.expand.weight"] = expand[:, ch].reshape(P * pixel_dim, dim)
        out[f"{dst}.expand.bias"] = read(f"{src}.expand_from_attn.bias", (P * pixel_dim,)).view(P, pixel_dim)[:, ch].reshape(-1)
        out.update(interleaved_rope_attention(read, f"{src}.attn", f"{dst}.attn", dim, pixel_head_dim, dim))
        out[f"{dst}.mlp.fc1.weight"] = read(f"{src}.mlp.fc1.weight", (mlp_hidden, pixel_dim))[:, ch]
        out[f"{dst}.mlp.fc1.bias"] = read(f"{src}.mlp.fc1.bias", (mlp_hidden,))
        out[f"{dst}.mlp.fc2.weight"] = read(f"{src}.mlp.fc2.weight", (pixel_dim, mlp_hidden))[ch]
        out[f"{dst}.mlp.fc2.bias"] = read(f"{src}.mlp.fc2.bias", (pixel_dim,))[ch]
    out["decoder.final_norm.weight"] = read("final_layer.norm.weight", (pixel_dim,))[ch]
    out["decoder.final.weight"] = read("final_layer.linear.weight", (3, pixel_dim))[:, ch]
    out["decoder.final.bias"] = read("final_layer.linear.bias", (3,))

    unused = read.leftovers()
    if unused:
        raise CheckpointMismatch(f"{what}: {len(unused)} tensors of the checkpoint have no place in the model "
                                 f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): a variant this "
                                 f"converter does not know (ProMoE experts?), or more than the model's state dict")
    model = {"num_classes": num_classes, "init": "published",  # were the config to train anew
             "trunk": {"kind": "pixeldit", "size": None, "patch_size": p, "dim": dim, "depth": depth,
                       "heads": dim // head_dim, "mlp_ratio": 4.0},
             "decoder": {"kind": "pit", "attention": "compact", "adaln": "pixel", "pixel_dim": pixel_dim,
                         "depth": pixel_depth, "heads": dim // pixel_head_dim, "attn_dim": None,
                         "mlp_ratio": 4.0, "mlp_hidden": None},
             "repa": {"weight": 0.0}}
    notes = [f"PixelDiT: {depth} patch blocks x {dim} ({dim // head_dim} heads), {pixel_depth} PiT blocks x "
             f"{pixel_dim} ({dim // pixel_head_dim} heads), patch {p}, {num_classes} classes"]
    return Converted(out, model, notes)


def published(model: dict, resolution: int) -> dict:
    """The run config sections the paper's best FID at `resolution` was sampled with (docs/models.md):
    imagenet256_pixeldit_xl_epoch320.ckpt, FID 1.61 (the 80 and 160 epoch ones: cfg 3.25 on (0.1, 1.0));
    imagenet512_pixeldit_xl.ckpt, FID 1.81."""
    if resolution == 512:
        return {"sampler": {"kind": "ab2", "steps": 100, "cfg_scale": 3.5, "cfg_interval": [0.1, 1.0], "time_shift": 2.0}}
    if resolution == 256:
        return {"sampler": {"kind": "ab2", "steps": 100, "cfg_scale": 2.75, "cfg_interval": [0.1, 0.9], "time_shift": 1.0}}
    return {}
