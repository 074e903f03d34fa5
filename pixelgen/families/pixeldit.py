"""PixelDiT / DiT: a patch-level diffusion trunk (noised pixels in), with REPA where configured."""

from pixelgen.families.base import FlowFamily
from pixelgen.models.config import Init
from pixelgen.models.trunk import PatchTrunk


class PixelDiT(FlowFamily):
    kind = "pixeldit"
    inits = tuple(Init)

    def trunk(self, model_cfg, trunk, *, pretrained):
        return PatchTrunk(patch_size=trunk.patch_size, dim=trunk.dim, depth=trunk.depth, heads=trunk.heads,
                          mlp_ratio=trunk.mlp_ratio, num_classes=model_cfg.num_classes,
                          activation_checkpointing=trunk.activation_checkpointing, init=model_cfg.init)


FAMILY = PixelDiT()
