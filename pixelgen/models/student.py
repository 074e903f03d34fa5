"""Method A: a DINOv3-S/16 student, initialised from the teacher, reads the noised image x_t plus a time token and
is trained so that DINO_student(x_t, t) ~ DINO_teacher(x_0); its patch tokens then feed the semantic DiT blocks."""

from typing import Optional

import torch
import torch.nn as nn

from .config import StudentConfig
from .layers import TimestepEmbedder, init_linear_xavier, run_block
from .lora import add_lora
from .teachers import create_dino, dino_normalize
from .trunk import SemanticBlocks, TrunkOutput


def _prepend_identity_rotation(rope: torch.Tensor) -> torch.Tensor:
    """timm's DINOv3 RoPE table is [L, 2*head_dim] = cat(sin, cos): a row with sin 0, cos 1 rotates by nothing."""
    sin, cos = rope[..., :1, :].chunk(2, dim=-1)
    return torch.cat([torch.cat([torch.zeros_like(sin), torch.ones_like(cos)], dim=-1), rope], dim=-2)


def eva_patch_tokens(encoder: nn.Module, x_BCHW: torch.Tensor, extra_prefix_BD: Optional[torch.Tensor] = None, *,
                     checkpointing: bool = False) -> torch.Tensor:
    """timm Eva's forward_features, from its own submodules, returning the normed patch tokens [B, h*w, D].

    `extra_prefix_BD` is inserted as one more prefix token after CLS and the registers. Eva's attention rotates
    every token after its first `num_prefix_tokens` (5) by the RoPE table of the patch grid; rather than change that
    count on the attention modules (which would break the encoder's own forward_features), the table gets an
    identity row for the extra token: it is not rotated, and the patch tokens keep their positions.
    """
    x_BLD, rope = encoder._pos_embed(encoder.patch_embed(x_BCHW))  # [CLS, registers, patches], RoPE of the patches
    n_prefix = encoder.num_prefix_tokens
    if extra_prefix_BD is not None:
        x_BLD = torch.cat([x_BLD[:, :n_prefix], extra_prefix_BD[:, None].to(x_BLD.dtype), x_BLD[:, n_prefix:]], 1)
        rope = _prepend_identity_rotation(rope)
        n_prefix += 1
    x_BLD = encoder.norm_pre(x_BLD)
    for block in encoder.blocks:
        x_BLD = run_block(block, x_BLD, rope, checkpointing=checkpointing)
    return encoder.norm(x_BLD)[:, n_prefix:]


class DinoStudentTrunk(nn.Module):
    """DINOv3-S/16 (from the teacher's weights) over x_t with a time token -> `student` patch tokens; a Linear to the
    trunk width; `depth` semantic DiT blocks, where class and time conditioning enter as in PatchTrunk."""

    def __init__(self, *, student: StudentConfig, dim: int, depth: int, heads: int, mlp_ratio: float,
                 num_classes: int, activation_checkpointing: bool = False, pretrained: bool = True):
        super().__init__()
        # pretrained=False: random encoder weights, for a generator whose exported weights are loaded on top.
        self.encoder = create_dino(student.teacher, pretrained=pretrained, key="model.trunk.student.teacher")
        if tuple(self.encoder.patch_embed.patch_size) != (16, 16) or not hasattr(self.encoder, "rope"):
            raise ValueError(f"model.trunk.student.teacher.name {student.teacher.name!r}: the DINO student needs a "
                             f"DINOv3 /16 encoder (vit_small_patch16_dinov3), whose patch grid is the generator's")
        self.patch_size = 16
        self.dim = dim
        self.activation_checkpointing = activation_checkpointing
        encoder_dim = self.encoder.embed_dim
        if student.lora_rank > 0:
            add_lora(self.encoder, student.lora_rank)
        self.t_token = TimestepEmbedder(encoder_dim)
        self.proj = nn.Linear(encoder_dim, dim)
        self.semantic = SemanticBlocks(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                                       num_classes=num_classes, activation_checkpointing=activation_checkpointing)
        self.initialize_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.semantic.blocks

    def initialize_weights(self):
        """Everything but the encoder, whose weights come from the teacher (and LoRA's own init)."""
        init_linear_xavier(self.proj)
        self.semantic.initialize_weights()
        # The time token reaches the blocks only through their LayerNorms, which rescale it whatever its size; its
        # size matters against the residual stream. std 0.02 (DiT's timestep-MLP init, the scale timm gives new
        # CLS/register tokens) makes a token of norm ~1 for D=384, small beside the patch embeddings, whose
        # direction already depends on t (cosine ~0.87 between t=0 and t=1). A zero token would carry no t at
        # first and sit where LayerNorm's Jacobian is 1/sqrt(eps).
        for linear in (self.t_token.mlp[0], self.t_token.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x_BCHW, t_B, y_B, capture_block: Optional[int] = None) -> TrunkOutput:
        p = self.patch_size
        grid = (x_BCHW.shape[-2] // p, x_BCHW.shape[-1] // p)
        student_BLD = eva_patch_tokens(self.encoder, dino_normalize(x_BCHW), self.t_token(t_B),
                                       checkpointing=self.activation_checkpointing)
        tokens, cond, hidden = self.semantic(self.proj(student_BLD), t_B, y_B, grid, capture_block)
        return TrunkOutput(tokens, cond, hidden, student_BLD)
