"""A tiny PixelDiT overfits a handful of images on the CPU: the model and the objective can learn at all.

    .venv/bin/python benchmarks/overfit.py [--images 6] [--steps 600] [--out docs/overfit.png]
    .venv/bin/python benchmarks/overfit.py --init compare [--seeds 3] [--steps 600]

Trains a small trunk + PiT decoder with plain AdamW (no engine, no DeepSpeed: this checks the network and the
rectified-flow objective, not the training machinery) on N fixed images from the fake ImageNet drawer, one per
class and no label dropout, so each label names exactly one image. Every step's batch is the N images repeated
with fresh t and noise. At a few checkpoints it samples every class from the same fixed noise. It writes one
PNG (the targets, the samples at each checkpoint, the loss curve) and prints the loss ratio between the first
and last window of steps and the mean squared error of the samples to their targets at each checkpoint.
The defaults make docs/overfit.png; tests/test_overfit.py runs the same functions with smaller settings.

`--init compare` trains the same model under both `model.init` values (pixelgen, published) on the same images,
t and noise, for each of `--seeds` seeds, and prints the published / pixelgen ratios (final loss, steps to loss
thresholds, the samples' final error) as a markdown table; it writes no PNG.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelgen.data.fake_imagenet import class_name, render
from pixelgen.diffusion import OBJECTIVES, SAMPLERS, FlowMatching, sample
from pixelgen.io import atomic_write
from pixelgen.families import build_generator
from pixelgen.models import count_params
from pixelgen.models.config import DecoderConfig, Init, ModelConfig, ObjectiveConfig, SamplerConfig, TrunkConfig
from pixelgen.viz import to_uint8


@dataclass
class OverfitConfig:
    images: int = 6  # N images = N classes
    resolution: int = 32
    patch_size: int = 4
    dim: int = 96  # trunk width
    depth: int = 2  # trunk blocks
    heads: int = 4
    pixel_dim: int = 16
    pixel_depth: int = 1  # PiT blocks
    objective: str = "flow_velocity"  # or x_pred (JiT)
    init: str = "pixelgen"  # model.init: pixelgen | published
    steps: int = 600
    repeats: int = 4  # batch = the N images, each `repeats` times with its own t and noise
    lr: float = 3e-3
    warmup: int = 20  # linear LR warmup steps (AdamW's first steps are large on zero-initialised outputs)
    sampler: str = "heun"
    sample_steps: int = 25
    checkpoints: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # fractions of `steps` at which to sample
    window: int = 25  # steps averaged at each end of the loss curve
    seed: int = 0


@dataclass
class OverfitResult:
    cfg: OverfitConfig
    targets: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    losses: torch.Tensor  # [steps] per-step training loss
    samples: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> [N, 3, H, W] in [-1, 1]
    seconds: float = 0.0

    def loss_start(self) -> float:
        return self.losses[: self.cfg.window].mean().item()

    def loss_end(self) -> float:
        return self.losses[-self.cfg.window :].mean().item()

    def mse(self, step: int) -> float:
        """Mean squared error of each class's sample to its own target, averaged over the classes."""
        return (self.samples[step] - self.targets).pow(2).mean().item()

    def distances(self, step: int) -> torch.Tensor:
        """[N samples, N targets] mean squared distances: the diagonal should be each row's minimum."""
        s, t = self.samples[step].flatten(1), self.targets.flatten(1)
        return torch.cdist(s, t).pow(2) / s.shape[1]

    def worst_own_to_other(self, step: int) -> float:
        """Over the classes, the largest ratio of a sample's distance to its own target to its distance to the
        nearest other target: < 1 means every sample is nearest its own image (the mean image would give ~1)."""
        d = self.distances(step)
        own = d.diagonal()
        other = (d + torch.diag(torch.full_like(own, float("inf")))).min(dim=1).values
        return (own / other).max().item()


def make_targets(n: int, resolution: int, seed: int) -> torch.Tensor:
    """One fake-ImageNet image per class 0..n-1, [n, 3, H, W] in [-1, 1].

    Drawn at 4x and downsampled, so a 32 px image has clean edges instead of the drawer's aliasing and
    pixel noise; the drawer's images are wider than tall, so the square is cropped from the middle.
    """
    images = []
    for k in range(n):
        big = render(k, 4 * resolution, np.random.default_rng([seed, k]))
        left = (big.width - big.height) // 2
        square = big.crop((left, 0, left + big.height, big.height))
        small = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
        images.append(torch.from_numpy(np.asarray(small, np.float32)).permute(2, 0, 1))
    return torch.stack(images) / 127.5 - 1


def build_model(cfg: OverfitConfig) -> torch.nn.Module:
    model_cfg = ModelConfig(
        trunk=TrunkConfig(patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads),
        decoder=DecoderConfig(pixel_dim=cfg.pixel_dim, depth=cfg.pixel_depth, heads=cfg.heads),
        num_classes=cfg.images,
        class_dropout=0.0,
        init=cfg.init,
    )
    return build_generator(model_cfg, cfg.resolution)


