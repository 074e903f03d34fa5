"""Sampling time of methods B and C with and without the KV caches, side by side in one run (CPU).

    .venv/bin/python benchmarks/ar_sampling.py [--methods B B-small C] [--batch 4] [--repeats 1] [--write-docs]

pixelgen.ar.generate draws an image patch by patch (the semantic AR), and for method B each patch pixel by pixel
(the pixel AR). With the KV caches every step feeds one new token and attends to the cached keys and values;
without them (kv_cache=False) every step runs the whole prefix again: the patches so far for the semantic AR, the
pixels of the patch so far for the pixel AR. Same model, same seed, both paths: the images must be the same, and
the speed-up is the time without the cache over the time with it. The issue's target: the cached path at least
10x faster for method B.

The setup: 64x64 images in 16x16 patches (4x4 = 16 patches of 256 pixels, so method B takes 16 x 256 pixel steps
of 3 channel draws each), one generator per method, randomly initialised (the time does not depend on what the
weights are) and then every weight nudged by N(0, 0.02^2), so that the zero-initialised output layers (the
semantic head, the diffusion head's last layer) do not make the outputs independent of the prefix, which would
make the identity check vacuous:
  semantic AR   discrete, dim 64 x 2 blocks, 4 heads; dictionary of 64 entries, k-means over a randomly
                initialised one-block DINOv3-S/16's features of 8 fake-ImageNet images;
  B             the pixel AR decoder of configs/dual_ar_discrete_b.yaml (256 wide x 6 blocks, 4 heads),
                categorical (256-way per channel), no context;
  B-small       the same at dim 64 x 4 blocks: per-op overhead, not arithmetic, sets its cached time;
  C             MAR-style per-patch diffusion head (per-pixel MLP blocks, pixel dim 16 x 2, patch AdaLN),
                Euler, 10 steps per patch (for information: the cache only saves the 16-step semantic AR).
Each batch size runs `repeats` times per method and path; the cached and uncached runs alternate (and swap
order every repeat), so load from other work on this shared machine falls on both; the table has the median.
One torch thread (torch.set_num_threads(1)), so numbers compare across runs on a machine with other work.

Prints progress to stderr and a markdown section to stdout. --write-docs also replaces the block between
<!-- ar_sampling:start --> and <!-- ar_sampling:end --> in docs/benchmarks.md (appending the section
"## Autoregressive sampling: KV cache (CPU)" when it is missing). The defaults take ~10 min on one core, most
of it method B without the cache.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import torch
from omegaconf import OmegaConf

from pixelgen import ar
from pixelgen.data.fake_imagenet import render
from pixelgen.families import build_generator
from pixelgen.models import count_params
from pixelgen.models.config import (DecoderConfig, ModelConfig, ObjectiveConfig, PixelARConfig, SamplerConfig,
                                    SemanticARConfig, TeacherConfig, TrunkConfig)

from report import DOC, REPO, git_commit, log, machine, write_section

HEADING = "## Autoregressive sampling: KV cache (CPU)"
RESOLUTION, PATCH, NUM_CLASSES, DICT_SIZE, KMEANS_IMAGES = 64, 16, 4, 64, 8
DIFFUSION_STEPS = 10
# B: the pixel AR that configs/dual_ar_discrete_b.yaml trains (read from the file, so the two stay the same size);
# B-small: a toy one, where per-op overhead rather than arithmetic sets the cached path's time.
_CONFIG_DECODER = OmegaConf.load(REPO / "configs" / "dual_ar_discrete_b.yaml").model.decoder
METHODS = {
    "B": DecoderConfig(kind="pixel_ar", pixel_dim=_CONFIG_DECODER.pixel_dim, depth=_CONFIG_DECODER.depth,
                       heads=_CONFIG_DECODER.heads, pixel_ar=PixelARConfig(output="categorical", context="none")),
    "B-small": DecoderConfig(kind="pixel_ar", pixel_dim=64, depth=4, heads=4,
                             pixel_ar=PixelARConfig(output="categorical", context="none")),
    "C": DecoderConfig(kind="mlp", pixel_dim=16, depth=2, adaln="patch"),
}


def describe(method: str) -> str:
    d = METHODS[method]
    if d.kind == "pixel_ar":
        return f"pixel AR {d.pixel_dim} x {d.depth} blocks"
    return f"diffusion head, Euler {DIFFUSION_STEPS}"


def model_config(method: str) -> ModelConfig:
    teacher = TeacherConfig(name="vit_small_patch16_dinov3", allow_random_init=True, depth=1)
    trunk = TrunkConfig(kind="semantic_ar", patch_size=PATCH, dim=64, depth=2, heads=4,
                        ar=SemanticARConfig(mode="discrete", dict_size=DICT_SIZE, kmeans_images=KMEANS_IMAGES,
                                            teacher=teacher))
    return ModelConfig(trunk=trunk, decoder=METHODS[method], num_classes=NUM_CLASSES, class_dropout=0.0)


def kmeans_images(n: int, seed: int) -> torch.Tensor:
    """n fake-ImageNet images at RESOLUTION (centre square of the drawer's wider image), [n, 3, H, W] in [-1, 1]."""
    out = []
    for i in range(n):
        im = render(i % NUM_CLASSES, RESOLUTION, np.random.default_rng([seed, i]))
        left = (im.width - im.height) // 2
        square = np.asarray(im.crop((left, 0, left + im.height, im.height)), np.float32)
        out.append(torch.from_numpy(square).permute(2, 0, 1))
    return torch.stack(out) / 127.5 - 1


def build_model(method: str, seed: int) -> torch.nn.Module:
    model_cfg = model_config(method)
    torch.manual_seed(seed)
    model = build_generator(model_cfg, RESOLUTION)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.trunk.dictionary.copy_(ar.build_dictionary(model_cfg, RESOLUTION, [kmeans_images(KMEANS_IMAGES, seed)],
                                                         "cpu", seed=seed))
    return model.eval()


@dataclass
class Row:
    method: str
    batch: int
    cached_s: list[float] = field(default_factory=list)  # seconds per batch, one per repeat
    uncached_s: list[float] = field(default_factory=list)
    identical: bool = True  # every repeat's images (and dictionary indices) equal across the two paths
    max_abs_diff: float = 0.0

    @property
    def cached(self) -> float:
        return statistics.median(self.cached_s)

    @property
    def uncached(self) -> float:
        return statistics.median(self.uncached_s)

    @property
    def speedup(self) -> float:
        return self.uncached / self.cached

    def per_step_ms(self, seconds: float) -> float:
        """Milliseconds per innermost AR step of the batch: a pixel (B) or a patch (C)."""
        steps = (RESOLUTION // PATCH) ** 2 * (PATCH * PATCH if self.method.startswith("B") else 1)
        return 1e3 * seconds / steps


def time_generate(model, y: torch.Tensor, seed: int, kv_cache: bool) -> tuple[float, ar.ARSamples]:
    sampler = SamplerConfig(kind="euler", steps=DIFFUSION_STEPS)
    g = torch.Generator().manual_seed(seed)  # the same draws on both paths
    start = time.perf_counter()
    out = ar.generate(model, y, sampler, objective=ObjectiveConfig(), generator=g, kv_cache=kv_cache)
    return time.perf_counter() - start, out


def measure(method: str, model, batch: int, repeats: int, seed: int) -> Row:
    row = Row(method, batch)
    y = torch.arange(batch) % NUM_CLASSES
    for r in range(repeats):
        # Alternate which path goes first, so a slow spell of the shared machine does not always hit the same one.
        order = (True, False) if r % 2 == 0 else (False, True)
        out = {}
        for kv in order:
            seconds, out[kv] = time_generate(model, y, seed, kv)
            (row.cached_s if kv else row.uncached_s).append(seconds)
            log(f"  [{method}, batch {batch}, repeat {r + 1}/{repeats}] {'cached' if kv else 'uncached'}: "
                f"{seconds:.2f} s ({seconds / batch:.2f} s/image)")
        a, b = out[True], out[False]
        same = torch.equal(a.images, b.images) and (a.indices is None or torch.equal(a.indices, b.indices))
        row.identical &= same
        row.max_abs_diff = max(row.max_abs_diff, (a.images - b.images).abs().max().item())
    return row


def table(rows: list[Row]) -> str:
    lines = ["| method | batch | cached (s/image) | uncached (s/image) | speed-up (uncached / cached) | "
             "cached ms per step | same images |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        name = f"{r.method} ({describe(r.method)})"
        step = "pixel" if r.method.startswith("B") else "patch"
        same = "yes (torch.equal)" if r.identical else f"NO (max abs diff {r.max_abs_diff:.2e})"
        lines.append(f"| {name} | {r.batch} | {r.cached / r.batch:.2f} | {r.uncached / r.batch:.2f} | "
                     f"**{r.speedup:.1f}x** | {r.per_step_ms(r.cached):.1f} per {step} | {same} |")
    return "\n".join(lines)


def interpretation(rows: list[Row]) -> str:
    b = [r for r in rows if r.method.startswith("B")]
    c = [r for r in rows if r.method == "C"]
    text = ""
    if b:
        rows_b = " / ".join(f"{r.method} at batch {r.batch}" for r in b)
        text += (f"With the cache, {rows_b}: {' / '.join(f'{r.speedup:.1f}x' for r in b)} faster (the issue's "
                 f"target: 10x). Per pixel step of the whole batch the cached path costs "
                 f"{' / '.join(f'{r.per_step_ms(r.cached):.1f}' for r in b)} ms (one token through the blocks, "
                 f"three 256-way heads and draws: mostly per-op overhead on one thread) and the uncached one "
                 f"{' / '.join(f'{r.per_step_ms(r.uncached):.1f}' for r in b)} ms (up to 256 tokens per step: "
                 f"arithmetic, which grows with the width and the batch), so the ratio grows with both: a toy "
                 f"decoder is overhead-bound and gains least. ")
    if c:
        text += (f"Method C: {' / '.join(f'{r.speedup:.2f}x' for r in c)}; its time is the diffusion head's "
                 f"{DIFFUSION_STEPS}-step ODE per patch, which the cache does not touch.")
    return text


def section(rows: list[Row], args, command: str, commit: str, seconds: float, params: dict[str, int]) -> str:
    paragraphs = [
        f"`{command}`. Machine: {machine()}; one torch thread; torch {metadata.version('torch')}. Run of "
        f"{datetime.date.today().isoformat()}, commit {commit}; {seconds / 60:.1f} min in all.",
        f"64x64 images in 16x16 patches (16 patches of 256 pixels), class-conditional, one sample per label, "
        f"temperature 1, no guidance. Semantic AR (discrete, {DICT_SIZE}-entry k-means dictionary): dim 64 x 2 "
        f"blocks. " + "; ".join(f"{m}: {describe(m)} ({params[m] / 1e6:.2f}M parameters in all)" for m in params)
        + f". B is the pixel AR of configs/dual_ar_discrete_b.yaml (categorical, no context). Random weights (the "
        f"time does not depend on them). Median of {args.repeats} alternating run(s) per path; speed-up = "
        f"uncached / cached time; *ms per step* is the cached time per pixel (B) or patch (C) of the whole "
        f"batch; *same images*: the two paths, same seed, gave identical images and dictionary indices in every "
        f"repeat.",
    ]
    wrap = [textwrap.fill(p, 115, break_long_words=False, break_on_hyphens=False) for p in paragraphs]
    return "\n\n".join([*wrap, table(rows), textwrap.fill(interpretation(rows), 115, break_long_words=False,
                                                          break_on_hyphens=False)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to time (default: %(default)s)")
    parser.add_argument("--batch", nargs="+", type=int, default=[4],
                        help="images per generate call, one row each (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per path, method and batch; the table has the median (default 1: B "
                             "without the cache takes minutes per run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the draws (default 0)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace the section in {DOC.relative_to(REPO)} (see above)")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.batch) < 1:
        parser.error("--repeats and --batch must be positive")
    command = shlex.join([".venv/bin/python", "benchmarks/ar_sampling.py", *sys.argv[1:]])
    commit = git_commit()  # now, as the code was imported: the tree may change during a long run
    # One thread: tiny matmuls gain nothing from more, and on a shared 2-core machine a second thread only
    # adds noise, so timings stay comparable between runs.
    torch.set_num_threads(1)

    t_start = time.time()
    rows = []
    params = {m: count_params(build_generator(model_config(m), RESOLUTION)) for m in args.methods}
    # C first: it takes seconds, so a mistake shows before the long B runs.
    for method in sorted(args.methods, key=lambda m: m != "C"):
        log(f"method {method}: building the model and its dictionary ...")
        model = build_model(method, args.seed)
        for batch in args.batch:
            row = measure(method, model, batch, args.repeats, args.seed)
            rows.append(row)
            log(f"method {method}, batch {batch}: cached {row.cached / batch:.2f} s/image, uncached "
                f"{row.uncached / batch:.2f} s/image, {row.speedup:.1f}x, identical images: {row.identical}")
    rows.sort(key=lambda r: (r.method, r.batch))
    seconds = time.time() - t_start
    body = section(rows, args, command, commit, seconds, params)
    print(body)
    if args.write_docs:
        write_section(body, HEADING, "ar_sampling")
    log(f"total {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
