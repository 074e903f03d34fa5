"""What every converter of an official checkpoint shares: the result, the error, and a reader of the official
state dict that checks each tensor's shape and reports what it left unread."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


class CheckpointMismatch(ValueError):
    """The checkpoint is not one this converter knows how to map (named key, shape, what to do)."""


@dataclass
class Converted:
    state: dict[str, Tensor]  # pixelgen generator state dict (fp32)
    model: dict  # the model.* keys of a run config that builds the generator these weights fit
    notes: list[str] = field(default_factory=list)  # what was read off the checkpoint, for the user
    objective: dict = field(default_factory=dict)  # objective.* keys the weights need (e.g. x-prediction)
    resolution: int | None = None  # the image size, where the weights fix it (a learned or tabled grid)


class Reader:
    """Takes tensors out of the official state dict by name, checking each shape; reports leftovers."""

    def __init__(self, state: dict[str, Tensor], what: str):
        self.state, self.what, self.used = state, what, set()

    def __call__(self, key: str, shape: tuple | None = None) -> Tensor:
        if key not in self.state:
            raise CheckpointMismatch(f"{self.what}: no tensor '{key}' in the checkpoint, which a {self.what} "
                                     f"checkpoint has: is this the right kind, and the model's own state dict?")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointMismatch(f"{self.what}: '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)} "
                                     f"from the rest of the checkpoint")
        self.used.add(key)
        return value.detach().float().cpu().clone()

    def count(self, pattern: str) -> int:
        found = {int(m.group(1)) for k in self.state if (m := re.fullmatch(pattern, k))}
        if found != set(range(len(found))):
            raise CheckpointMismatch(f"{self.what}: blocks matching '{pattern}' are numbered {sorted(found)}, "
                                     f"not 0..n-1: the checkpoint is incomplete")
        return len(found)

    def leftovers(self) -> list[str]:
        return sorted(set(self.state) - self.used)


