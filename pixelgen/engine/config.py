"""Typed config for one training stage (the engine is shared by the trunk and decoder stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Optional

from pixelgen.precision import Precision


class LRSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"  # after the warmup, down to 0 at `steps`


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"  # needs WANDB_API_KEY in the environment
    disabled = "disabled"


Fail = Callable[[str, object, str], None]  # fail(full key, value, why) raises naming the key


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global batch = micro_batch * grad_accum * world_size
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.constant
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    zero_stage: int = 2
    precision: Precision = Precision.auto  # auto: bf16 with fp32 master weights on a GPU, fp32 on the CPU
    compile: bool = False  # torch.compile the model (after the first step, which counts its FLOPs)
    # One fp32 EMA per decay; the first is the one sampling, the FID stage and the decoder stage use.
    ema_decays: list[float] = field(default_factory=lambda: [0.9999])
    ckpt_every: int = 500
    keep_ckpts: int = 2
    # Every this many steps the weights (model and each EMA) are also exported to milestones/step<N>/, which the
    # rolling deletion of checkpoints never touches: FID at 80/160/320 epochs afterwards. 0 = none.
    keep_every: int = 0
    log_every: int = 50
    sample_every: int = 0  # 0 = a sample grid only at the end
    # Steps with a non-finite loss or gradient norm are skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 20
    peak_tflops: Optional[float] = None  # the device's peak for MFU; None = known GPUs by name, none on a CPU
    seed: int = 0


@dataclass
class DecoderTrainConfig(TrainConfig):
    """The decoder stage's keys: the engine's, plus where the trunk comes from and whether it trains."""

    init_from: Optional[str] = None  # an exported generator .safetensors; None = the train_trunk stage's export
    freeze_trunk: bool = True
    trunk_lr: Optional[float] = None  # with freeze_trunk=false: the trunk's own learning rate (None = lr)


@dataclass
class LoggingConfig:
    wandb: WandbMode = WandbMode.offline
    project: str = "pixelgen"
    entity: Optional[str] = None


def batch_split_error(cfg: TrainConfig, ranks: int) -> str | None:
    """Why a stage's global batch cannot be split into `grad_accum` equal micro-batches on each of `ranks` ranks
    (the engine needs equal ones), or None when it can."""
    if cfg.batch_size % (cfg.grad_accum * ranks):
        return f"must be divisible by grad_accum x ranks = {cfg.grad_accum} x {ranks}"
    return None


def check_train(tc: TrainConfig, key: str, fail: Fail) -> None:
    """A training stage's own cross-field checks; `key` is the stage (train_trunk, train_decoder)."""
    if tc.steps <= 0:
        fail(f"{key}.steps", tc.steps, "must be positive")
    if tc.zero_stage not in (0, 1, 2, 3):
        fail(f"{key}.zero_stage", tc.zero_stage, "must be 0, 1, 2 or 3")
    decays = list(tc.ema_decays)
    if not decays or not all(0.0 <= d < 1.0 for d in decays) or len(set(decays)) != len(decays):
        fail(f"{key}.ema_decays", decays, "must be a non-empty list of distinct decays in [0, 1)")
    if tc.max_nonfinite_steps < 1:
        fail(f"{key}.max_nonfinite_steps", tc.max_nonfinite_steps, "must be at least 1")
    if tc.ckpt_every <= 0 or tc.keep_ckpts < 1:
        fail(f"{key}.ckpt_every", tc.ckpt_every, "ckpt_every must be positive and keep_ckpts >= 1")
    if tc.keep_every < 0:
        fail(f"{key}.keep_every", tc.keep_every, "must be >= 0 (0 = no milestones)")


def check_decoder_train(tc: DecoderTrainConfig, key: str, fail: Fail) -> None:
    check_train(tc, key, fail)
    if tc.trunk_lr is not None and tc.freeze_trunk:
        fail(f"{key}.trunk_lr", tc.trunk_lr, "only the decoder stage with freeze_trunk=false trains the trunk at "
             f"its own learning rate: remove the key or set {key}.freeze_trunk=false")
