"""JiT: a plain ViT on pixel patches predicting the clean image (x-prediction, trained with the v-loss), its output
layer the `linear` decoder; the whole network trains end to end in the trunk stage."""

from pixelgen.families.base import FlowFamily
from pixelgen.models.config import Init
from pixelgen.models.jit import JiTTrunk


class JiT(FlowFamily):
    kind = "jit"
    decoder_kinds = ("linear",)
    inits = tuple(Init)  # JiT's published init is pixelgen's own: xavier with zero biases, then DiT's inits

    def check(self, model_cfg, trunk, dec, fail):
        super().check(model_cfg, trunk, dec, fail)
        jit = trunk.jit
        if jit.bottleneck <= 0:
            fail("trunk.jit.bottleneck", jit.bottleneck, "must be positive (published: 128 for B and L, 256 for H, G)")
        if jit.context_tokens < 0:
            fail("trunk.jit.context_tokens", jit.context_tokens, "must be >= 0 (0 = no in-context class tokens)")
        if jit.context_tokens and not 0 <= jit.context_start < trunk.depth:
            fail("trunk.jit.context_start", jit.context_start,
                 f"must be a block index in 0..{trunk.depth - 1} (model.trunk.depth={trunk.depth})")
        if not 0.0 <= jit.dropout < 1.0:
            fail("trunk.jit.dropout", jit.dropout, "must be in [0, 1)")

    def check_experiment(self, cfg, fail):
        if "train_decoder" in cfg.stages:
            fail("stages", list(cfg.stages), "JiT trains end to end in train_trunk (its decoder is its output "
                                             "layer): remove train_decoder")

    def trunk(self, model_cfg, trunk, *, pretrained):
        jit = trunk.jit
        return JiTTrunk(patch_size=trunk.patch_size, dim=trunk.dim, depth=trunk.depth, heads=trunk.heads,
                        mlp_ratio=trunk.mlp_ratio, num_classes=model_cfg.num_classes, bottleneck=jit.bottleneck,
                        context_tokens=jit.context_tokens, context_start=jit.context_start, dropout=jit.dropout,
                        activation_checkpointing=trunk.activation_checkpointing)


FAMILY = JiT()
