"""The pixel-space generator: a patch-level trunk plus a pixel-level decoder, and REPA's projector."""

from typing import Optional

import torch.nn as nn


def repa_projector(dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's token-wise 3-layer MLP from the trunk width to the teacher's width."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


class PixelGenerator(nn.Module):
    """forward(x_BCHW, t_B, y_B) -> the network's prediction [B, 3, H, W] (a velocity or x0, as the objective
    says), with t in [0, 1] (1 = data, 0 = pure noise) and y in [0, num_classes] (num_classes = the null class).
    The output layers are zero-initialised, so an untrained model predicts exactly zero.

    With `return_features=True` it returns (prediction, features): "repa" = the projected hidden state of trunk
    block `repa_block` (when a projector exists), "student" = the DINO student's patch tokens (dino_student).
    The decoder stage trains `.decoder` only; `.trunk` holds the t/y embedders and `.projector` serves the trunk.
    """

    def __init__(self, trunk: nn.Module, decoder: nn.Module, *, num_classes: int, resolution: int,
                 projector: Optional[nn.Module] = None, repa_block: Optional[int] = None):
        super().__init__()
        self.trunk = trunk
        self.decoder = decoder
        self.projector = projector
        self.repa_block = repa_block
        self.num_classes = num_classes
        self.null_class = num_classes
        self.resolution = resolution

    def forward(self, x_BCHW, t_B, y_B, return_features: bool = False):
        capture = self.repa_block if return_features and self.projector is not None else None
        trunk_out = self.trunk(x_BCHW, t_B, y_B, capture_block=capture)
        pred_BCHW = self.decoder(x_BCHW, trunk_out.cond, trunk_out.tokens)
        if not return_features:
            return pred_BCHW
        features = {}
        if trunk_out.hidden is not None:
            features["repa"] = self.projector(trunk_out.hidden)
        if trunk_out.student is not None:
            features["student"] = trunk_out.student
        return pred_BCHW, features
