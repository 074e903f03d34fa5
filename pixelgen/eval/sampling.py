"""Class-balanced sampling for FID at scale: shared by any number of ranks, resumable, memory bounded by a chunk.

The `n = classes x per_class` samples are numbered; sample i has class i // per_class (exact balance) and draws
its randomness from its own stream seeded by (seed, i) (pixelgen.noise.Streams). They are cut into chunks of
`chunk_size` consecutive samples, drawn in batches of `batch_size`; a chunk is written, atomically, as one npz
with its uint8 images and their Inception features. What a chunk holds therefore depends only on the plan, not
on the number of ranks or on which rank drew it: 1 rank and 8 give the same bits (on the same hardware).

A restarted run skips every chunk already on disk and shares out the rest; a preemption signal lets each rank
finish the chunk it is drawing, then stop. Scoring streams over the chunks in order, reading their features
only: FID and sFID statistics are accumulated (pixelgen.eval.fid.Moments), and only the features that IS and
precision/recall need in full stay in memory (4 KB and 8 KB per image), never the images.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pixelgen.engine import faults
from pixelgen.eval.fid import FEATURE_FID, FEATURE_ISC, FEATURE_SFID, InceptionFeatures
from pixelgen.io import atomic_write, atomic_write_file, atomic_write_json
from pixelgen.noise import Streams
from pixelgen.progress import console, report
from pixelgen.viz import to_uint8

PLAN_FILE = "plan.json"
FEATURES = (FEATURE_FID, FEATURE_ISC, FEATURE_SFID)


@dataclass(frozen=True)
class Plan:
    """Which images a sampling run draws. `key` is everything else that decides their bits (the weights' hash,
    the sampler settings, the Inception weights' hash, ...): chunks made under another key are not reused."""

    num_classes: int
    per_class: int
    chunk_size: int
    batch_size: int
    seed: int
    key: dict

    @property
    def num_samples(self) -> int:
        return self.num_classes * self.per_class

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_samples)

    def labels(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop) // self.per_class

    def as_json(self) -> dict:
        """The plan as plan.json and a point's record hold it (JSON types: what a saved copy compares equal to)."""
        return json.loads(json.dumps(asdict(self)))


def chunk_path(folder: Path, chunk: int) -> Path:
    return Path(folder) / f"chunk{chunk:05d}.npz"


def open_plan(folder: Path, plan: Plan) -> list[int]:
    """Make `folder` the home of `plan` and return the chunks still to draw. Chunks of another plan (the config
    changed since they were drawn) are removed, with a line saying so; only the main rank calls this."""
    folder = Path(folder)
    saved = folder / PLAN_FILE
    if saved.is_file() and json.loads(saved.read_text()) != plan.as_json():
        stale = sorted(folder.glob("chunk*.npz"))
        console.print(f"{folder}: {len(stale)} chunks were drawn for other settings; drawing again", soft_wrap=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".chunk*.tmp"):  # a chunk half-written when its rank was killed: never a chunk
        tmp.unlink()
    if not saved.is_file():
        atomic_write_json(saved, plan.as_json())
    return [k for k in range(plan.num_chunks) if not chunk_path(folder, k).is_file()]


def draw_chunks(folder: Path, plan: Plan, todo: Sequence[int], draw: Callable, model, extractor: InceptionFeatures,
                device: torch.device, stop: Callable[[], bool] = lambda: False, desc: str = "sampling") -> bool:
    """Draw, featurise and write the chunks `todo` (this rank's share). Returns False when `stop()` became true
    (a preemption signal): the chunk in hand was finished and written first."""
    folder = Path(folder)
    drawn, t0 = [0], time.monotonic()

    def rate() -> str:
        return f"{drawn[0] / max(time.monotonic() - t0, 1e-9):.2f} images/s"

    # Progress by batch, so that even one chunk shows it: a live bar on a terminal, a line with the rate and the
    # ETA every 30 s in a SLURM log.
    work = [(chunk, b) for chunk in todo for b in range(*plan.bounds(chunk), plan.batch_size)]
    parts: list[torch.Tensor] = []
    for chunk, b in report(work, len(work), desc, unit="batches", extra=rate):
        start, end = plan.bounds(chunk)
        idx = range(b, min(b + plan.batch_size, end))
        y = plan.labels(idx.start, idx.stop).to(device)
        parts.append(to_uint8(draw(model, y, Streams(plan.seed, idx, device))).cpu())
        drawn[0] += len(idx)
        if idx.stop < end:
            continue
        images, parts = torch.cat(parts), []
        _write_chunk(chunk_path(folder, chunk), chunk, images, plan.labels(start, end), extractor(images))
        faults.point("fid_chunk", chunk)  # tests: killed between two chunks
        if stop():
            return False
    return True


