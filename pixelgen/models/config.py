"""Typed configs for the generator: a patch-level semantic trunk plus a pixel-level decoder, the objective, the
sampler, and the frozen DINO teachers that REPA and the DINO student use."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Optional

from pixelgen.precision import Precision

Fail = Callable[[str, object, str], None]  # fail(full key, value, why) raises naming the key


# The choices of the keys below. OmegaConf rejects any other value when a config is merged, naming the key; the
# members' names are their values, so YAML, saved run configs and config hashes read as the plain strings.
class ARMode(StrEnum):
    discrete = "discrete"
    continuous = "continuous"


class ARTarget(StrEnum):
    teacher = "teacher"
    end_to_end = "end_to_end"


class Dictionary(StrEnum):
    kmeans = "kmeans"
    learned = "learned"


class PixelAROutput(StrEnum):
    categorical = "categorical"
    logistic = "logistic"


class PixelARContext(StrEnum):
    none = "none"
    prev = "prev"
    window = "window"


class DecoderKind(StrEnum):
    pit = "pit"
    mlp = "mlp"
    mixer = "mixer"
    linear = "linear"
    pixel_ar = "pixel_ar"


class AttentionKind(StrEnum):
    compact = "compact"
    pixel = "pixel"


class AdaLNKind(StrEnum):
    pixel = "pixel"
    patch = "patch"
    factored = "factored"


class NormKind(StrEnum):
    rms = "rms"
    layer = "layer"


class ActivationKind(StrEnum):
    gelu = "gelu"
    silu = "silu"


class DCTKind(StrEnum):
    pixelgen = "pixelgen"
    deco = "deco"


class ObjectiveKind(StrEnum):
    flow_velocity = "flow_velocity"
    x_pred = "x_pred"


class SamplerKind(StrEnum):
    euler = "euler"
    heun = "heun"
    ab2 = "ab2"
    ab2_variable = "ab2_variable"


class Guidance(StrEnum):
    z = "z"
    semantic = "semantic"
    decoder = "decoder"
    both = "both"


class CFGSchedule(StrEnum):
    constant = "constant"
    linear = "linear"


class Init(StrEnum):
    pixelgen = "pixelgen"
    published = "published"


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
class SemanticARConfig:
    """Methods B and C, first level: a causal transformer over the patches (raster order, class token first) that
    predicts the semantic condition z of the next patch."""

    # discrete: logits over a dictionary of `dict_size` teacher features (k-means), z = the chosen entry
    # continuous: z is a feature regressed to the teacher's (target teacher) or learned through the decoder
    mode: ARMode = ARMode.discrete
    target: ARTarget = ARTarget.teacher  # continuous only: teacher | end_to_end (no teacher; z_dim wide, trained by the decoder)
    dict_size: int = 4096
    # kmeans: the dictionary is k-means of teacher features, fixed | learned: initialised the same way, then
    # trained: a codebook loss pulls each entry toward the features assigned to it (VQ-VAE), and where the
    # decoder trains too its loss reaches the entries through z
    dictionary: Dictionary = Dictionary.kmeans
    kmeans_images: int = 1000  # training images whose teacher patch features the trunk stage clusters
    kmeans_iters: int = 25
    z_dim: int = 64  # end_to_end only; otherwise z has the teacher's width
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(name="vit_small_patch16_dinov3"))


def end_to_end(ar: SemanticARConfig) -> bool:
    """The continuous AR without a teacher: z is its own output, trained through the decoder's loss."""
    return ar.mode == "continuous" and ar.target == "end_to_end"


@dataclass
class JiTConfig:
    """JiT's trunk (kind jit): published per size as B/16 (128, 32, 4), L/16 (128, 32, 8), H/16 (256, 32, 10, 0.2),
    G/16 (256, 32, 10, 0.2): see configs/jit_*.yaml."""

    bottleneck: int = 128  # width of the bottleneck patch embedding (p x p x 3 -> bottleneck -> dim)
    context_tokens: int = 32  # in-context class tokens (0 = none)
    context_start: int = 4  # 0-based block they join before
    dropout: float = 0.0  # in the middle half of the blocks, attention and MLP (H, G: 0.2)


