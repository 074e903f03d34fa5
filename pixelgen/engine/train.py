"""The one training loop, on a DeepSpeed engine, shared by every stage and model family.

A stage hands over a `TrainTask` (model, which parameters train, the loss, how to sample a grid, how to make
the data stream); the loop owns precision, ZeRO, the LR schedule, EMA, checkpoints, resume, preemption,
non-finite steps and logging. The per-step path never waits for the host: losses, skip counters and the
preemption flag are read once per log line.
"""

from __future__ import annotations

import math
import random
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from pixelgen.data import to_float
from pixelgen.engine import faults, flops, preemption
from pixelgen.engine.checkpoint import CheckpointManager, rank_file, tag_for
from pixelgen.engine.config import LoggingConfig, TrainConfig
from pixelgen.engine.dist import DistInfo, init_distributed, peer_lost
from pixelgen.engine.ema import EMA
from pixelgen.engine.export import export_milestone, export_weights
from pixelgen.engine.logger import MetricsLogger, console
from pixelgen.engine.optim import SkippingAdamW, param_groups
from pixelgen.models.layers import attention_report
from pixelgen.precision import autocast, use_bf16
from pixelgen.viz import plot_metrics, save_grid


@dataclass
class TrainTask:
    make_model: Callable[[], nn.Module]  # called after seeding, so the initial weights are reproducible
    trainable: Callable[[str], bool]  # parameter name -> does it train
    # (model, x_float_BCHW, y_B) -> (loss, {name: detached scalar tensor}); the named parts are logged too
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
    # model -> uint8 images [N, 3, H, W] for the sample grid
    sample_fn: Callable[[nn.Module], torch.Tensor]
    # (micro_batch, rank, world_size, start_batch, segments) -> iterator of (uint8 images, labels). `segments`:
    # the rank counts the run trained at, oldest first, as (from_batch, world_size, micro_batch), the last
    # being this run's; one segment when the rank count never changed.
    data_fn: Callable[[int, int, int, int, list[tuple[int, int, int]]], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    # parameter name -> its base learning rate (None: the config's lr for all)
    lr_of: Optional[Callable[[str], float]] = None
    # the loss's named parts that get a panel in curves.png beside the total loss (those never logged are left out)
    loss_terms: tuple[str, ...] = ()
    # True when data_fn carries its position across a change of rank count, given the segments (the shards'
    # loader: pixelgen.data.loader), or its global micro-batch b is the same images at any rank count: then
    # the engine resumes a checkpoint of another rank count. False: it refuses, naming the reason.
    data_any_world: bool = False


@dataclass
class TrainResult:
    step: int
    preempted: bool
    seconds: float
    final_loss: float | None
    export_dir: Path | None
    params_trainable: int
    params_total: int
    skipped_steps: int
    compiled: bool  # torch.compile was in effect (cfg.compile), as DeepSpeed's engine reports it


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier as a pure function of the optimizer step (so resume needs no scheduler state)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def _micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """Images per rank per forward pass: the global batch split over the accumulation steps and the ranks."""
    return cfg.batch_size // (cfg.grad_accum * world_size)


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": _micro_batch(cfg, world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # fp32 master weights in the optimizer, bf16 in the module. DeepSpeed's own overflow check reads the
        # gradient norm on the host every step; SkippingAdamW makes the same decision on the device.
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class PreemptionFlag:
    """Signal handlers only set a flag; the loop acts on it at a step boundary, on all ranks together."""

    CHECK_EVERY = 10

    def __init__(self):
        self.raised = False
        self._old = {}
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        preemption.note(signum)  # first: for the job script, should this rank not get to exit 75
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


class _NonFinite:
    """Device-side counters of skipped steps: the total, the current streak, and the step at which a streak
    first reached the limit (-1: never). Read on the host only at log lines."""

    def __init__(self, device: torch.device, limit: int, total: int = 0):
        self.limit = limit
        self.total = torch.tensor(float(total), device=device)
        self.streak = torch.zeros((), device=device)
        self.tripped_at = torch.full((), -1.0, device=device)

    def record(self, skipped: torch.Tensor, step: int) -> None:
        self.total += skipped
        self.streak = (self.streak + 1) * skipped
        hit = (self.streak >= self.limit) & (self.tripped_at < 0)
        self.tripped_at = torch.where(hit, torch.full_like(self.tripped_at, step), self.tripped_at)


class _Meter:
    """What one log line reports, gathered between lines: device-side loss sums, data wait, step count."""

    def __init__(self):
        self.flops_per_image: float | None = None  # counted in the first step of a fresh run
        self.last_loss: float | None = None
        self.lr = 0.0
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.steps, self.data_wait, self.since = 0, 0, 0.0, time.time()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value.float() if name in self.sums else value.float()
        self.n += 1


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


def _peak_memory_gib(device: torch.device) -> float:
    """Peak since the last call on a GPU (allocated by torch); the process's peak resident size on a CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty local tensor and keeps the full size here


@dataclass
class _Run:
    """What the loop's pieces share: built once by `_setup`, then advanced one optimizer step at a time."""

    task: TrainTask
    cfg: TrainConfig
    out_dir: Path
    dist: DistInfo
    bf16: bool
    model: nn.Module
    named_trainable: list[tuple[str, nn.Parameter]]
    frozen_fp32: dict[str, torch.Tensor]
    engine: Any  # deepspeed.DeepSpeedEngine (deepspeed is imported only when a run starts)
    optimizer: SkippingAdamW
    ema: EMA
    ckpts: CheckpointManager
    micro: int
    log: MetricsLogger
    nonfinite: _NonFinite
    data: Iterator[tuple[torch.Tensor, torch.Tensor]]
    flag: PreemptionFlag
    peak: float | None
    meter: _Meter
    step: int  # optimizer steps done
    segments: list[tuple[int, int, int]]  # (from_batch, world_size, micro_batch): see TrainTask.data_fn

    def autocast(self):
        return autocast(self.cfg.precision, self.dist.device)


def _make_model(task: TrainTask, cfg: TrainConfig, dist: DistInfo):
    """The model on the device, its trainable (name, parameter) pairs and the fp32 values of its frozen ones."""
    _seed_all(cfg.seed)  # the same initial weights on every rank
    model = task.make_model().to(dist.device)
    if dist.is_main:
        for line in attention_report(model):
            console.print(f"[dim]{line}[/dim]")
    _seed_all(cfg.seed * 1000 + dist.rank)  # then a different noise stream per rank
    # A parameter trains when the stage wants it and the model has not frozen it itself (LoRA's base weights).
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and task.trainable(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(p.requires_grad and task.trainable(n))
    # Frozen weights get no fp32 master copy; keep their fp32 values for the export before a bf16 cast.
    frozen_fp32 = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return model, named_trainable, frozen_fp32


def _make_engine(model: nn.Module, named_trainable: list, task: TrainTask, cfg: TrainConfig, dist: DistInfo,
                 bf16: bool):
    """The DeepSpeed engine and the SkippingAdamW it wraps: the loop sets the skip flags on the latter itself."""
    import deepspeed

    lr_of = task.lr_of or (lambda name: cfg.lr)
    optimizer = SkippingAdamW(param_groups(named_trainable, lr_of), betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dist.world_size, bf16))
    return engine, optimizer


def _resume(ckpts: CheckpointManager, engine, ema: EMA, micro: int, dist: DistInfo, out_dir: Path,
            task: TrainTask, seed: int):
    """Load the newest complete checkpoint into the engine, the EMAs and this rank's RNG; return its step and
    client state, or (0, {}) on a fresh start. A checkpoint of another rank count loads when the task's data
    stream allows it (TrainTask.data_any_world): ZeRO shards and EMAs are repartitioned, and each rank's RNG
    is seeded afresh from (seed, step, rank), since the old ranks' streams do not map onto the new ones."""
    resumed = ckpts.load(engine, other_world=task.data_any_world)
    if resumed is None:
        return 0, {}, []
    step, client, own = resumed.step, resumed.client_state, resumed.rank_state
    source = f"checkpoint {ckpts.dir / tag_for(step)}"
    saved = client["data"]
    # The same global micro-batch (micro x ranks images), whatever the rank count: batch_size and grad_accum
    # are unchanged.
    if saved["micro_batch"] * saved.get("world_size", resumed.saved_world) != micro * dist.world_size:
        raise RuntimeError(f"{source} was trained with micro-batches of {saved['micro_batch']} images on each "
                           f"of {resumed.saved_world} ranks, this run has {micro} on each of {dist.world_size} "
                           f"(batch_size / (grad_accum x ranks)): set batch_size and grad_accum back to resume, "
                           f"or move the checkpoints aside")
    # Sharded EMAs are in each rank's own file (joined whole by the checkpoint when the world changed); whole
    # ones (and ZeRO-3 shards of older checkpoints) in the client state.
    ema_state = own.get("ema", client.get("ema"))
    if ema_state is None:
        raise RuntimeError(f"{source} holds no EMA state for rank {dist.rank} ({rank_file(dist.rank)} is "
                           f"missing): move the checkpoint aside to resume from the one before it")
    ema.load_state_dict(ema_state, source)
    changed = resumed.saved_world != dist.world_size
    if changed:
        _seed_all(int(np.random.SeedSequence([seed, step, dist.rank, dist.world_size]).generate_state(1)[0]))
    else:
        _set_rng_state(client["rng"][dist.rank])
    if dist.is_main:
        note = f" (written by {resumed.saved_world} ranks, resumed on {dist.world_size})" if changed else ""
        console.print(f"[green]resuming[/green] {out_dir.name} from checkpoint step {step}{note}")
    segments = [tuple(x) for x in saved.get("segments", [(0, resumed.saved_world, saved["micro_batch"])])]
    if changed:
        segments.append((saved["start_batch"], dist.world_size, micro))
    return step, client, segments


def _setup(task: TrainTask, cfg: TrainConfig, out_dir: Path, *, logging: LoggingConfig, run_name: str,
           group: str, run_config: dict) -> _Run:
    """Everything in the order a bit-identical resume depends on: seeds, model, engine, checkpoint, data."""
    dist = init_distributed()
    bf16 = use_bf16(cfg.precision, dist.device)
    model, named_trainable, frozen_fp32 = _make_model(task, cfg, dist)
    engine, optimizer = _make_engine(model, named_trainable, task, cfg, dist, bf16)
    ema = EMA(named_trainable, cfg.ema_decays, engine)  # of the optimizer's fp32 masters
    ckpts = CheckpointManager(out_dir / "checkpoints", cfg.keep_ckpts, dist.is_main, dist.world_size, dist.rank)
    micro = _micro_batch(cfg, dist.world_size)
    step, client, segments = _resume(ckpts, engine, ema, micro, dist, out_dir, task, cfg.seed)
    segments = segments or [(0, dist.world_size, micro)]
    log = MetricsLogger(out_dir, logging, enabled=dist.is_main, run_name=run_name, group=group,
                        config=run_config, resume_step=step, run_id=client.get("wandb_id"))
    nonfinite = _NonFinite(dist.device, cfg.max_nonfinite_steps, client.get("skipped_steps", 0))
    data = task.data_fn(micro, dist.rank, dist.world_size, client["data"]["start_batch"] if client else 0, segments)
    flag = PreemptionFlag()
    peak = flops.peak_tflops(dist.device, cfg.peak_tflops)
    meter = _Meter()
    # FLOPs are counted in the first step of a fresh run and kept in the checkpoints: counting adds autograd
    # nodes that change the order gradients are summed in, so a resumed run must not count again.
    meter.flops_per_image = client.get("flops_per_image")
    if cfg.compile and meter.flops_per_image is not None:
        engine.compile()
    return _Run(task=task, cfg=cfg, out_dir=out_dir, dist=dist, bf16=bf16, model=model,
                named_trainable=named_trainable, frozen_fp32=frozen_fp32, engine=engine, optimizer=optimizer,
                ema=ema, ckpts=ckpts, micro=micro, log=log, nonfinite=nonfinite, data=data, flag=flag, peak=peak,
                meter=meter, step=step, segments=segments)


def _train_step(run: _Run) -> None:
    """One optimizer step over grad_accum micro-batches; nothing in it waits for the host."""
    cfg, meter, optimizer, engine, device = run.cfg, run.meter, run.optimizer, run.engine, run.dist.device
    loss_bad = torch.zeros((), dtype=torch.bool, device=device)
    # The rate this step applies (the scheduler moves it after the step), of the group trained at `lr`.
    meter.lr = next((g["lr"] for g in optimizer.param_groups if g["initial_lr"] == cfg.lr),
                    optimizer.param_groups[0]["lr"])
    for _ in range(cfg.grad_accum):
        t0 = time.time()
        images, labels = next(run.data)
        meter.data_wait += time.time() - t0
        x = to_float(images.to(device, non_blocking=True))
        with flops.maybe_count(meter.flops_per_image is None) as counter:
            with run.autocast():
                loss, parts = run.task.loss_fn(engine, x, labels.to(device, non_blocking=True))
            loss_bad |= ~torch.isfinite(loss.detach())
            optimizer.loss_nonfinite = loss_bad  # read by the optimizer at the accumulation boundary
            engine.backward(loss)
        if counter is not None:
            meter.flops_per_image = counter.get_total_flops() / run.micro
            if cfg.compile:  # compiled after the count: FlopCounterMode would see through the graph
                engine.compile()
        optimizer.skipped = None
        engine.step()
        meter.add({**parts, "loss": loss.detach()})
    # None: DeepSpeed found a non-finite gradient norm itself (its fp32 and fp16 paths check on the host)
    # and skipped the step without calling the optimizer.
    skipped = optimizer.skipped if optimizer.skipped is not None else torch.ones((), device=device)
    run.nonfinite.record(skipped, run.step + 1)
    run.ema.update(1.0 - skipped)


def _log_interval(run: _Run, step: int) -> None:
    """One log line from what the meter gathered since the last; stops the run on a streak of skipped steps."""
    cfg, meter, dist = run.cfg, run.meter, run.dist
    elapsed = time.time() - meter.since
    # One all-reduce and one host sync per log line: the losses are means over every rank's images (the
    # skip counters are the same on every rank already).
    values = torch.stack([*(s / meter.n for s in meter.sums.values()), run.nonfinite.total,
                          run.nonfinite.tripped_at])
    if dist.world_size > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        values /= dist.world_size
    *means, skipped_total, tripped_at = values.tolist()
    if tripped_at >= 0:
        last = run.ckpts.latest_complete()
        raise NonFiniteError(
            f"{cfg.max_nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient norm (the "
            f"streak reached the limit at step {int(tripped_at)}; {int(skipped_total)} skipped in all); the "
            f"last good checkpoint is {run.ckpts.dir / last[1] if last else 'none (no checkpoint yet)'}. Lower the "
            f"learning rate or raise max_nonfinite_steps, then rerun to resume from it")
    grad_norm = run.engine.get_global_grad_norm()
    img_per_s = meter.n * run.micro * dist.world_size / elapsed
    metrics = {
        **dict(zip(meter.sums, means)),
        "lr": meter.lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "img_per_s": img_per_s,
        "step_time_s": elapsed / meter.steps,
        "data_wait": meter.data_wait / elapsed,
        "peak_mem_gib": _peak_memory_gib(dist.device),
        "skipped_steps": int(skipped_total),
    }
    if run.peak and meter.flops_per_image:
        metrics["mfu"] = meter.flops_per_image * img_per_s / (run.peak * 1e12 * dist.world_size)
    run.log.log(step, metrics, total_steps=cfg.steps)
    meter.last_loss = metrics["loss"]
    meter.reset()


def _sample_grid(run: _Run, step: int) -> None:
    with run.ema.swapped_in(), run.autocast():
        images = run.task.sample_fn(run.engine.module)
    if run.dist.is_main:
        path = save_grid(images, run.out_dir / "samples" / f"step{step:08d}.png")
        run.log.log_image(step, "samples", path)


def _save(run: _Run, step: int) -> None:
    # RNG states differ per rank; every rank's is gathered so each resumes its own stream.
    rng = [None] * run.dist.world_size
    torch.distributed.all_gather_object(rng, _rng_state())
    skipped = int(run.nonfinite.total.item())
    ema = run.ema.state_dict()
    run.ckpts.save(run.engine, step, {
        "step": step, "rng": rng, "wandb_id": run.log.run_id,
        "data": {"start_batch": step * run.cfg.grad_accum, "micro_batch": run.micro,
                 "world_size": run.dist.world_size, "segments": [list(x) for x in run.segments]},
        "skipped_steps": skipped, "flops_per_image": run.meter.flops_per_image,
        **({} if run.ema.sharded else {"ema": ema})},
        rank_state={"ema": ema} if run.ema.sharded else None)  # each rank's own shards in its own file


def _finish(run: _Run, preempted: bool, export_meta: dict) -> Path | None:
    """A complete run's last grid and its export (a preempted one has neither); then the log and its curves."""
    export_dir = None
    if not preempted:
        _sample_grid(run, run.step)
        export_dir = export_weights(run.engine, run.ema, run.frozen_fp32, run.out_dir / "export", run.dist.is_main,
                                    meta={**export_meta, "step": run.step})
    run.log.close()
    if run.dist.is_main and run.log.path.exists():
        plot_metrics(run.log.path, run.out_dir / "curves.png", loss_terms=run.task.loss_terms)
    return export_dir


def run_training(task: TrainTask, cfg: TrainConfig, out_dir: Path, *, logging: LoggingConfig, run_name: str,
                 group: str, run_config: dict, export_meta: dict) -> TrainResult:
    import deepspeed  # noqa: F401  imported before the clock starts: `seconds` times the run, not the import

    t_start = time.time()
    run = _setup(task, cfg, Path(out_dir), logging=logging, run_name=run_name, group=group, run_config=run_config)
    preempted = False
    try:
        run.engine.train()
        while run.step < cfg.steps:
            _train_step(run)
            run.step += 1
            run.meter.steps += 1
            step = run.step
            faults.point("step", step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                _log_interval(run, step)
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                _sample_grid(run, step)
            # Before the checkpoint of the same step: a run resumed from that checkpoint never exports it again.
            if cfg.keep_every and step % cfg.keep_every == 0:
                export_milestone(run.engine, run.ema, run.frozen_fp32, run.out_dir, step, run.dist.is_main,
                                 meta={**export_meta, "step": step})
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                _save(run, step)
            # A signal during the last step changes nothing: the run is complete and goes on to its export.
            if step < cfg.steps and run.flag.agreed(run.dist, step):
                if step % cfg.ckpt_every:
                    _save(run, step)
                preempted = True
                break
    except BaseException as err:
        run.log.close()
        lost = peer_lost(err, run.dist.rank)
        if lost:
            raise RuntimeError(lost) from err
        raise
    finally:
        run.flag.restore()

    export_dir = _finish(run, preempted, export_meta)
    return TrainResult(step=run.step, preempted=preempted, seconds=time.time() - t_start,
                       final_loss=run.meter.last_loss, export_dir=export_dir,
                       params_trainable=sum(_numel(p) for _, p in run.named_trainable),
                       params_total=sum(_numel(p) for p in run.model.parameters()),
                       skipped_steps=int(run.nonfinite.total.item()), compiled=run.engine.is_compiled)
