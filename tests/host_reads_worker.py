"""Steady-state training steps of the engine-test model (tests/engine_worker.py) under a TorchDispatchMode that
records every host read, as one rank of a job:

    python -m tests.host_reads_worker OUT_DIR '{"zero_stage": 2, "precision": "bf16"}'

A host read is aten._local_scalar_dense: what .item(), bool(tensor) and a tensor bound as a Scalar dispatch to;
on a GPU each one waits for the device. Warm-up steps run first; log, sample and checkpoint steps never come up.
Prints {"steps": N, "reads": [[count, innermost frames outside torch], ...]} as JSON.
"""

from __future__ import annotations

import collections
import json
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pixelgen.engine import train
from pixelgen.engine.config import DecoderTrainConfig, LoggingConfig
from tests.engine_worker import WORKER_KEYS, make_task

WARMUP, STEPS = 3, 4


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()
                      if "/torch/" not in f.filename and not f.filename.endswith(__file__)]
            self.sites[" < ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(frames[-4:]))] += 1
        return func(*args, **(kwargs or {}))


def main(out_dir: str, spec: str) -> int:
    cfg = DecoderTrainConfig(**{"steps": 1000, "batch_size": 4, "log_every": 1000, "ckpt_every": 1000,
                                "ema_decays": [0.9, 0.99], **json.loads(spec)})
    opts = {**WORKER_KEYS, "lr": cfg.lr, "trunk_lr": None, "noise": False}
    run = train._setup(make_task(opts), cfg, Path(out_dir), logging=LoggingConfig(wandb="disabled"),
                       run_name="host-reads", group="host-reads", run_config={})
    run.engine.train()
    for _ in range(WARMUP):
        train._train_step(run)
        run.step += 1
    with HostReads() as reads:
        for _ in range(STEPS):
            train._train_step(run)
            run.step += 1
    print(json.dumps({"steps": STEPS, "reads": [[n, site] for site, n in reads.sites.items()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
