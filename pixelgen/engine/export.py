"""Consolidated fp32 weights as safetensors that load without DeepSpeed: the trained weights and each EMA.

The trained weights are DeepSpeed's fp32 master copies (under bf16 the module's own parameters are rounded
to bf16), assembled from the same pieces the EMAs average (engine/masters.py), so under ZeRO the export equals
what DeepSpeed's `zero_to_fp32` reconstructs from a checkpoint.
Frozen parameters have no master copy: their fp32 values are kept from before DeepSpeed cast the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pixelgen.engine import faults
from pixelgen.engine.dist import barrier
from pixelgen.engine.masters import Piece
from pixelgen.io import atomic_write

MODEL_FILE = "model.safetensors"  # the training weights
PRIMARY_EMA = "ema.safetensors"
MILESTONES = "milestones"  # <stage>/milestones/step<N>/: the same files as export/, kept at keep_every steps


def milestone_dir(stage_dir: str | Path, step: int) -> Path:
    return Path(stage_dir) / MILESTONES / f"step{step:08d}"


def milestones(stage_dir: str | Path) -> dict[int, Path]:
    """{step: folder} of a stage's complete milestones (a folder is renamed into place once every file is in)."""
    found = {}
    for path in sorted((Path(stage_dir) / MILESTONES).glob("step[0-9]*")):
        if path.is_dir() and path.name[4:].isdigit():
            found[int(path.name[4:])] = path
    return found


def ema_filename(index: int, decay: float) -> str:
    """The first EMA is `ema.safetensors` (what sampling and the later stages read); others name their decay."""
    return PRIMARY_EMA if index == 0 else f"ema-{decay:g}.safetensors"


def consolidated_state(module: torch.nn.Module, pieces: dict[str, Piece], frozen_fp32: dict[str, torch.Tensor],
                       keep: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the module: each trainable parameter assembled from every rank's piece of its
    master, the frozen ones as kept. Collective when the masters are sharded: every rank calls it; ranks with
    keep=False take part and get only the buffers."""
    keys = set(module.state_dict().keys())
    state = {}
    for name, _ in module.named_parameters():
        if name in frozen_fp32:
            state[name] = frozen_fp32[name]
            continue
        master = pieces[name].full(keep=keep)
        if keep:
            state[name] = master
    for name, b in module.named_buffers():
        if name in keys:  # persistent buffers only, as in state_dict
            state[name] = b.detach().float().cpu().clone()
    return state


def export_weights(engine, ema, frozen_fp32: dict[str, torch.Tensor], out_dir: Path, is_main: bool,
                   meta: dict) -> Path:
    # The masters' pieces the EMA averages are the ones exported: the two cannot disagree on the weights.
    state = consolidated_state(engine.module, ema.pieces, frozen_fp32, keep=is_main)
    emas = [ema.full(i, keep=is_main) for i in range(len(ema.decays))]  # collective when sharded
    if is_main:
        metadata = {"pixelgen": json.dumps(meta, default=str)}
        files = {MODEL_FILE: state}
        for i, decay in enumerate(ema.decays):
            files[ema_filename(i, decay)] = {**state, **emas[i]}
        for name, sd in files.items():
            atomic_write(out_dir / name,
                         lambda tmp, sd=sd: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata))
            faults.point("export")
    barrier()
    return out_dir


def export_milestone(engine, ema, frozen_fp32: dict[str, torch.Tensor], stage_dir: Path, step: int, is_main: bool,
                     meta: dict) -> Path:
    """The export at `step` into milestones/step<N>/, written under a temporary name and renamed when complete,
    so a process killed halfway leaves no milestone that looks whole (the retry after resume overwrites it)."""
    final = milestone_dir(stage_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    if is_main:
        partial.mkdir(parents=True, exist_ok=True)
    barrier()
    export_weights(engine, ema, frozen_fp32, partial, is_main, meta)
    if is_main:
        if final.exists():  # a run resumed from before this step exports it again: the same weights
            shutil.rmtree(final)
        partial.rename(final)
    barrier()
    return final


def weights_metadata(path: str | Path) -> dict:
    """The pixelgen metadata of exported weights (the run config, the stage, the training step), without
    reading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist: run the training stage that exports it")
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("pixelgen", "{}"))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read exported weights and their pixelgen metadata (the run config among it)."""
    meta = weights_metadata(path)
    return load_file(str(path)), meta
