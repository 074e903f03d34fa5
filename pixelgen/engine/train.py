"""The one training loop, on a DeepSpeed engine, shared by every stage and model family.

A stage hands over a `TrainTask` (model, which parameters train, the loss, how to sample a grid, how to make
the data stream); the loop owns precision, ZeRO, the LR schedule, EMA, checkpoints, resume, preemption and
logging.
"""

from __future__ import annotations

import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from pixelgen.data.loader import to_float
from pixelgen.engine.checkpoint import CheckpointManager
from pixelgen.engine.config import LoggingConfig, TrainConfig
from pixelgen.engine.dist import DistInfo, init_distributed
from pixelgen.engine.ema import EMA
from pixelgen.engine.export import export_weights
from pixelgen.engine.logger import MetricsLogger, console
from pixelgen.viz import plot_metrics, save_grid


@dataclass
class TrainTask:
    make_model: Callable[[], nn.Module]  # called after seeding, so the initial weights are reproducible
    trainable: Callable[[str], bool]  # parameter name -> does it train
    # (model, x_float_BCHW, y_B) -> (loss, {name: detached scalar tensor}); the named parts are logged too
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
    # model -> uint8 images [N, 3, H, W] for the sample grid
    sample_fn: Callable[[nn.Module], torch.Tensor]
    # (micro_batch, rank, world_size, start_batch) -> iterator of (uint8 images, labels)
    data_fn: Callable[[int, int, int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class TrainResult:
    step: int
    preempted: bool
    seconds: float
    final_loss: float | None
    export_dir: Path | None
    params_trainable: int
    params_total: int


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier as a pure function of the optimizer step (so resume needs no scheduler state)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    micro = cfg.batch_size // (cfg.grad_accum * world_size)
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": on_gpu},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class _PreemptionFlag:
    """Signal handlers only set a flag; the loop acts on it at a step boundary, on all ranks together."""

    CHECK_EVERY = 10

    def __init__(self):
        self.raised = False
        self._old = {}
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self, dist: DistInfo, step: int) -> bool:
        if dist.world_size == 1:
            return self.raised
        # Agreeing costs an all-reduce and a host sync; every CHECK_EVERY steps is well inside SLURM's signal
        # lead time and keeps the per-step path free of syncs.
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.raised)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_training(task: TrainTask, cfg: TrainConfig, out_dir: Path, *, logging: LoggingConfig, run_name: str,
                 group: str, run_config: dict, export_meta: dict) -> TrainResult:
    import deepspeed

    t_start = time.time()
    out_dir = Path(out_dir)
    dist = init_distributed()
    _seed_all(cfg.seed)  # the same initial weights on every rank
    model = task.make_model().to(dist.device)
    _seed_all(cfg.seed * 1000 + dist.rank)  # then a different noise stream per rank
    on_gpu = dist.device.type == "cuda"
    # A parameter trains when the stage wants it and the model has not frozen it itself (LoRA's base weights).
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and task.trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and task.trainable(n))
    optimizer = torch.optim.AdamW([p for _, p in named_trainable], lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay, fused=on_gpu or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dist.world_size, on_gpu))
    ema = EMA(named_trainable, cfg.ema_decay)
    ckpts = CheckpointManager(out_dir / "checkpoints", cfg.keep_ckpts, dist.is_main)

    step = 0
    resumed = ckpts.load(engine)
    if resumed is not None:
        step, client = resumed
        ema.load_state_dict(client["ema"])
        _set_rng_state(client["rng"][dist.rank])
        if dist.is_main:
            console.print(f"[green]resuming[/green] {out_dir.name} from checkpoint step {step}")
    log = MetricsLogger(out_dir, logging, enabled=dist.is_main, run_name=run_name, group=group,
                        config=run_config, resume_step=step)

    micro = cfg.batch_size // (cfg.grad_accum * dist.world_size)
    data = task.data_fn(micro, dist.rank, dist.world_size, step * cfg.grad_accum)
    flag = _PreemptionFlag()

    def save(at_step: int) -> None:
        # RNG states differ per rank; every rank's is gathered so each resumes its own stream.
        rng = [None] * dist.world_size
        torch.distributed.all_gather_object(rng, _rng_state())
        ckpts.save(engine, at_step, {"step": at_step, "ema": ema.state_dict(), "rng": rng})

    def sample_grid(at_step: int) -> None:
        with ema.swapped_in():
            images = task.sample_fn(engine.module)
        if dist.is_main:
            path = save_grid(images, out_dir / "samples" / f"step{at_step:08d}.png")
            log.log_image(at_step, "samples", path)

    # Summed on the device between log lines (no host sync per step): the loss and its named parts.
    sums: dict[str, torch.Tensor] = {}
    n_loss, data_wait, t_interval, last_loss = 0, 0.0, time.time(), None
    preempted = False
    engine.train()
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            t0 = time.time()
            images, labels = next(data)
            data_wait += time.time() - t0
            x = to_float(images.to(dist.device, non_blocking=True))
            loss, parts = task.loss_fn(engine, x, labels.to(dist.device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            for name, value in {**parts, "loss": loss.detach()}.items():
                sums[name] = sums[name] + value.float() if name in sums else value.float()
            n_loss += 1
        step += 1
        ema.update()

        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.time() - t_interval
            means = dict(zip(sums, (torch.stack(list(sums.values())) / n_loss).tolist()))  # one host sync
            last_loss = means["loss"]
            grad_norm = engine.get_global_grad_norm()
            log.log(step, {
                **means,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "img_per_s": n_loss * micro * dist.world_size / elapsed,
                "data_wait": data_wait / elapsed,
            })
            sums.clear()
            n_loss, data_wait, t_interval = 0, 0.0, time.time()
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
            sample_grid(step)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(step)
        # A signal during the last step changes nothing: the run is complete and goes on to its export.
        if step < cfg.steps and flag.agreed(dist, step):
            if step % cfg.ckpt_every:
                save(step)
            preempted = True
            break
    flag.restore()

    export_dir = None
    if not preempted:
        sample_grid(step)
        export_dir = export_weights(engine, ema, out_dir / "export", dist.is_main, meta=export_meta)
    log.close()
    if dist.is_main and log.path.exists():
        plot_metrics(log.path, out_dir / "curves.png")
    def numel(p):  # ZeRO-3 leaves an empty local tensor and keeps the full size in ds_numel
        return getattr(p, "ds_numel", p.numel())

    return TrainResult(step=step, preempted=preempted, seconds=time.time() - t_start, final_loss=last_loss,
                       export_dir=export_dir, params_trainable=sum(numel(p) for _, p in named_trainable),
                       params_total=sum(numel(p) for p in model.parameters()))
