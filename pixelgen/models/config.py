"""Typed configs for the generator: a patch-level semantic trunk plus a pixel-level decoder."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrunkConfig:
    kind: str = "pixeldit"  # patch-level DiT trunk (RMSNorm, qk-norm, 2D RoPE, SwiGLU, adaLN-Zero)
    size: Optional[str] = None  # named size from the registry (e.g. "tiny", "B", "L", "XL"); overrides dims
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class DecoderConfig:
    kind: str = "pit"  # PixelDiT PiT blocks: pixel-wise AdaLN + compacted global attention
    pixel_dim: int = 16
    depth: int = 2
    heads: int = 12
    attn_dim: Optional[int] = None  # width of the compacted attention; None = trunk dim
    mlp_ratio: float = 4.0
    activation_checkpointing: bool = False  # recompute PiT blocks in backward (their pixel-wise AdaLN is large)


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    num_classes: int = 1000  # the null class (for CFG) is index num_classes
    class_dropout: float = 0.1  # probability of replacing the label by the null class in training


@dataclass
class ObjectiveConfig:
    kind: str = "flow_velocity"  # rectified flow, velocity target (PixelDiT)
    t_mean: float = 0.0  # logit-normal timestep sampling: t = sigmoid(N(mean, std))
    t_std: float = 1.0
    time_shift: float = 1.0


@dataclass
class SamplerConfig:
    kind: str = "euler"  # euler | heun
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    time_shift: float = 1.0
