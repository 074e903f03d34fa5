"""The pixel-space generator: a patch-level trunk plus a pixel-level decoder (PixelDiT)."""

import torch.nn as nn

from .decoder import PiTDecoder
from .trunk import PatchTrunk


class PixelGenerator(nn.Module):
    """Velocity network for rectified flow on pixels.

    forward(x_BCHW, t_B, y_B) -> velocity_BCHW, with t in [0, 1] (1 = data, 0 = pure noise) and y in
    [0, num_classes] (num_classes = the null class). The output layers are zero-initialised, so an untrained
    model predicts exactly zero. The decoder training stage freezes `.trunk` (which also holds the t/y embedders).
    """

    def __init__(self, trunk: PatchTrunk, decoder: PiTDecoder, *, num_classes: int, resolution: int):
        super().__init__()
        self.trunk = trunk
        self.decoder = decoder
        self.num_classes = num_classes
        self.null_class = num_classes
        self.resolution = resolution

    def forward(self, x_BCHW, t_B, y_B):
        _, cond_BLD = self.trunk(x_BCHW, t_B, y_B)
        return self.decoder(x_BCHW, cond_BLD)
