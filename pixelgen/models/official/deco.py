"""DeCo (Zehong-Ma/DeCo, src/models/transformer/dit_c2i_DeCo.py `PixNerDiT`): its trunk is pixelgen's PixelDiT trunk
and its decoder pixelgen's `mlp` decoder with `adaln: factored` and three choices of DeCo's own (`norm: layer`,
`activation: silu`, `dct: deco`). The conversion maps it exactly (tests/test_official.py checks the forward and
the Euler sampler against the official code's outputs):

- the trunk's 2D RoPE pair order, as for PixelDiT (`common.rope_pair_order`: q/k rows and qk-norm weights);
- DeCo's pixel embedding is Linear(3 + 64 -> Dx) followed by `input_proj` Linear(Dx -> Dx) with nothing between:
  pixelgen's one `pixel_embed` is their product (W = Wi We, b = Wi be + bi), computed in float64;
- DeCo's ResBlock modulation is Sequential(SiLU, Linear) on the per-pixel condition, pixelgen's factored AdaLN
  applies the SiLU once after `cond_embed`: the same function, the Linear maps one to one.

Everything else (the timestep features, the null class, patch and pixel orders, eps 1e-6) is the same already.
The training checkpoint's `diffusion_trainer.*` (REPA's projector) lies outside the model's prefixes: not read.
"""

from __future__ import annotations

from .common import CheckpointMismatch, Converted, Reader, Tensor, pixnerd_trunk

# Where the weights are in a checkpoint the official training (PyTorch Lightning) saves: its state_dict holds the
# model under "denoiser." and its EMA (what the paper samples with) under "ema_denoiser.", as PixelDiT's.
CHECKPOINT = {"ema": ("state_dict", "ema_denoiser."), "model": ("state_dict", "denoiser.")}
FREQS = 8  # NerfEmbedder's max_freqs, fixed by PixNerDiT: 64 position features whatever the patch size


