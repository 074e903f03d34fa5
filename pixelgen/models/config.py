"""Typed configs for the generator: a patch-level semantic trunk plus a pixel-level decoder, the objective, the
sampler, and the frozen DINO teachers that REPA and the DINO student use."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TeacherConfig:
    """A frozen DINO encoder built with timm and loaded from a local file (machines here have no internet)."""

    # timm model name: vit_base_patch14_dinov2 (DINOv2-B/14, REPA's teacher) | vit_small_patch16_dinov3 (DINOv3-S/16)
    name: str = "vit_base_patch14_dinov2"
    weights: Optional[str] = None  # timm .safetensors, or the original release's .pth (converted on load)
    allow_random_init: bool = False  # tests only: no weights file, random weights
    depth: Optional[int] = None  # tests only: fewer blocks than the published model


@dataclass
class RepaConfig:
    """REPA: align the trunk's hidden state after block `block` with the teacher's patch tokens."""

    weight: float = 0.0  # lambda of the negative-cosine loss; 0 = off (PixelDiT: 0.5)
    block: int = 8  # 1-indexed: the output of the k-th trunk block (PixelDiT-XL: 8)
    projector_dim: Optional[int] = None  # hidden width of the 3-layer SiLU projector; None = trunk dim (PixelDiT)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class StudentConfig:
    """Method A: a DINOv3 encoder, initialised from the teacher, that reads noised pixels plus a time token."""

    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="vit_small_patch16_dinov3"))
    lora_rank: int = 0  # 0 = fine-tune the whole encoder; r > 0 = freeze it and train rank-r LoRA adapters
    align_weight: float = 1.0  # weight of the loss student(x_t, t) ~ teacher(x_0) on patch tokens (negative cosine)


@dataclass
class TrunkConfig:
    # pixeldit: patch-level DiT (RMSNorm, qk-norm, 2D RoPE, SwiGLU, adaLN-Zero)
    # dino_student: the DINOv3 student as input encoder, then `depth` of the same DiT blocks (patch_size 16)
    kind: str = "pixeldit"
    size: Optional[str] = None  # named size from the registry (e.g. "tiny", "B", "L", "XL"); overrides dims
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation_checkpointing: bool = False  # recompute each block in backward instead of storing its activations
    student: StudentConfig = field(default_factory=StudentConfig)  # used by kind dino_student


@dataclass
class DecoderConfig:
    # pit: PixelDiT PiT blocks (AdaLN + attention + per-pixel MLP)
    # mlp: attention-free per-pixel MLP blocks with in-patch DCT position features (DeCo-like)
    # mixer: MLP-mixer blocks, a token-mixing MLP across the pixels of a patch plus a per-pixel MLP
    kind: str = "pit"
    pixel_dim: int = 16
    depth: int = 2
    heads: int = 12
    # pit only. compact: the p*p pixel tokens of a patch compressed to one token, attention across all patches
    # (PixelDiT); pixel: attention among the p*p pixels of each patch
    attention: str = "compact"
    attn_dim: Optional[int] = None  # width inside attention; None = trunk dim (compact) or pixel_dim (pixel)
    mlp_ratio: float = 4.0
    mlp_hidden: Optional[int] = None  # per-pixel MLP width; overrides mlp_ratio when set
    # pixel: a shift/scale/gate for every pixel of a patch, from the patch token (PixelDiT)
    # patch: one shift/scale/gate per patch, shared by its pixels
    # factored: one per-pixel condition embedding for the decoder, a small per-pixel AdaLN in each block (DeCo)
    adaln: str = "pixel"
    activation_checkpointing: bool = False  # recompute each block in backward (pixel activations are large)


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    num_classes: int = 1000  # the null class (for CFG) is index num_classes
    class_dropout: float = 0.1  # probability of replacing the label by the null class in training


@dataclass
class ObjectiveConfig:
    # flow_velocity: the network predicts v = x0 - e (PixelDiT, DeCo)
    # x_pred: the network predicts x0 and is trained with the v-loss through a (1 - t) clamp (JiT)
    kind: str = "flow_velocity"
    t_mean: float = 0.0  # logit-normal timestep sampling: t = sigmoid(N(mean, std)) (JiT: -0.8, 0.8)
    t_std: float = 1.0
    time_shift: float = 1.0
    t_eps: float = 0.05  # x_pred: 1 - t is clamped to at least t_eps, in the loss and when sampling
    noise_scale: float = 1.0  # std of the noise (JiT: 1 at 256 px, 2 at 512)


@dataclass
class SamplerConfig:
    kind: str = "euler"  # euler | heun | ab2 (second-order Adams-Bashforth, PixelDiT's sampler)
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    time_shift: float = 1.0