@dataclass
class TrunkConfig:
    # pixeldit: patch-level DiT (RMSNorm, qk-norm, 2D RoPE, SwiGLU, adaLN-Zero)
    # dino_student: the DINOv3 student as input encoder, then `depth` of the same DiT blocks (patch_size 16)
    # semantic_ar: causal transformer over patches, the semantic level of methods B and C (`ar`)
    # jit: JiT's plain ViT on pixel patches (`jit`), with decoder kind linear and objective x_pred
    kind: str = "pixeldit"
    size: Optional[str] = None  # named size from the registry (e.g. "tiny", "B", "L", "XL"); overrides dims
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    activation_checkpointing: bool = False  # recompute each block in backward instead of storing its activations
    student: StudentConfig = field(default_factory=StudentConfig)  # used by kind dino_student
    ar: SemanticARConfig = field(default_factory=SemanticARConfig)  # used by kind semantic_ar
    jit: JiTConfig = field(default_factory=JiTConfig)  # used by kind jit


@dataclass
class PixelARConfig:
    """Method B, second level: causal over the pixels of a patch (raster order), conditioned on z."""

    output: PixelAROutput = PixelAROutput.categorical  # categorical: 256-way per channel, channel-autoregressive | logistic: mixture
    mixtures: int = 10  # logistic only: components per channel (PixelCNN++)
    # Already generated pixels the decoder also sees: none | prev (the left neighbour, none in the first column) |
    # window (left, up-left, up and up-right neighbours)
    context: PixelARContext = PixelARContext.none


@dataclass
class DecoderConfig:
    # pit: PixelDiT PiT blocks (AdaLN + attention + per-pixel MLP)
    # mlp: attention-free per-pixel MLP blocks with in-patch DCT position features (DeCo-like)
    # mixer: MLP-mixer blocks, a token-mixing MLP across the pixels of a patch plus a per-pixel MLP
    # linear: one AdaLN-modulated Linear from each patch's trunk token to its pixels (JiT's output layer; DiT's)
    # pixel_ar: causal transformer over the pixels of a patch (method B; widths pixel_dim, depth, heads)
    # With trunk kind semantic_ar, pit/mlp/mixer denoise each patch as a MAR-style diffusion head (method C).
    kind: DecoderKind = DecoderKind.pit
    pixel_dim: int = 16
    depth: int = 2
    heads: int = 12
    # pit only. compact: the p*p pixel tokens of a patch compressed to one token, attention across all patches
    # (PixelDiT); pixel: attention among the p*p pixels of each patch
    attention: AttentionKind = AttentionKind.compact
    attn_dim: Optional[int] = None  # width inside attention; None = trunk dim (compact) or pixel_dim (pixel)
    mlp_ratio: float = 4.0
    mlp_hidden: Optional[int] = None  # per-pixel MLP width; overrides mlp_ratio when set
    # pixel: a shift/scale/gate for every pixel of a patch, from the patch token (PixelDiT)
    # patch: one shift/scale/gate per patch, shared by its pixels
    # factored: one per-pixel condition embedding for the decoder, a small per-pixel AdaLN in each block (DeCo)
    adaln: AdaLNKind = AdaLNKind.pixel
    # The decoder blocks' norms. rms: RMSNorm with a weight, the one before the output layer too | layer: LayerNorm
    # with weight and bias in the blocks, and without either before the output layer (DeCo's)
    norm: NormKind = NormKind.rms
    activation: ActivationKind = ActivationKind.gelu  # of the decoder blocks' MLPs: exact GELU | silu (DeCo's)
    # mlp only: the in-patch position features. pixelgen: the 2D DCT-II basis at pixel centres, min(p, 8)^2 of
    # them | deco: DeCo's 64 for any patch size (frequencies linspace(0, 8, 8) over positions linspace(0, 1, p),
    # damped by 1 / (1 + f_x f_y)), which its checkpoints were trained with
    dct: DCTKind = DCTKind.pixelgen
    activation_checkpointing: bool = False  # recompute each block in backward (pixel activations are large)
    pixel_ar: PixelARConfig = field(default_factory=PixelARConfig)  # used by kind pixel_ar


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    num_classes: int = 1000  # the null class (for CFG) is index num_classes
    class_dropout: float = 0.1  # probability of replacing the label by the null class in training
    # pixelgen: every Linear xavier with zero bias, then DiT's inits | published: as the family's official code
    init: Init = Init.pixelgen


