"""Representation alignment losses against frozen DINO teachers: REPA (the trunk's projected hidden state vs
DINOv2's patch tokens of the clean image) and method A's student loss (the DINO student's patch tokens of the
noisy image vs the frozen teacher's of the clean image). Both are negative cosines, averaged over tokens.

The teachers live here, outside the generator: they are never trained, saved, or handed to the optimizer.
"""

from __future__ import annotations

import torch

from pixelgen.models.config import ModelConfig


class AlignmentLosses:
    """Callable (features, x0) -> {name: (weight, loss)}; falsy when no term is active."""

    def __init__(self, model_cfg: ModelConfig, resolution: int, device):
        from pixelgen.families import get  # the families say which terms they train with
        from pixelgen.models.teachers import DinoTeacher, create_dino, neg_cosine  # imports timm

        self._neg_cosine = neg_cosine
        self.device = torch.device(device)
        p = model_cfg.trunk.patch_size
        self.grid = (resolution // p, resolution // p)
        self.terms: list[tuple[str, str, float, DinoTeacher]] = []  # (log name, feature key, weight, teacher)
        for name, feature, weight, teacher_cfg, key in get(model_cfg.trunk.kind).alignment_terms(model_cfg):
            teacher = DinoTeacher(create_dino(teacher_cfg, key=key)).to(self.device)
            self.terms.append((name, feature, weight, teacher))

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __call__(self, features: dict, x0_BCHW: torch.Tensor) -> dict[str, tuple[float, torch.Tensor]]:
        out = {}
        for name, key, weight, teacher in self.terms:
            # The teacher runs in bf16 on the GPU like the rest of training; its targets need no more precision.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                target_BLD = teacher(x0_BCHW, self.grid)
            out[name] = (weight, self._neg_cosine(features[key], target_BLD))
        return out
