"""Sharding and loading throughput against a torchvision ImageFolder baseline, side by side on the same images.

    .venv/bin/python benchmarks/data_throughput.py [--images 600] [--workers 1] [--jpeg-noise 16]

Writes a fake ImageNet of ImageNet-like image sizes (height 375, width 375-487). Its smooth pictures make
~40 KB JPEGs where ImageNet's average ~110 KB, and JPEG decoding time grows with the compressed size, so by
default the train JPEGs are re-encoded at q95 with seeded pixel noise (sigma 16), which brings them to
ImageNet's size (`--jpeg-noise 0` keeps the plain ones). Then it shards them in each format at 256 px with
one encoder process (images/s per process), and reads batches of 64 for ~N images:
  - pixelgen's train loader on each format's shards, with `--workers` DataLoader workers;
  - ImageFolder over the original JPEGs with the same ADM center crop, the same workers and batch size.
It prints a markdown table of images/s per worker and the ratio to the baseline, for docs/benchmarks.md.
The numbers compare within one run on one machine; the absolute images/s depend on its cores.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from pixelgen.data.config import ShardConfig
from pixelgen.data.fake_imagenet import generate
from pixelgen.data.loader import train_loader
from pixelgen.data.shards import center_crop, write_shards

RES = 256
BATCH = 64


def _center_crop_tensor(image):
    return TF.pil_to_tensor(center_crop(image, RES))


def imagefolder_rate(root: str, bad: set[str], workers: int, images: int) -> float:
    """images/s of the usual baseline: ImageFolder + PIL decode + the same center crop, shuffled."""
    dataset = torchvision.datasets.ImageFolder(
        os.path.join(root, "train"), transform=_center_crop_tensor,
        is_valid_file=lambda p: p.endswith(".JPEG") and os.path.relpath(p, root) not in bad)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    return _rate(itertools.chain.from_iterable(itertools.repeat(loader)), images)


def add_noise(root: str, sigma: float) -> None:
    """Re-encode every readable train JPEG with pixel noise, so it decodes like a photo of the same size."""
    for dirpath, _, files in os.walk(os.path.join(root, "train")):
        for i, name in enumerate(sorted(files)):
            path = os.path.join(dirpath, name)
            try:
                with Image.open(path) as image:
                    if image.format != "JPEG":
                        continue
                    mode, pixels = image.mode, np.asarray(image.convert("RGB"), np.float32)
            except OSError:
                continue  # the fake set's deliberately broken files stay as they are
            pixels += np.random.default_rng([i, len(name)]).normal(0, sigma, pixels.shape)
            noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
            noisy.save(path, format="JPEG", quality=95)


def _rate(batches, images: int) -> float:
    it = iter(batches)
    next(it)  # worker start-up and first shard index are not throughput
    n, t0 = 0, time.perf_counter()
    while n < images:
        x, _ = next(it)[:2]
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="train images in the fake set (default 600)")
    parser.add_argument("--jpeg-noise", type=float, default=16.0,
                        help="pixel noise sigma for ImageNet-sized JPEGs; 0 keeps the plain fake ones (default 16)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both loaders (default 1)")
    parser.add_argument("--out", default="/tmp/pixelgen-bench", help="scratch folder (deleted first)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per worker, like a data-loading process on a busy node

    shutil.rmtree(args.out, ignore_errors=True)
    classes = 20
    src = os.path.join(args.out, "imagenet")
    summary = generate(src, num_classes=classes, train_per_class=args.images // classes, val_per_class=1,
                       size=375, seed=0, progress=False)
    if args.jpeg_noise > 0:
        add_noise(src, args.jpeg_noise)
    jpeg_bytes = [os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(src, "train"))
                  for f in fs if os.path.relpath(os.path.join(dp, f), src) not in summary["bad_files"]]
    rows = []
    baseline = imagefolder_rate(src, set(summary["bad_files"]), args.workers, args.images)
    for fmt in ("png", "webp", "jpg", "original"):
        out = os.path.join(args.out, fmt)
        cfg = ShardConfig(splits=["train"], image_format=fmt, workers=1, max_count=256)
        t0 = time.perf_counter()
        manifest = write_shards(src, out, cfg, RES, progress=False)
        shard_rate = manifest["totals"]["count"] / (time.perf_counter() - t0)
        loader = train_loader(out, BATCH, seed=0, num_workers=args.workers, resolution=RES)
        rate = _rate(loader, args.images)
        rows.append((fmt, shard_rate, manifest["totals"]["bytes"] / manifest["totals"]["count"], rate))

    per_worker = baseline / max(args.workers, 1)
    jpegs = f"q95 + noise sigma {args.jpeg_noise:g}" if args.jpeg_noise > 0 else "q90, plain"
    print(f"{args.images} train images, height 375 / width 375-487, JPEG {jpegs} (mean {np.mean(jpeg_bytes) / 1e3:.0f} "
          f"KB), {RES} px crops, batch {BATCH}, {args.workers} DataLoader worker(s); {os.cpu_count()} CPU cores "
          f"({platform.machine()}), torch threads 1.\n")
    print("| input | sharding (images/s, 1 process) | bytes/image | loading (images/s per worker) | vs ImageFolder |")
    print("|---|---:|---:|---:|---:|")
    print(f"| ImageFolder, original JPEGs + center crop | - | {np.mean(jpeg_bytes) / 1e3:.0f} KB | "
          f"{per_worker:.0f} | 1.00x |")
    for fmt, shard_rate, size, rate in rows:
        w = rate / max(args.workers, 1)
        print(f"| shards, {fmt} | {shard_rate:.0f} | {size / 1e3:.0f} KB | {w:.0f} | {rate / baseline:.2f}x |")
    best = rows[0][3] / max(args.workers, 1)
    print(f"\npng shards: 8 workers at this rate = {8 * best:.0f} images/s (target 400).")


if __name__ == "__main__":
    main()