def _write_chunk(path: Path, chunk: int, images: torch.Tensor, labels: torch.Tensor, features: dict) -> None:
    arrays = {"images": images.permute(0, 2, 3, 1).numpy(), "labels": labels.numpy(),
              # Inception's outputs are fp32: storing them so loses nothing.
              **{f"features_{name}": features[name].to(torch.float32).numpy() for name in FEATURES}}

    def write(f):
        np.savez(f, **arrays)
        faults.point("fid_chunk_write", chunk)  # tests: killed with the chunk half on disk, under its temp name

    atomic_write_file(path, write)


def read_chunk(path: Path, images: bool = False) -> dict:
    """A chunk's features (float64 tensors by feature name) and labels, and its uint8 NHWC images if asked."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
        out = {name: torch.from_numpy(data[f"features_{name}"]).to(torch.float64) for name in FEATURES}
        out["labels"] = torch.from_numpy(data["labels"])
        if images:
            out["images"] = data["images"]
    return out


def feature_chunks(folder: Path, plan: Plan, labels: list | None = None) -> Iterable[dict]:
    """Every chunk's features, in sample order (one chunk in memory at a time); each chunk's labels are appended
    to `labels` when given, so that one pass reads both."""
    for chunk in range(plan.num_chunks):
        data = read_chunk(chunk_path(folder, chunk))
        if labels is not None:
            labels.append(data["labels"])
        yield data


def grid_images(folder: Path, plan: Plan, classes: int = 16, per_class: int = 8) -> tuple[torch.Tensor, int]:
    """(uint8 [N, 3, H, W], per row) for a grid: the first `per_class` samples of each of the first `classes`
    classes, one class per row, read from the chunks that hold them."""
    show = min(plan.per_class, per_class)
    wanted = [c * plan.per_class + j for c in range(min(plan.num_classes, classes)) for j in range(show)]
    by_chunk: dict[int, list[int]] = {}
    for i in wanted:
        by_chunk.setdefault(i // plan.chunk_size, []).append(i % plan.chunk_size)
    rows = []
    for chunk, offsets in sorted(by_chunk.items()):
        with open(chunk_path(folder, chunk), "rb") as f, np.load(f, allow_pickle=False) as data:
            rows.append(torch.from_numpy(data["images"][offsets]))
    return torch.cat(rows).permute(0, 3, 1, 2), show


def write_samples_npz(folder: Path, plan: Plan, path: Path) -> Path:
    """ADM's sample batch (uint8 NHWC `arr_0`, and `labels`) assembled from the chunks, one chunk in memory at a
    time: the array is streamed into the archive, so 50k images need no 10 GB buffer."""
    first = read_chunk(chunk_path(folder, 0), images=True)["images"]
    shape = (plan.num_samples, *first.shape[1:])

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         "fortran_order": False, "shape": shape})
                for chunk in range(plan.num_chunks):
                    f.write(np.ascontiguousarray(read_chunk(chunk_path(folder, chunk), images=True)["images"]).data)
            with z.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, plan.labels(0, plan.num_samples).numpy())

    return atomic_write(path, write)


__all__ = ["Plan", "chunk_path", "draw_chunks", "feature_chunks", "grid_images", "open_plan",
           "read_chunk", "write_samples_npz"]
