"""Training steps of the engine-test model (tests/engine_worker.py) that record, after every step, the fp32
masters as DeepSpeed itself reports them, the module's own (bf16) weights and each EMA, as one rank of a job:

    python -m tests.masters_worker OUT_DIR '{"zero_stage": 2, "precision": "bf16", "ema_decays": [0.0, 0.9]}'

The masters come from DeepSpeed's API (`safe_get_full_fp32_param`; the unfused optimizer's `fp32_groups` under
ZeRO-0), not from pixelgen's engine/masters.py, so the test that reads OUT_DIR/trajectory.pt checks pixelgen
against DeepSpeed. Rank 0 writes it: {"masters": [step0, step1, ...], "module": [...], "emas": [[...], ...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pixelgen.engine import train
from pixelgen.engine.config import DecoderTrainConfig, LoggingConfig
from tests.engine_worker import WORKER_KEYS, make_task

STEPS = 4


def _masters(run) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    unfused = {}
    opt = run.engine.optimizer
    for low, high in zip(getattr(opt, "fp16_groups", None) or [], getattr(opt, "fp32_groups", None) or []):
        unfused.update({id(p): q for p, q in zip(low, high)})
    out = {}
    for name, p in run.named_trainable:
        full = safe_get_full_fp32_param(p)  # collective under ZeRO
        if full is None:
            full = unfused.get(id(p), p)
        out[name] = full.detach().float().cpu().clone().reshape(getattr(p, "ds_shape", p.shape))
    return out


def _module(run) -> dict[str, torch.Tensor]:
    """The module's parameters as the forward pass sees them (gathered under ZeRO-3), in their own dtype."""
    params = [p for _, p in run.named_trainable]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().cpu().clone() for n, p in run.named_trainable}
    return {n: p.detach().cpu().clone() for n, p in run.named_trainable}


def main(out_dir: str, spec: str) -> int:
    cfg = DecoderTrainConfig(**{"steps": 1000, "batch_size": 4, "log_every": 1000, "ckpt_every": 1000,
                                "lr": 0.01, **json.loads(spec)})
    opts = {**WORKER_KEYS, "lr": cfg.lr, "trunk_lr": None, "noise": False}
    run = train._setup(make_task(opts), cfg, Path(out_dir), logging=LoggingConfig(wandb="disabled"),
                       run_name="masters", group="masters", run_config={})
    run.engine.train()
    record = {"masters": [_masters(run)], "module": [_module(run)],
              "emas": [[run.ema.full(i)] for i in range(len(cfg.ema_decays))]}
    for _ in range(STEPS):
        train._train_step(run)
        run.step += 1
        record["masters"].append(_masters(run))
        record["module"].append(_module(run))
        for i in range(len(cfg.ema_decays)):
            record["emas"][i].append(run.ema.full(i))
    if run.dist.is_main:
        torch.save(record, Path(out_dir) / "trajectory.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
