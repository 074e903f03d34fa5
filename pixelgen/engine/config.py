"""Typed config for one training stage (the engine is shared by the trunk and decoder stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch = micro_batch * grad_accum * world_size
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    zero_stage: int = 2
    # auto: bf16 with fp32 master weights on a GPU, fp32 on the CPU
    precision: str = "auto"
    compile: bool = False  # torch.compile the model (after the first step, which counts its FLOPs)
    # One fp32 EMA per decay; the first is the one sampling, the FID stage and the decoder stage use.
    ema_decays: list[float] = field(default_factory=lambda: [0.9999])
    ckpt_every: int = 500
    keep_ckpts: int = 2
    log_every: int = 50
    sample_every: int = 0  # 0 = a sample grid only at the end
    # Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 20
    peak_tflops: Optional[float] = None  # the device's peak for MFU; None = known GPUs by name, none on a CPU
    seed: int = 0
    # Decoder stage only: where the trunk comes from. None = the train_trunk stage's export in the run folder.
    init_from: Optional[str] = None
    freeze_trunk: bool = True
    trunk_lr: Optional[float] = None  # with freeze_trunk=false: the trunk's own learning rate (None = lr)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled (online needs WANDB_API_KEY in the environment)
    project: str = "pixelgen"
    entity: Optional[str] = None


def batch_split_error(cfg: TrainConfig, ranks: int) -> str | None:
    """Why a stage's global batch cannot be split into `grad_accum` equal micro-batches on each of `ranks` ranks
    (the engine needs equal ones), or None when it can."""
    if cfg.batch_size % (cfg.grad_accum * ranks):
        return f"must be divisible by grad_accum x ranks = {cfg.grad_accum} x {ranks}"
    return None
