"""Pictures people would rather look at than read: sample grids and training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

from pixelgen.io import atomic_write


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save uint8 images [N, 3, H, W] as one PNG grid (nrow defaults to a near-square layout)."""
    # Imported here: torchvision.utils imports every torchvision model (~2 s), which a process that never
    # draws a grid (the CLI: status, cancel, submission) should not wait for.
    from torchvision.utils import make_grid

    n = images_uint8.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(images_uint8.cpu(), nrow=nrow, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def to_uint8(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 the way the ADM evaluation suite expects: (x+1)/2*255, rounded and clipped."""
    return ((x_BCHW.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def plot_metrics(metrics_jsonl: str | Path, path: str | Path, loss_terms: tuple[str, ...] = ()) -> Path:
    """One panel per metric against the step, from a metrics.jsonl file: the loss, its `loss_terms` (a model
    family's, e.g. fm_loss and repa_loss), the gradient norm and the learning rate. Keys never logged are left
    out."""
    keys = ("loss", *loss_terms, "grad_norm", "lr")
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            ax.set_yscale("log")
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out
