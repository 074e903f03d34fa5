"""Methods B and C memorise a handful of images on the CPU: both AR levels, the objective and the sampler learn.

    .venv/bin/python benchmarks/ar_overfit.py [--methods B C] [--images 6] [--steps 300] [--out docs/ar_overfit.png]

For each method, a tiny two-level generator trains with plain AdamW (no engine: this checks the networks, the
objective and the sampler, not the training machinery) on N fixed images from the fake ImageNet drawer (the
same images as benchmarks/overfit.py), one per class and no label dropout, so each label names exactly one
image:
  B  semantic AR (discrete: k-means dictionary of teacher features) + pixel AR decoder (categorical, 256-way
     per channel, channel-autoregressive);
  C  the same semantic AR + a MAR-style per-patch diffusion head (attention-free per-pixel MLP blocks).
Both levels train jointly (ARObjective with train_semantic and train_decoder), teacher-forced. The teacher is a
randomly initialised one-block DINOv3-S/16 (no weights on this machine): its features are arbitrary but fixed,
which is all a memorisation test needs from it. At a few checkpoints every class is sampled with the same
seeded generator, at LOW temperatures (the decoder's and the dictionary's, 0.1 by default): an overfit AR at
temperature 1 still draws the odd unlikely pixel or entry, and the semantic AR, which has only seen the exact
training patches as input, drifts once one is off (exposure bias): --temperature 1 --semantic-temperature 1.

It writes one PNG (the targets, each method's samples at each checkpoint, the two loss curves) and prints,
per method, the loss ratio between the first and last window of steps (the loss is the semantic
cross-entropy plus the decoder's loss: nats per sub-pixel for B, the velocity MSE for C), and the mean squared
error of the samples to their own targets at each checkpoint, with which target each sample is nearest.
The defaults make docs/ar_overfit.png; tests/test_ar_overfit.py runs the same functions with smaller settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pixelgen import ar
from pixelgen.data.fake_imagenet import class_name
from pixelgen.io import atomic_write
from pixelgen.families import build_generator
from pixelgen.models import count_params
from pixelgen.models.config import (DecoderConfig, ModelConfig, ObjectiveConfig, PixelARConfig, SamplerConfig,
                                    SemanticARConfig, TeacherConfig, TrunkConfig)
from pixelgen.models.pixel_ar import CONTEXTS
from pixelgen.models.semantic_ar import nearest_entry
from pixelgen.viz import to_uint8

METHODS = {"B": "semantic AR + pixel AR (categorical)", "C": "semantic AR + per-patch diffusion head"}


def _sibling(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package; tests load this file by path too)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", Path(__file__).resolve().parent / f"{name}.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


@dataclass
class AROverfitConfig:
    method: str = "B"  # B (pixel AR decoder) or C (diffusion head)
    images: int = 6  # N images = N classes
    # 16 px with 4 px patches: 16 patches of 16 pixels. The pixel AR's sequence is a patch's pixels, so small
    # patches keep its training and its pixel-by-pixel sampling cheap (32 px with 16 px patches would be 4
    # patches of 256 pixels: ~4x the sampling steps and 16x the attention per patch).
    resolution: int = 16
    patch_size: int = 4
    dim: int = 64  # semantic AR width
    depth: int = 2  # semantic AR blocks
    heads: int = 4
    pixel_dim: int = 32  # decoder width (pixel AR tokens, or the diffusion head's per-pixel width)
    pixel_depth: int = 2
    pixel_heads: int = 2  # pixel AR only (the MLP head has no attention)
    # The pixel AR's view of already generated neighbours. "none": a patch is drawn from its z alone, so z must
    # tell every patch apart; dict_size None gives one entry per training patch (N * patches), which k-means
    # over N * patches distinct features does (each feature its own entry).
    context: str = "none"
    dict_size: int | None = None  # None = images * patches per image
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 20  # linear LR warmup steps, then a cosine decay to 0 at the last step: at a constant 3e-3
    # Adam now and then kicks the memorised pixel AR out of its minimum (a loss spike of ~10x for ~30 steps), and
    # the last window and the last checkpoint must not land on one
    temperature: float = 0.1  # sampling: divides the pixel logits (B) or scales the head's starting noise (C)
    semantic_temperature: float = 0.1  # sampling: divides the dictionary logits
    sample_steps: int = 10  # C: Euler steps of the head's ODE per patch
    checkpoints: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # fractions of `steps` at which to sample
    window: int = 20  # steps averaged at each end of the loss curve
    seed: int = 0

    @property
    def patches(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    @property
    def entries(self) -> int:
        return self.dict_size or self.images * self.patches


@dataclass
class AROverfitResult(_sibling("overfit").OverfitResult):
    """benchmarks/overfit.py's result (loss ends, sample errors, distances) plus what the two levels add."""

    # (cfg is an AROverfitConfig.) The loss's terms per step: semantic_ce, bits_per_dim or diffusion_loss
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    entries_used: int = 0  # dictionary entries the training patches map to
    params: int = 0

    def nearest(self, step: int) -> torch.Tensor:
        return self.distances(step).argmin(dim=1)


