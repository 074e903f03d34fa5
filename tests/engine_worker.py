"""A small model and data stream for the training-engine tests, run as one rank of a job:

    python -m tests.engine_worker OUT_DIR '{"steps": 10, "zero_stage": 2, ...}'

The JSON holds DecoderTrainConfig keys plus the worker's own: `noise` (draw noise from the global RNG in the loss,
so resume must restore RNG states), `nan_batches` (global micro-batch indices whose loss is NaN, gradients
finite), `nan_grad_batches` (loss finite, gradients NaN), `train` ("all" or "decoder": the `trunk.`
parameters stay frozen) and `any_world` (declare the stream the same at any rank count, as it is: false makes
the engine refuse a resume on another rank count, as for a loader that cannot carry its position across). Torch's distributed variables come from the
test that launched it. Prints the result as JSON and exits 75 when preempted, as `pixelgen stage` does.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pixelgen.engine.config import DecoderTrainConfig, LoggingConfig
from pixelgen.engine.train import run_training, TrainTask

RES, CLASSES = 8, 4
WORKER_KEYS = {"noise": True, "nan_batches": [], "nan_grad_batches": [], "train": "all", "any_world": True}


class PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward where `flag` is set (an overflow inside backward)."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.save_for_backward(flag)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (flag,) = ctx.saved_tensors
        return grad * torch.where(flag, float("nan"), 1.0), None


class Toy(nn.Module):
    """A two-part generator stand-in: a `trunk` and a `decoder`, as the stages name them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(CLASSES, 32)
        self.trunk = nn.Sequential(nn.Linear(3 * RES * RES, 32), nn.GELU(), nn.Linear(32, 32))
        self.decoder = nn.Sequential(nn.GELU(), nn.Linear(32, 3 * RES * RES))

    def forward(self, x, y):
        # Labels of -2 mark a batch whose gradients overflow.
        h = PoisonGrad.apply(self.trunk(x.flatten(1)), (y == -2).any()) + self.embed(y.clamp(min=0))
        return self.decoder(h).view_as(x)


def make_task(opts: dict) -> TrainTask:
    nan_batches, nan_grad_batches = set(opts["nan_batches"]), set(opts["nan_grad_batches"])

    def loss_fn(model, x, y):
        noisy = x + 0.5 * torch.randn_like(x) if opts["noise"] else x * 0.5
        err = (model(noisy, y).float() - x) ** 2
        loss = err.mean()
        # Labels of -1 mark a poisoned batch: its loss becomes NaN on the device, with no host sync.
        loss = loss + torch.where((y == -1).any(), torch.tensor(float("nan")), torch.tensor(0.0))
        return loss, {"err_max": err.detach().max()}

    def sample_fn(model):
        y = torch.arange(CLASSES)
        out = model(torch.zeros(CLASSES, 3, RES, RES), y)
        return ((out.float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)

    def data_fn(micro, rank, world, start_batch, segments):
        # Global micro-batch b holds micro * world images; rank r takes its slice, so any rank count sees the
        # same global batches.
        for b in itertools.count(start_batch):
            g = torch.Generator().manual_seed(b)
            images = torch.randint(0, 256, (micro * world, 3, RES, RES), generator=g, dtype=torch.uint8)
            labels = torch.randint(0, CLASSES, (micro * world,), generator=g)
            if b in nan_batches:
                labels[:] = -1
            if b in nan_grad_batches:
                labels[:] = -2
            sl = slice(rank * micro, (rank + 1) * micro)
            yield images[sl], labels[sl]

    trainable = (lambda n: n.startswith("decoder.")) if opts["train"] == "decoder" else (lambda n: True)
    return TrainTask(make_model=Toy, trainable=trainable, loss_fn=loss_fn, sample_fn=sample_fn, data_fn=data_fn,
                     data_any_world=opts["any_world"],  # true: global micro-batch b is the same at any rank count
                     lr_of=(lambda n: opts["trunk_lr"] if n.startswith("trunk.") else opts["lr"])
                     if opts.get("trunk_lr") is not None else None)


def main(out_dir: str, spec: str) -> int:
    raw = json.loads(spec)
    opts = {**WORKER_KEYS, **{k: raw.pop(k) for k in list(raw) if k in WORKER_KEYS}}
    cfg = DecoderTrainConfig(**raw)  # the engine's keys, and trunk_lr for the decoder-only case
    opts.update(lr=cfg.lr, trunk_lr=cfg.trunk_lr)
    result = run_training(make_task(opts), cfg, Path(out_dir), logging=LoggingConfig(wandb="disabled"),
                          run_name="engine-test", group="engine-test", run_config={"train": asdict(cfg)},
                          export_meta={"test": True})
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}), flush=True)
    return 75 if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