def sample_classes(model, flow: FlowMatching, cfg: OverfitConfig, noise_NCHW: torch.Tensor) -> torch.Tensor:
    sampler = SamplerConfig(kind=cfg.sampler, steps=cfg.sample_steps, cfg_scale=1.0)
    labels = torch.arange(cfg.images)
    model.eval()
    out = sample(model, labels, shape=noise_NCHW.shape, cfg=sampler, num_classes=cfg.images, noise=noise_NCHW,
                 objective=flow)
    model.train()
    return out


def overfit(cfg: OverfitConfig, log_every: int = 0) -> OverfitResult:
    """Train on the N images, sampling at the checkpoints; everything is seeded by `cfg.seed`."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = build_model(cfg)
    flow = FlowMatching(ObjectiveConfig(kind=cfg.objective), num_classes=cfg.images, class_dropout=0.0)
    targets = make_targets(cfg.images, cfg.resolution, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(targets.shape, generator=gen)  # the same starting noise at every checkpoint
    x0 = targets.repeat(cfg.repeats, 1, 1, 1)
    y = torch.arange(cfg.images).repeat(cfg.repeats)
    sample_at = sorted({round(f * cfg.steps) for f in cfg.checkpoints})

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    samples, losses = {}, []
    for step in range(cfg.steps + 1):
        if step in sample_at:
            samples[step] = sample_classes(model, flow, cfg, noise)
        if step == cfg.steps:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        loss, _ = flow.loss(model, x0, y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:4d}  loss {torch.stack(losses[-log_every:]).mean().item():.4f}", flush=True)
    return OverfitResult(cfg, targets, torch.stack(losses), samples, time.perf_counter() - start)


def summary(result: OverfitResult) -> str:
    start, end = result.loss_start(), result.loss_end()
    w, first = result.cfg.window, min(result.samples)
    lines = [f"loss (mean of first / last {w} steps): {start:.4f} -> {end:.4f}, {start / end:.1f}x lower"]
    for step in result.samples:
        d = result.distances(step)
        nearest_own = (d.argmin(dim=1) == torch.arange(d.shape[0])).sum().item()
        mse = result.mse(step)
        lines.append(
            f"step {step:4d}: sample-to-own-target MSE {mse:.4f} ({mse / result.mse(first):.2f}x step {first}'s), "
            f"{nearest_own}/{d.shape[0]} samples nearest their own target, "
            f"worst own/other distance {result.worst_own_to_other(step):.2f}"
        )
    return "\n".join(lines)


# Loss levels, as fractions of the first step's loss (the same under every init: the untrained model predicts 0
# and both runs draw the same t and noise), whose first crossing by the running mean of `window` steps is counted;
# both inits reach these within 400 steps at the defaults.
LOSS_LEVELS = (1 / 4, 1 / 8)


def steps_to(result: OverfitResult, level: float) -> int | None:
    """The first step at which the mean loss of the last `window` steps is at most `level` x the first step's
    loss, or None if it never is."""
    w = result.cfg.window
    running = result.losses.unfold(0, w, 1).mean(dim=1)
    hit = (running <= level * result.losses[0]).nonzero()
    return int(hit[0]) + w if len(hit) else None


def _steps(n: int | None, cfg: OverfitConfig) -> str:
    return str(n) if n else f">{cfg.steps}"


def compare_inits(cfg: OverfitConfig, seeds: int) -> str:
    """Both inits on each seed (same images, t and noise); a markdown table of published / pixelgen ratios."""
    rows, ratios = [], {}
    for seed in range(cfg.seed, cfg.seed + seeds):
        runs = {init: overfit(replace(cfg, init=init, seed=seed)) for init in Init}
        base, pub = runs[Init.pixelgen], runs[Init.published]
        final = max(base.samples)
        cells = [pub.loss_end() / base.loss_end(), pub.mse(final) / base.mse(final)]
        steps = [(steps_to(base, f), steps_to(pub, f)) for f in LOSS_LEVELS]
        cells += [p / b if p and b else float("nan") for b, p in steps]
        for k, v in enumerate(cells):
            ratios.setdefault(k, []).append(v)
        rows.append(f"| {seed} | {base.loss_end():.4f} / {pub.loss_end():.4f} (**{cells[0]:.2f}**) | "
                    f"{base.mse(final):.4f} / {pub.mse(final):.4f} (**{cells[1]:.2f}**) | "
                    + " | ".join(f"{_steps(b, cfg)} / {_steps(p, cfg)} (**{c:.2f}**)"
                                 for (b, p), c in zip(steps, cells[2:]))
                    + f" | {base.seconds:.0f} / {pub.seconds:.0f} |")
    geo = [math.exp(sum(math.log(v) for v in vs) / len(vs)) if all(v == v for v in vs) else float("nan")
           for vs in ratios.values()]
    levels = " | ".join(f"steps to 1/{round(1 / f)} of step 1's loss" for f in LOSS_LEVELS)
    head = [f"| seed | final loss, pixelgen / published (ratio published / pixelgen) | final sample MSE | {levels} "
            f"| seconds |",
            "|---|---:|---:|" + "---:|" * len(LOSS_LEVELS) + "---:|"]
    mean = (f"| geometric mean of the ratios | **{geo[0]:.2f}** | **{geo[1]:.2f}** | "
            + " | ".join(f"**{g:.2f}**" for g in geo[2:]) + " | |")
    return "\n".join(head + rows + [mean])


def loss_axis(ax, checkpoints, title: str) -> None:
    """A loss curve's axis as the overfit PNGs draw it: log scale with 1-2-5 ticks, the sampling checkpoints as
    dotted lines (the caller has plotted the curves)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for s in checkpoints:
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def plot(result: OverfitResult, path: str | Path) -> Path:
    """Targets and samples as a grid (a row per checkpoint, a column per class) beside the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.cfg
    rows = [("targets", result.targets)] + [
        (f"step {s}\nMSE {result.mse(s):.3f}", x) for s, x in result.samples.items()
    ]
    fig = plt.figure(figsize=(1.1 * cfg.images + 4.6, 1.1 * len(rows) + 0.4))
    grid = fig.add_gridspec(len(rows), cfg.images + 1, width_ratios=[1] * cfg.images + [4.2], wspace=0.08,
                            hspace=0.12, left=0.09, right=0.98, top=0.9, bottom=0.1)
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
    ax = fig.add_subplot(grid[1:, cfg.images])
    steps = np.arange(1, len(result.losses) + 1)
    ax.plot(steps, result.losses.numpy(), lw=0.6, alpha=0.4, label="per step")
    kernel = np.ones(cfg.window) / cfg.window
    ax.plot(steps[cfg.window - 1 :], np.convolve(result.losses.numpy(), kernel, "valid"), lw=1.5,
            label=f"mean of {cfg.window}")
    loss_axis(ax, result.samples, f"training loss: mean of the last {cfg.window} steps "
                                  f"{result.loss_start() / result.loss_end():.0f}x below the first {cfg.window}")
    fig.suptitle(
        f"{cfg.resolution} px, patch {cfg.patch_size}, trunk {cfg.dim}x{cfg.depth}, PiT {cfg.pixel_dim}x"
        f"{cfg.pixel_depth}, {cfg.objective}, AdamW lr {cfg.lr:g}, batch {cfg.images}x{cfg.repeats}; "
        f"samples: {cfg.sampler} {cfg.sample_steps} steps from fixed noise",
        fontsize=8,
    )
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)
    return out


def main() -> None:
    d = OverfitConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=d.images, help="number of images = classes (default %(default)s)")
    p.add_argument("--resolution", type=int, default=d.resolution, help="pixels per side (default %(default)s)")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="trunk patch size (default %(default)s)")
    p.add_argument("--dim", type=int, default=d.dim, help="trunk width (default %(default)s)")
    p.add_argument("--depth", type=int, default=d.depth, help="trunk blocks (default %(default)s)")
    p.add_argument("--heads", type=int, default=d.heads, help="trunk and decoder heads (default %(default)s)")
    p.add_argument("--pixel-dim", type=int, default=d.pixel_dim, help="decoder pixel width (default %(default)s)")
    p.add_argument("--pixel-depth", type=int, default=d.pixel_depth, help="PiT blocks (default %(default)s)")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="what the network predicts (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (default %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="copies of each image per batch, each with its own t and noise (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler, help="ODE sampler (default %(default)s)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="sampler steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds weights, images, t, noise (default %(default)s)")
    p.add_argument("--init", choices=[*Init, "compare"], default=d.init,
                   help="model.init, or compare: both side by side, ratios published / pixelgen (default %(default)s)")
    p.add_argument("--seeds", type=int, default=1,
                   help="compare only: seeds --seed, --seed + 1, ... (default %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for a model this small (default %(default)s)")
    p.add_argument("--out", default="docs/overfit.png", help="PNG to write (default %(default)s)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = OverfitConfig(
        images=args.images, resolution=args.resolution, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
        heads=args.heads, pixel_dim=args.pixel_dim, pixel_depth=args.pixel_depth, steps=args.steps,
        objective=args.objective, repeats=args.repeats, lr=args.lr, sampler=args.sampler,
        sample_steps=args.sample_steps, seed=args.seed, init=Init.pixelgen if args.init == "compare" else args.init,
    )
    print(f"{count_params(build_model(cfg)) / 1e6:.2f} M parameters")
    if args.init == "compare":
        start = time.perf_counter()
        print(compare_inits(cfg, args.seeds))
        print(f"{time.perf_counter() - start:.0f} s on {args.threads} thread(s)")
        return
    result = overfit(cfg, log_every=max(1, cfg.steps // 10))
    print(summary(result))
    print(f"{result.seconds:.0f} s on {args.threads} thread(s); wrote {plot(result, args.out)}")


if __name__ == "__main__":
    main()
