"""Consolidated fp32 weights as safetensors that load without DeepSpeed: the trained weights and each EMA.

The trained weights are DeepSpeed's fp32 master copies (under bf16 the module's own parameters are rounded
to bf16), so under ZeRO-3 the export equals what DeepSpeed's `zero_to_fp32` reconstructs from a checkpoint.
Frozen parameters have no master copy: their fp32 values are kept from before DeepSpeed cast the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pixelgen.engine import faults
from pixelgen.engine.dist import barrier
from pixelgen.io import atomic_write

MODEL_FILE = "model.safetensors"  # the training weights
PRIMARY_EMA = "ema.safetensors"


def ema_filename(index: int, decay: float) -> str:
    """The first EMA is `ema.safetensors` (what sampling and the later stages read); others name their decay."""
    return PRIMARY_EMA if index == 0 else f"ema-{decay:g}.safetensors"


def _fp32_master(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of a trainable parameter. Collective under ZeRO: every rank calls it in order."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)  # ZeRO 1-3 and DeepSpeed's bf16 optimizer
    if master is None:
        # ZeRO 0 with bf16 keeps its fp32 copies in groups parallel to the module's parameters.
        opt = engine.optimizer
        for low, high in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
            for p, q in zip(low, high):
                if p is param:
                    return q.detach()
        master = param.detach()  # fp32 training without ZeRO: the parameter is the master
    return master


def consolidated_state(engine, frozen_fp32: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the engine's module. Collective under ZeRO: every rank calls it; ranks with
    keep=False take part and get only the buffers."""
    module = engine.module
    keys = set(module.state_dict().keys())
    state = {}
    for name, p in module.named_parameters():
        if name in frozen_fp32:
            state[name] = frozen_fp32[name]
            continue
        master = _fp32_master(engine, p)
        if keep:
            state[name] = master.float().cpu().clone().reshape(getattr(p, "ds_shape", p.shape))
    for name, b in module.named_buffers():
        if name in keys:  # persistent buffers only, as in state_dict
            state[name] = b.detach().float().cpu().clone()
    return state


def export_weights(engine, ema, frozen_fp32: dict[str, torch.Tensor], out_dir: Path, is_main: bool,
                   meta: dict) -> Path:
    state = consolidated_state(engine, frozen_fp32, keep=is_main)
    emas = [ema.full(i, keep=is_main) for i in range(len(ema.decays))]  # collective under ZeRO-3
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


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read exported weights and their pixelgen metadata (the run config among it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist: run the training stage that exports it")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("pixelgen", "{}"))
    return load_file(str(path)), meta
