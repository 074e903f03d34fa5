"""Randomness for samplers: one `torch.Generator` for a whole batch, or one stream per image (`Streams`).

With one generator, image b's noise depends on everything drawn before it in the batch, so it changes with
the batch size and with which rank drew the batch. `Streams` gives every image its own generator, seeded from
(seed, image index): image i draws the same numbers whatever batch, batch size or rank draws it. The FID stage
samples with it, so that 1 rank and 8 ranks produce the same 50k images.

Samplers draw through `randn` / `rand`, which take either kind (or None: torch's global generator). A draw of
`rows` = k x batch rows (e.g. the conditional and the unconditional half of a guided batch) takes k draws from
each image's stream, block by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Streams:
    """One random stream per image of a batch: image `indices[b]` of the run seeded `seed` draws row b."""

    def __init__(self, seed: int, indices: Sequence[int], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.indices = [int(i) for i in indices]
        # SeedSequence mixes (seed, index) into independent 64-bit seeds: neighbouring images do not get
        # neighbouring generator states.
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in _seeds(seed, self.indices)]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        return self.draw(torch.randn, shape, device, dtype)

    def rand(self, shape: Sequence[int], device=None, dtype=None) -> torch.Tensor:
        return self.draw(torch.rand, shape, device, dtype)

    def draw(self, fn, shape: Sequence[int], device, dtype) -> torch.Tensor:
        rows, per_row = shape[0], tuple(shape[1:])
        if rows % len(self) != 0:
            raise ValueError(f"a draw of {rows} rows from {len(self)} per-image streams: the rows must be a "
                             f"multiple of the batch (one block per copy of the batch)")
        device = torch.device(device) if device is not None else self.device
        blocks = [torch.stack([fn(per_row, generator=g, device=self.device, dtype=dtype) for g in self.generators])
                  for _ in range(rows // len(self))]
        return torch.cat(blocks).to(device)


def _seeds(seed: int, indices: list[int]) -> list[int]:
    return [int(np.random.SeedSequence([seed, i]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)
            for i in indices]


Generator = torch.Generator | Streams | None


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """torch.randn(shape) from a generator, per-image streams, or torch's global generator (None)."""
    if isinstance(generator, Streams):
        return generator.randn(shape, device, dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """torch.rand(shape), U[0, 1), from a generator, per-image streams, or torch's global generator (None)."""
    if isinstance(generator, Streams):
        return generator.rand(shape, device, dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def categorical(probs: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """One index per row of `probs` [N, V] (rows need not be normalised), as [N, 1]. From per-image streams, by
    inverting the CDF at one uniform draw per row (torch.multinomial takes a single generator); otherwise
    torch.multinomial itself."""
    if not isinstance(generator, Streams):
        return torch.multinomial(probs, 1, generator=generator)
    cdf = probs.float().cumsum(-1)
    u = rand((probs.shape[0], 1), generator, device=probs.device) * cdf[:, -1:]
    # The first index whose cumulative mass exceeds u: a zero-probability entry is never chosen.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


__all__ = ["Generator", "Streams", "categorical", "rand", "randn"]
