"""Methods B and C: a causal semantic AR over patches (discrete over a k-means dictionary of teacher features, or
continuous), then a pixel AR (B) or a per-patch diffusion head (C) inside each patch. The objective and the
sampler live in pixelgen.ar; this module says how the stages use them."""

from __future__ import annotations

import time

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from pixelgen.ar import ARObjective, build_dictionary, generate, needs_teacher
from pixelgen.families.base import Family, StageContext, trains_any_stage
from pixelgen.io import atomic_write
from pixelgen.models import pixel_decoder
from pixelgen.models.ar_generator import ARGenerator, PatchDiffusionHead
from pixelgen.models.config import ObjectiveConfig, end_to_end
from pixelgen.models.decoder import KINDS as PIXEL_DECODERS
from pixelgen.models.pixel_ar import CONTEXTS, OUTPUTS, PixelARDecoder
from pixelgen.models.semantic_ar import DICTIONARIES, MODES, TARGETS
from pixelgen.models.semantic_ar import SemanticAR as SemanticARTrunk
from pixelgen.models.teachers import TEACHERS
from pixelgen.precision import autocast
from pixelgen.progress import console

DICTIONARY_FILE = "dictionary.safetensors"


class SemanticAR(Family):
    kind = "semantic_ar"
    decoder_kinds = (*PIXEL_DECODERS, "pixel_ar")  # pit/mlp/mixer: a MAR-style diffusion head per patch (method C)
    plot_keys = ("semantic_ce", "semantic_mse", "codebook_mse", "bits_per_dim", "diffusion_loss")

    # ------------------------------------------------------------------------------------------- config
    def check(self, model_cfg, trunk, dec, fail):
        super().check(model_cfg, trunk, dec, fail)
        ar = trunk.ar
        choices = {"trunk.ar.mode": (ar.mode, MODES), "trunk.ar.target": (ar.target, TARGETS),
                   "trunk.ar.dictionary": (ar.dictionary, DICTIONARIES),
                   "decoder.pixel_ar.output": (dec.pixel_ar.output, OUTPUTS),
                   "decoder.pixel_ar.context": (dec.pixel_ar.context, CONTEXTS)}
        for key, (value, known) in choices.items():
            if value not in known:
                fail(key, value, f"must be one of {', '.join(known)}")
        if ar.mode == "discrete" and ar.target != "teacher":
            fail("trunk.ar.target", ar.target, "the discrete mode's dictionary comes from the teacher: use target=teacher")
        if ar.mode == "continuous" and ar.dictionary != "kmeans":
            fail("trunk.ar.dictionary", ar.dictionary, "only the discrete mode has a dictionary: remove the key")
        if ar.mode == "discrete" and ar.dict_size < 2:
            fail("trunk.ar.dict_size", ar.dict_size, "must be at least 2 (the published setting is 4096)")
        if ar.kmeans_images < 1 or ar.kmeans_iters < 1:
            fail("trunk.ar.kmeans_images", ar.kmeans_images, "kmeans_images and kmeans_iters must be positive")
        if ar.z_dim <= 0:
            fail("trunk.ar.z_dim", ar.z_dim, "must be positive")
        if ar.teacher.name not in TEACHERS:
            fail("trunk.ar.teacher.name", ar.teacher.name, f"must be one of {', '.join(TEACHERS)}")
        if dec.pixel_ar.mixtures < 1:
            fail("decoder.pixel_ar.mixtures", dec.pixel_ar.mixtures, "must be at least 1")
        if model_cfg.repa.weight > 0:
            fail("repa.weight", model_cfg.repa.weight, "REPA aligns a diffusion trunk; the semantic AR learns the "
                 "teacher's features directly: set model.repa.weight=0")
        if dec.kind == "pixel_ar" and (dec.pixel_dim % dec.heads or (dec.pixel_dim // dec.heads) % 4):
            fail("decoder.heads", dec.heads,
                 f"must divide the pixel AR's width model.decoder.pixel_dim={dec.pixel_dim} into heads of a multiple of 4")

    def check_experiment(self, cfg, fail):
        ar = cfg.model.trunk.ar
        if ar.mode == "discrete":
            patches = (cfg.data.resolution // cfg.model.trunk.patch_size) ** 2
            if ar.kmeans_images * patches < ar.dict_size:
                fail("model.trunk.ar.kmeans_images", ar.kmeans_images,
                     f"k-means needs at least dict_size={ar.dict_size} features and each image gives {patches}: "
                     f"use at least {-(-ar.dict_size // patches)} images")

    def teachers(self, cfg):
        if trains_any_stage(cfg) and needs_teacher(cfg.model):  # its targets, in both training stages
            return [("model.trunk.ar.teacher", cfg.model.trunk.ar.teacher)]
        return []

    # ------------------------------------------------------------------------------------------ network
    def build(self, model_cfg, trunk, dec, resolution, *, pretrained):
        p = trunk.patch_size
        grid = (resolution // p, resolution // p)
        ar, z_dim = trunk.ar, z_width(model_cfg)
        semantic = SemanticARTrunk(patch_size=p, grid=grid, dim=trunk.dim, depth=trunk.depth, heads=trunk.heads,
                                   mlp_ratio=trunk.mlp_ratio, num_classes=model_cfg.num_classes, mode=ar.mode,
                                   dict_size=ar.dict_size, z_dim=z_dim, learned_dictionary=ar.dictionary == "learned",
                                   activation_checkpointing=trunk.activation_checkpointing)
        if dec.kind == "pixel_ar":
            decoder = PixelARDecoder(patch_size=p, grid=grid, z_dim=z_dim, dim=dec.pixel_dim, depth=dec.depth,
                                     heads=dec.heads, mlp_ratio=dec.mlp_ratio, output=dec.pixel_ar.output,
                                     mixtures=dec.pixel_ar.mixtures, context=dec.pixel_ar.context,
                                     activation_checkpointing=dec.activation_checkpointing)
        else:
            decoder = PatchDiffusionHead(pixel_decoder(p, trunk, dec), z_dim=z_dim, dim=trunk.dim)
        return ARGenerator(semantic, decoder, num_classes=model_cfg.num_classes, resolution=resolution)

    # ----------------------------------------------------------------------------------------- training
    def prepare(self, ctx: StageContext):
        """The discrete AR's dictionary: k-means over the teacher's patch features of a sample of the training
        set, computed once by rank 0 and kept next to the stage's checkpoints (a restarted stage reads it back),
        then carried in the model's weights. The decoder stage gets it with the trunk's weights."""
        if ctx.stage != "train_trunk" or ctx.cfg.model.trunk.ar.mode != "discrete":
            return None
        entries = load_file(_dictionary(ctx))["dictionary"]

        def init(model):
            with torch.no_grad():
                model.trunk.dictionary.copy_(entries)

        return init

    def trainable(self, cfg, stage):
        # The trunk stage trains the semantic AR alone, unless z is learned through the decoder.
        if stage == "train_trunk" and not end_to_end(cfg.model.trunk.ar):
            return lambda name: name.startswith("trunk.")
        return super().trainable(cfg, stage)

    def loss(self, cfg, stage, model_cfg, device):
        train_semantic = stage == "train_trunk" or not cfg.train_decoder.freeze_trunk
        train_decoder = stage == "train_decoder" or end_to_end(cfg.model.trunk.ar)  # end to end: no other target
        return ARObjective(model_cfg, cfg.objective, cfg.data.resolution, device, train_semantic=train_semantic,
                           train_decoder=train_decoder).loss

    def sampler(self, cfg, sampler_cfg=None):
        sampler_cfg = cfg.sampler if sampler_cfg is None else sampler_cfg

        def draw(model, y, g):
            with autocast(sampler_cfg.precision, y.device):  # logits and velocities are taken in fp32
                return generate(model, y, sampler_cfg, objective=cfg.objective, generator=g).images

        return draw

    def trace_loss(self, model_cfg, resolution):
        # Both levels, as a decoder stage with the trunk unfrozen trains them; a stand-in of the teacher's shape
        # gives the targets (teachers are not counted).
        stand_in = None
        if needs_teacher(model_cfg):
            tokens, width = (resolution // model_cfg.trunk.patch_size) ** 2, z_width(model_cfg)
            stand_in = lambda x0: torch.randn(x0.shape[0], tokens, width, dtype=torch.float32)  # noqa: E731
        return ARObjective(model_cfg, ObjectiveConfig(), resolution, "cpu", train_semantic=True, train_decoder=True,
                           teacher=stand_in).loss


def z_width(model_cfg) -> int:
    """The width of the semantic AR's z: the teacher's feature width, or trunk.ar.z_dim without a teacher."""
    ar = model_cfg.trunk.ar
    return ar.z_dim if end_to_end(ar) else TEACHERS[ar.teacher.name].dim


def _dictionary(ctx: StageContext):
    cfg, dist = ctx.cfg, ctx.dist
    path = ctx.stage_dir / DICTIONARY_FILE
    if dist.is_main and not path.is_file():
        ar = cfg.model.trunk.ar
        t0 = time.time()
        images = ctx.train_images(min(64, ar.kmeans_images), cfg.train_trunk.seed + 1)
        with console.status(f"dictionary: teacher features of {ar.kmeans_images} images, k-means into "
                            f"{ar.dict_size} entries"):
            entries = build_dictionary(OmegaConf.to_object(cfg.model), cfg.data.resolution, images, dist.device,
                                       seed=cfg.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"dictionary": entries.contiguous()}, tmp))
        console.print(f"dictionary: {ar.dict_size} entries from {ar.kmeans_images} images in "
                      f"{time.time() - t0:.1f} s -> {path}", soft_wrap=True)
    if dist.world_size > 1:
        torch.distributed.barrier()
    return path


FAMILY = SemanticAR()