def convert_deco(state: dict[str, Tensor], **_hints) -> Converted:
    read = Reader(state, "DeCo")
    what = "DeCo"
    embed = read("s_embedder.proj.weight")
    dim, patch_in = embed.shape
    p = int(round((patch_in / 3) ** 0.5))
    if 3 * p * p != patch_in:
        raise CheckpointMismatch(f"{what}: 's_embedder.proj.weight' takes {patch_in} inputs, not 3 x p x p: "
                                 f"pixelgen models RGB pixels")
    depth = read.count(r"blocks\.(\d+)\.norm1\.weight")
    pixel_depth = read.count(r"dec_net\.res_blocks\.(\d+)\.in_ln\.weight")
    if depth == 0 or pixel_depth == 0:
        raise CheckpointMismatch(f"{what}: {depth} trunk blocks and {pixel_depth} decoder ResBlocks found: both are "
                                 f"needed (is this a PixNerDiT state dict?)")
    head_dim = read("blocks.0.attn.q_norm.weight").shape[0]
    if dim % head_dim or head_dim % 4:
        raise CheckpointMismatch(f"{what}: blocks.0.attn.q_norm.weight has {head_dim} channels, which does not split "
                                 f"the width {dim} into heads of a multiple of 4")
    pixel_dim = read("dec_net.input_proj.weight").shape[0]
    num_classes = read("y_embedder.embedding_table.weight").shape[0] - 1
    P = p * p
    out = pixnerd_trunk(read, "blocks", dim=dim, depth=depth, head_dim=head_dim, num_classes=num_classes)

    features = read("x_embedder.embedder.0.weight").shape[1] - 3
    if features != FREQS * FREQS:
        raise CheckpointMismatch(f"{what}: 'x_embedder.embedder.0.weight' takes 3 + {features} inputs, not the "
                                 f"3 + {FREQS * FREQS} of DeCo's position features (max_freqs {FREQS}): pixelgen's "
                                 f"dct: deco table has {FREQS} frequencies")
    w_in = read("dec_net.input_proj.weight", (pixel_dim, pixel_dim)).double()
    b_in = read("dec_net.input_proj.bias", (pixel_dim,)).double()
    w_embed = read("x_embedder.embedder.0.weight", (pixel_dim, 3 + features)).double()
    b_embed = read("x_embedder.embedder.0.bias", (pixel_dim,)).double()
    out["decoder.pixel_embed.weight"] = (w_in @ w_embed).float()
    out["decoder.pixel_embed.bias"] = (w_in @ b_embed + b_in).float()
    out["decoder.cond_embed.weight"] = read("dec_net.cond_embed.weight", (P * pixel_dim, dim))
    out["decoder.cond_embed.bias"] = read("dec_net.cond_embed.bias", (P * pixel_dim,))
    for i in range(pixel_depth):
        src, dst = f"dec_net.res_blocks.{i}", f"decoder.blocks.{i}"
        out[f"{dst}.adaLN.linear.weight"] = read(f"{src}.adaLN_modulation.1.weight", (3 * pixel_dim, pixel_dim))
        out[f"{dst}.adaLN.linear.bias"] = read(f"{src}.adaLN_modulation.1.bias", (3 * pixel_dim,))
        out[f"{dst}.norm.weight"] = read(f"{src}.in_ln.weight", (pixel_dim,))
        out[f"{dst}.norm.bias"] = read(f"{src}.in_ln.bias", (pixel_dim,))
        for a, b in (("0", "fc1"), ("2", "fc2")):  # hidden = pixel_dim: DeCo's MLP keeps the width
            out[f"{dst}.mlp.{b}.weight"] = read(f"{src}.mlp.{a}.weight", (pixel_dim, pixel_dim))
            out[f"{dst}.mlp.{b}.bias"] = read(f"{src}.mlp.{a}.bias", (pixel_dim,))
    out["decoder.final.weight"] = read("dec_net.final_layer.linear.weight", (3, pixel_dim))
    out["decoder.final.bias"] = read("dec_net.final_layer.linear.bias", (3,))

    unused = read.leftovers()
    if unused:
        raise CheckpointMismatch(f"{what}: {len(unused)} tensors of the checkpoint have no place in the model "
                                 f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}): a variant this "
                                 f"converter does not know, or more than the model's state dict")
    # DeCo's own init is neither of pixelgen's (its trunk keeps PyTorch's default Linears, its decoder xavier);
    # imported weights do not depend on it, a config trained anew from this one gets pixelgen's.
    model = {"num_classes": num_classes, "init": "pixelgen",
             "trunk": {"kind": "pixeldit", "size": None, "patch_size": p, "dim": dim, "depth": depth,
                       "heads": dim // head_dim, "mlp_ratio": 4.0},
             "decoder": {"kind": "mlp", "adaln": "factored", "pixel_dim": pixel_dim, "depth": pixel_depth,
                         "mlp_hidden": pixel_dim, "norm": "layer", "activation": "silu", "dct": "deco"},
             "repa": {"weight": 0.0}}
    notes = [f"DeCo: {depth} trunk blocks x {dim} ({dim // head_dim} heads), {pixel_depth} decoder ResBlocks x "
             f"{pixel_dim}, patch {p}, {num_classes} classes (input_proj fused into the pixel embedding)"]
    return Converted(out, model, notes)


def published(model: dict, resolution: int) -> dict:
    """The run config sections DeCo's README FIDs were sampled with (configs_c2i/DeCo_XL.yaml, DeCo_XL_512.yaml):
    Euler, 100 steps, CFG 3.2 at 256 px (imagenet256_epoch800.ckpt: FID 1.62) and 5.0 at 512 px (FID 2.22), on
    t in (0.1, 1.0], no time shift. pixelgen's interval is open at both ends; Euler never evaluates t = 1, and at
    100 steps both guide the same steps (11 to 99)."""
    cfg = {256: 3.2, 512: 5.0}.get(resolution)
    if cfg is None:
        return {}
    return {"sampler": {"kind": "euler", "steps": 100, "cfg_scale": cfg, "cfg_interval": [0.1, 1.0], "time_shift": 1.0}}