def make_targets(n: int, resolution: int, seed: int) -> torch.Tensor:
    """benchmarks/overfit.py's images: one per class, drawn at 4x and downsampled, [n, 3, H, W] in [-1, 1] and
    exactly representable as uint8 (the pixel AR's targets are the integer values)."""
    return _sibling("overfit").make_targets(n, resolution, seed)


def model_config(cfg: AROverfitConfig) -> ModelConfig:
    teacher = TeacherConfig(name="vit_small_patch16_dinov3", allow_random_init=True, depth=1)
    if cfg.method == "B":
        decoder = DecoderConfig(kind="pixel_ar", pixel_dim=cfg.pixel_dim, depth=cfg.pixel_depth,
                                heads=cfg.pixel_heads, pixel_ar=PixelARConfig(output="categorical",
                                                                              context=cfg.context))
    elif cfg.method == "C":
        decoder = DecoderConfig(kind="mlp", pixel_dim=cfg.pixel_dim, depth=cfg.pixel_depth, adaln="patch")
    else:
        raise ValueError(f"method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    ar_cfg = SemanticARConfig(mode="discrete", dict_size=cfg.entries, kmeans_images=cfg.images, teacher=teacher)
    trunk = TrunkConfig(kind="semantic_ar", patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth,
                        heads=cfg.heads, ar=ar_cfg)
    return ModelConfig(trunk=trunk, decoder=decoder, num_classes=cfg.images, class_dropout=0.0)


def sampler_config(cfg: AROverfitConfig) -> SamplerConfig:
    return SamplerConfig(kind="euler", steps=cfg.sample_steps, temperature=cfg.temperature,
                         semantic_temperature=cfg.semantic_temperature)


def sample_classes(model, cfg: AROverfitConfig, objective: ObjectiveConfig) -> torch.Tensor:
    """One sample per class from the same seeded generator at every checkpoint."""
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    out = ar.generate(model, torch.arange(cfg.images), sampler_config(cfg), objective=objective, generator=g)
    model.train()
    return out.images


def overfit(cfg: AROverfitConfig, log_every: int = 0) -> AROverfitResult:
    """Train one method on the N images, sampling at the checkpoints; everything is seeded by `cfg.seed`."""
    start = time.perf_counter()
    model_cfg = model_config(cfg)
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = build_generator(model_cfg, cfg.resolution)
    targets = make_targets(cfg.images, cfg.resolution, cfg.seed)
    y = torch.arange(cfg.images)
    objective_cfg = ObjectiveConfig()
    dictionary = ar.build_dictionary(model_cfg, cfg.resolution, [targets], "cpu", seed=cfg.seed)
    model.trunk.dictionary.copy_(dictionary)
    objective = ar.ARObjective(model_cfg, objective_cfg, cfg.resolution, "cpu", train_semantic=True,
                               train_decoder=True)
    entries_used = nearest_entry(objective.teacher(targets).flatten(0, 1), dictionary).unique().numel()
    gen = torch.Generator().manual_seed(cfg.seed)  # the diffusion head's t and noise
    sample_at = sorted({round(f * cfg.steps) for f in cfg.checkpoints})

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    samples, losses, terms = {}, [], {}
    model.train()
    for step in range(cfg.steps + 1):
        if step in sample_at:
            samples[step] = sample_classes(model, cfg, objective_cfg)
        if step == cfg.steps:
            break
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / cfg.warmup)
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss, logs = objective.loss(model, targets, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        for k, v in logs.items():
            if k != "loss":
                terms.setdefault(k, []).append(v)
        if log_every and (step + 1) % log_every == 0:
            recent = {k: torch.stack(v[-log_every:]).mean().item() for k, v in terms.items()}
            print(f"[{cfg.method}] step {step + 1:4d}  loss {torch.stack(losses[-log_every:]).mean().item():.4f}  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in recent.items()), flush=True)
    return AROverfitResult(cfg, targets, torch.stack(losses), samples, time.perf_counter() - start,
                           terms={k: torch.stack(v) for k, v in terms.items()}, entries_used=entries_used,
                           params=count_params(model))


def summary(result: AROverfitResult) -> str:
    cfg = result.cfg
    start, end = result.loss_start(), result.loss_end()
    w, first = cfg.window, min(result.samples)
    term_text = ", ".join(f"{k} {v[:w].mean().item():.4f} -> {v[-w:].mean().item():.4f}"
                          for k, v in result.terms.items())
    lines = [
        f"method {cfg.method} ({METHODS[cfg.method]}): {result.params / 1e3:.0f}k parameters, "
        f"{result.entries_used}/{cfg.entries} dictionary entries used by the {cfg.images * cfg.patches} training "
        f"patches, {result.seconds:.0f} s",
        f"loss (mean of first / last {w} steps): {start:.4f} -> {end:.4f}, {start / end:.1f}x lower ({term_text})",
        f"samples at temperature {cfg.temperature:g}, semantic temperature {cfg.semantic_temperature:g}"
        + (f", Euler {cfg.sample_steps} steps per patch" if cfg.method == "C" else ""),
    ]
    for step in result.samples:
        nearest = result.nearest(step)
        own = (nearest == torch.arange(cfg.images)).sum().item()
        mse = result.mse(step)
        lines.append(
            f"step {step:4d}: sample-to-own-target MSE {mse:.4f} ({mse / result.mse(first):.3f}x step {first}'s), "
            f"{own}/{cfg.images} samples nearest their own target, "
            f"worst own/other distance {result.worst_own_to_other(step):.2f}"
        )
    return "\n".join(lines)


def plot(results: list[AROverfitResult], path: str | Path) -> Path:
    """Targets and each method's samples as a grid (a row per checkpoint, a column per class) beside the loss
    curves of the methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = results[0].cfg.images
    rows = [("targets", results[0].targets)]
    for r in results:
        rows += [(f"{r.cfg.method}, step {s}\nMSE {r.mse(s):.3f}", x) for s, x in r.samples.items()]
    fig = plt.figure(figsize=(1.0 * n + 5.2, 0.95 * len(rows) + 0.6))
    grid = fig.add_gridspec(len(rows), n + 1, width_ratios=[1] * n + [4.6], wspace=0.08, hspace=0.12,
                            left=0.1, right=0.98, top=0.9, bottom=0.07)
    for r, (label, images) in enumerate(rows):
        for k, image in enumerate(to_uint8(images)):
            ax = fig.add_subplot(grid[r, k])
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(class_name(k).replace(", class", "\nclass"), fontsize=6)
    ax = fig.add_subplot(grid[1:, n])
    for r in results:
        w = r.cfg.window
        steps = np.arange(1, len(r.losses) + 1)
        line, = ax.plot(steps, r.losses.numpy(), lw=0.6, alpha=0.35)
        ax.plot(steps[w - 1 :], np.convolve(r.losses.numpy(), np.ones(w) / w, "valid"), lw=1.5,
                color=line.get_color(), label=f"{r.cfg.method}: mean of {w} ({r.loss_start() / r.loss_end():.0f}x "
                                              f"lower at the end)")
    _sibling("overfit").loss_axis(ax, results[0].samples,
                                  "training loss: semantic CE + pixel nats/sub-pixel (B)\nor + velocity MSE (C)")
    cfg = results[0].cfg
    fig.suptitle(
        f"{cfg.resolution} px, patch {cfg.patch_size}, semantic AR {cfg.dim}x{cfg.depth} over {cfg.entries} "
        f"k-means entries; B: pixel AR {cfg.pixel_dim}x{cfg.pixel_depth} (categorical, context {cfg.context}), "
        f"C: MLP diffusion head {cfg.pixel_dim}x{cfg.pixel_depth}\nAdamW lr {cfg.lr:g}, batch {cfg.images}; "
        f"samples from a fixed seed at temperature {cfg.temperature:g}, semantic temperature "
        f"{cfg.semantic_temperature:g} (C: Euler {cfg.sample_steps} steps per patch)",
        fontsize=8,
    )
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return out


def main() -> None:
    d = AROverfitConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="methods to train, each its own model (default: %(default)s)")
    p.add_argument("--images", type=int, default=d.images, help="number of images = classes (default %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="pixels per side (default %(default)s)")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="patch size (default %(default)s)")
    p.add_argument("--dim", type=int, default=d.dim, help="semantic AR width (default %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth, help="semantic AR blocks (default %(default)s)")
    p.add_argument("--pixel-dim", type=int, default=d.pixel_dim, help="decoder width (default %(default)s)")
    p.add_argument("--pixel-depth", type=int, default=d.pixel_depth, help="decoder blocks (default %(default)s)")
    p.add_argument("--context", choices=CONTEXTS, default=d.context,
                   help="B: neighbouring pixels the pixel AR sees (default %(default)s)")
    p.add_argument("--dict-size", type=int, default=None,
                   help="dictionary entries (default: images x patches per image, one per training patch)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help="sampling temperature of the decoder level (default %(default)s)")
    p.add_argument("--semantic-temperature", type=float, default=d.semantic_temperature,
                   help="sampling temperature of the dictionary entries (default %(default)s)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps,
                   help="C: Euler steps per patch (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds weights, images, t, noise, sampling (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for a model this small (default %(default)s)")
    p.add_argument("--out", default="docs/ar_overfit.png", help="PNG to write (default %(default)s)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    base = AROverfitConfig(
        images=args.images, resolution=args.resolution, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
        pixel_dim=args.pixel_dim, pixel_depth=args.pixel_depth, context=args.context, dict_size=args.dict_size,
        steps=args.steps, lr=args.lr, temperature=args.temperature, semantic_temperature=args.semantic_temperature,
        sample_steps=args.sample_steps, seed=args.seed,
    )
    results = []
    for method in args.methods:
        cfg = replace(base, method=method)
        print(f"method {method}: {METHODS[method]}, {cfg.steps} steps ...", flush=True)
        results.append(overfit(cfg, log_every=max(1, cfg.steps // 10)))
    for r in results:
        print(summary(r))
    total = sum(r.seconds for r in results)
    print(f"{total:.0f} s on {args.threads} thread(s); wrote {plot(results, args.out)}")


if __name__ == "__main__":
    main()
