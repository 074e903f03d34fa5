"""Pictures people would rather look at than read: sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from pixelgen.io import atomic_write


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save uint8 images [N, 3, H, W] as one PNG grid (nrow defaults to a near-square layout)."""
    n = images_uint8.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(images_uint8.cpu(), nrow=nrow, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def to_uint8(x_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 the way the ADM evaluation suite expects: (x+1)/2*255, rounded and clipped."""
    return ((x_BCHW.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