@dataclass
class ObjectiveConfig:
    # flow_velocity: the network predicts v = x0 - e (PixelDiT, DeCo)
    # x_pred: the network predicts x0 and is trained with the v-loss through a (1 - t) clamp (JiT)
    kind: ObjectiveKind = ObjectiveKind.flow_velocity
    t_mean: float = 0.0  # logit-normal timestep sampling: t = sigmoid(N(mean, std)) (JiT: -0.8, 0.8)
    t_std: float = 1.0
    time_shift: float = 1.0
    t_eps: float = 0.05  # x_pred: 1 - t is clamped to at least t_eps, in the loss and when sampling
    noise_scale: float = 1.0  # std of the noise (JiT: 1 at 256 px, 2 at 512)
    diffusion_batch_mul: int = 4  # AR + diffusion: noise draws per patch and step (MAR)
    # Semantic AR families: the decoder trains on this many random patches of each image (0 = all of them);
    # its cost per image is linear in it, and at 256 patches per ImageNet image all of them rarely pay off.
    decoder_patches: int = 0
    semantic_weight: float = 1.0  # semantic AR: weight of its loss when it trains with the decoder


@dataclass
class SamplerConfig:
    # euler | heun | ab2: second-order Adams-Bashforth, PixelDiT's sampler as published (1.5 v - 0.5 v_prev on
    # every step, even where time_shift makes the steps unequal) | ab2_variable: the same with the coefficients
    # of the actual step sizes (second order under any time_shift; equal to ab2 at time_shift 1)
    kind: SamplerKind = SamplerKind.euler
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    time_shift: float = 1.0
    # Semantic AR families (methods B and C). Which condition the unconditional branch removes:
    # z: the decoder's prediction given z from the AR with the class vs with the null class (cfg_scale)
    # semantic: the AR's logits (or continuous z) mixed before the decoder (semantic_cfg_scale)
    # decoder: the decoder given z vs its learned null condition (cfg_scale)
    # both: semantic (semantic_cfg_scale), then decoder (cfg_scale)
    guidance: Guidance = Guidance.z
    semantic_cfg_scale: float = 1.0
    cfg_schedule: CFGSchedule = CFGSchedule.constant  # constant | linear: 1 + (scale - 1) * (patches so far) / patches (MAR)
    temperature: float = 1.0  # decoder level: divides the pixel logits, or scales the diffusion head's noise
    semantic_temperature: float = 1.0  # divides the dictionary logits (discrete)
    top_k: int = 0  # discrete: sample among the k most likely entries (0 = all)
    kv_cache: bool = True
    # The network under bf16 autocast (auto: on a GPU); the ODE state, guidance and sampling arithmetic stay fp32.
    # fp32 for checks.
    precision: Precision = Precision.auto


def check_objective(o: ObjectiveConfig, fail: Fail) -> None:
    if o.decoder_patches < 0:
        fail("objective.decoder_patches", o.decoder_patches, "must be >= 0 (0 = every patch)")
    if o.diffusion_batch_mul < 1:
        fail("objective.diffusion_batch_mul", o.diffusion_batch_mul, "must be at least 1")
    for key in ("t_std", "t_eps", "noise_scale", "time_shift"):
        if getattr(o, key) <= 0:
            fail(f"objective.{key}", getattr(o, key), "must be positive")


def check_sampler(s: SamplerConfig, fail: Fail, key: str = "sampler") -> None:
    if s.steps <= 0:
        fail(f"{key}.steps", s.steps, "must be positive")
    if len(s.cfg_interval) != 2 or not 0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1:
        fail(f"{key}.cfg_interval", list(s.cfg_interval), "must be [low, high] with 0 <= low <= high <= 1")
    for name in ("temperature", "semantic_temperature"):
        if getattr(s, name) <= 0:
            fail(f"{key}.{name}", getattr(s, name), "must be positive (1 = the model's distribution)")
    if s.top_k < 0:
        fail(f"{key}.top_k", s.top_k, "must be >= 0 (0 = all entries)")
