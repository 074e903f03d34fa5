"""Published checkpoints into pixelgen's generator weights, one converter per official code base.

`convert(kind, state)` takes the official model's state dict (already taken out of its training checkpoint) and
returns pixelgen's generator state dict plus the model keys (`model.*` of a run config) that build the matching
generator. The architecture is read off the tensor shapes; a checkpoint that does not fit fails naming the key,
the shape found and the shape expected. `pixelgen import` (pipeline/importer.py) is the command around it.
"""

from __future__ import annotations

from . import deco, jit, pixeldit
from .common import CheckpointMismatch, Converted, Tensor

CONVERTERS = {"pixeldit": pixeldit.convert_pixeldit, "jit": jit.convert_jit, "deco": deco.convert_deco}
# --weights choice -> (the entry of the checkpoint dict holding the state dict, the prefix of the model's keys)
CHECKPOINTS = {"pixeldit": pixeldit.CHECKPOINT, "jit": jit.CHECKPOINT, "deco": deco.CHECKPOINT}
# (model keys, resolution) -> the run config sections (sampler, objective) the paper reports its FID with
PUBLISHED = {"pixeldit": pixeldit.published, "jit": jit.published, "deco": deco.published}


def convert(kind: str, state: dict[str, Tensor], **hints) -> Converted:
    """`hints`: what a kind's weights do not hold, where the caller knows it (jit: args, context_start)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}: one of {', '.join(CONVERTERS)}")
    return CONVERTERS[kind](state, **hints)


__all__ = ["CHECKPOINTS", "CONVERTERS", "PUBLISHED", "CheckpointMismatch", "Converted", "convert"]
