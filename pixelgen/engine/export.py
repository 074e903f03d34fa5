"""Consolidated weights as safetensors that load without DeepSpeed: the live weights and the EMA weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pixelgen.engine.dist import barrier
from pixelgen.io import atomic_write


def _full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the partitions first
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_weights(engine, ema, out_dir: Path, is_main: bool, meta: dict) -> Path:
    state = _full_state_dict(engine.module)
    if is_main:
        ema_state = dict(state)
        ema_state.update({n: t.float().cpu() for n, t in ema.state_dict().items()})
        metadata = {"pixelgen": json.dumps(meta, default=str)}
        for name, sd in (("model", state), ("ema", ema_state)):
            atomic_write(out_dir / f"{name}.safetensors",
                         lambda tmp, sd=sd: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata))
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
