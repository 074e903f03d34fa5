"""The registry of model families: one object per trunk kind (pixelgen.families.base.Family) that builds the
generator and owns the stage's loss, the sampler, what a stage trains, any preparation, the plotted metrics and
the memory trace. Adding a family is one module here plus one line in FAMILIES.

    from pixelgen import families
    family = families.get(cfg.model.trunk.kind)
    model = families.build_generator(model_cfg, resolution)
"""

from __future__ import annotations

from pixelgen.families import dino_student, jit, pixeldit, semantic_ar
from pixelgen.families.base import Family, StageContext, trunk_trains
from pixelgen.models import check_networks, resolve_size
from pixelgen.models.config import DecoderConfig, ModelConfig, TrunkConfig

FAMILIES: dict[str, Family] = {f.kind: f for f in (pixeldit.FAMILY, dino_student.FAMILY, semantic_ar.FAMILY,
                                                   jit.FAMILY)}
KINDS = tuple(FAMILIES)


def get(kind: str) -> Family:
    if kind not in FAMILIES:
        raise ValueError(f"key 'model.trunk.kind' = {kind!r}: must be one of {', '.join(KINDS)}")
    return FAMILIES[kind]


def check_model_config(model_cfg: ModelConfig, resolution: int) -> tuple[TrunkConfig, DecoderConfig]:
    """Every cross-field check of the model keys; raises ValueError naming the key. Returns the resolved configs."""
    trunk, dec = resolve_size(model_cfg)

    def fail(key, value, why):
        raise ValueError(f"key 'model.{key}' = {value!r}: {why}")

    family = get(trunk.kind)
    if dec.kind not in family.decoder_kinds:
        takers = [f.kind for f in FAMILIES.values() if dec.kind in f.decoder_kinds]
        why = (f"the {dec.kind} decoder needs trunk kind {' or '.join(takers)}: set model.trunk.kind={takers[0]}"
               if takers else f"must be one of {', '.join(family.decoder_kinds)}")
        fail("decoder.kind", dec.kind, why)
    check_networks(model_cfg, trunk, dec, resolution, fail)
    family.check(model_cfg, trunk, dec, fail)
    return trunk, dec


def build_generator(model_cfg: ModelConfig, resolution: int, *, pretrained: bool = True):
    """The family's generator. `pretrained=False` skips loading teacher weights into a DINO student (for weights
    loaded on top)."""
    trunk, dec = check_model_config(model_cfg, resolution)
    return get(trunk.kind).build(model_cfg, trunk, dec, resolution, pretrained=pretrained)


__all__ = ["FAMILIES", "KINDS", "Family", "StageContext", "build_generator", "check_model_config", "get",
           "trunk_trains"]
