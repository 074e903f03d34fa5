"""Frozen DINO teachers (REPA's DINOv2-B/14, the DINOv3-S/16 of the DINO student), built with timm and loaded from
local files, and the negative-cosine alignment loss."""

import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TeacherConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    dim: int  # width of the patch tokens
    patch_size: int
    source: str  # where its weights come from (machines here have no internet: the file is fetched beforehand)


# Known without building the model (and without importing timm), so configs are checked cheaply.
TEACHERS = {
    "vit_base_patch14_dinov2": TeacherSpec(768, 14, "timm/vit_base_patch14_dinov2.lvd142m (model.safetensors), "
                                                    "or Meta's dinov2_vitb14_pretrain.pth"),
    "vit_small_patch16_dinov3": TeacherSpec(384, 16, "timm/vit_small_patch16_dinov3.lvd1689m (model.safetensors), "
                                                     "or Meta's dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
}


def check_weights(cfg: TeacherConfig, key: str) -> None:
    """The teacher's weights file is set and exists (or random init is allowed); `key` is its config path, named
    in the error. The pipeline calls this before anything is submitted, create_dino again when it builds."""
    if cfg.weights is None and not cfg.allow_random_init:
        raise ValueError(
            f"key '{key}.weights' is not set for {cfg.name}: set it to a local weights file, e.g. "
            f"{TEACHERS[cfg.name].source} downloaded from the Hugging Face hub or Meta on a machine with "
            f"internet (see README, 'DINO weights'). ({key}.allow_random_init exists for tests only: a random "
            f"teacher teaches nothing.)")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise FileNotFoundError(f"key '{key}.weights' = {cfg.weights!r}: file does not exist ({cfg.name})")


def create_dino(cfg: TeacherConfig, *, pretrained: bool = True, key: str = "teacher") -> nn.Module:
    """The timm DINO encoder `cfg.name` without a head, accepting any image size (a multiple of its patch).

    pretrained=False gives random weights and reads no file (for a model whose weights are loaded on top).
    `key`: the config path of `cfg`, named in errors."""
    if cfg.name not in TEACHERS:
        raise ValueError(f"unknown {key}.name {cfg.name!r}; supported: {', '.join(TEACHERS)}")
    if pretrained:
        check_weights(cfg, key)
    import timm  # slow to import; only where a teacher is built

    model = timm.create_model(cfg.name, pretrained=False, num_classes=0, dynamic_img_size=True,
                              **({"depth": cfg.depth} if cfg.depth else {}))
    if pretrained and cfg.weights is not None:
        load_dino_weights(model, cfg.weights)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            sd = safetensors.torch.load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read teacher weights {path}: {type(e).__name__}: {e}") from e
    # Meta's releases and timm's files are bare state dicts; training checkpoints wrap them.
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"teacher weights {path} hold no state dict of tensors (got {type(sd).__name__})")
    return sd


def _drop_zero_qkv_bias(sd: dict[str, torch.Tensor], model_keys: set[str], path: Path) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 files carry qkv biases that timm's models without qkv bias do not have (the q and v parts are
    zero in the distilled models; the k part is masked to zero by the file's bias_mask). eva's checkpoint_filter_fn
    drops them with a print per block, and would drop nonzero ones just as quietly: check and drop them here."""
    if any(k.endswith(("attn.qkv.bias", "attn.q_bias")) for k in model_keys):
        return sd
    biases = {k: v for k, v in sd.items() if k.endswith("attn.qkv.bias")}
    nonzero = [k for k, v in biases.items() if v.chunk(3)[0].any() or v.chunk(3)[2].any()]
    if nonzero:
        raise ValueError(f"teacher weights {path} have nonzero qkv biases ({nonzero[0]}, ...) that this timm model "
                         f"has no parameter for; use a file made for this model")
    return {k: v for k, v in sd.items() if k not in biases}


def load_dino_weights(model: nn.Module, path) -> None:
    """Load a timm-format file (.safetensors, or a torch checkpoint) strictly; a file in the original release's
    format (Meta's .pth) is converted with the checkpoint_filter_fn of the timm module defining the model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file {path} does not exist")
    sd = _read_state_dict(path)
    model_keys = set(model.state_dict())
    if set(sd) != model_keys:
        filter_fn = sys.modules[type(model).__module__].checkpoint_filter_fn  # vision_transformer or eva
        sd = _drop_zero_qkv_bias(sd, model_keys, path)
        try:
            sd = filter_fn(sd, model)
        except Exception as e:
            raise ValueError(f"teacher weights {path} are neither in timm's format for {type(model).__name__} nor "
                             f"convertible from the original release ({type(e).__name__}: {e})") from e
    missing, unexpected = sorted(model_keys - set(sd)), sorted(set(sd) - model_keys)
    if missing or unexpected:
        raise ValueError(
            f"teacher weights {path} do not fit the model ({len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}): check that teacher.name names the model the file "
            f"was made for (and teacher.depth is unset), and use timm's model.safetensors or Meta's original .pth")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"teacher weights {path} do not fit the model: {e}") from e


def dino_normalize(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Generator images in [-1, 1] -> DINO's input: [0, 1], then ImageNet mean/std."""
    mean = x_BCHW.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = x_BCHW.new_tensor(IMAGENET_STD)[:, None, None]
    return ((x_BCHW + 1) / 2 - mean) / std


class DinoTeacher(nn.Module):
    """A frozen DINO encoder (from `create_dino`): forward(x, grid) -> its normed patch tokens [B, h*w, dim], one per
    generator patch."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        patch = self.encoder.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, tuple) else patch
        self.dim = self.encoder.embed_dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Stays in eval whatever the owning model does: a teacher's output must not depend on the train/eval mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x_BCHW: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        x_BCHW = dino_normalize(x_BCHW)
        size = (h * self.patch_size, w * self.patch_size)
        if x_BCHW.shape[-2:] != size:
            # Bicubic without antialias, as REPA (F.interpolate's default), whose features PixelDiT aligns to:
            # 256 -> 224 for DINOv2-B/14 shrinks by only 1/8, so there is little aliasing to remove.
            x_BCHW = F.interpolate(x_BCHW, size=size, mode="bicubic", align_corners=False)
        tokens = self.encoder.forward_features(x_BCHW)
        return tokens[:, self.encoder.num_prefix_tokens:]


def neg_cosine(pred_BLD: torch.Tensor, target_BLD: torch.Tensor) -> torch.Tensor:
    """REPA's alignment loss: mean over batch and tokens of 1 - cos(pred, target), in fp32 (0 aligned, 2 opposite)."""
    return (1 - F.cosine_similarity(pred_BLD.float(), target_BLD.float(), dim=-1)).mean()
