"""What a model family is: everything the stages, the config checks, the plots and the memory estimator need to
know about one trunk kind, in one object. `pipeline/stages.py` asks the registry (`pixelgen.families`) and never
tests a family's name.

`Family` holds the parts the families share (the decoder stage's freezing, the plotted basics); `FlowFamily`
is the diffusion trunks' common ground (flow matching + REPA, the ODE samplers, `PixelGenerator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from pixelgen.alignment import AlignmentLosses
from pixelgen.diffusion import FlowMatching, sample
from pixelgen.engine.dist import DistInfo
from pixelgen.models import pixel_generator
from pixelgen.models.config import DecoderConfig, Init, ModelConfig, ObjectiveConfig, TeacherConfig, TrunkConfig
from pixelgen.models.decoder import KINDS as PIXEL_DECODERS
from pixelgen.models.teachers import TEACHERS
from pixelgen.precision import autocast

# (model, x_float_BCHW, y_B) -> (loss, {name: detached scalar tensor}), as pixelgen.engine.train.TrainTask takes it
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# (model, labels_B, generator) -> images [B, 3, H, W] in [-1, 1]
DrawFn = Callable[[nn.Module, torch.Tensor, Optional[torch.Generator]], torch.Tensor]
Fail = Callable[[str, object, str], None]  # fail(key below model., value, why) raises naming the key
TRAIN_STAGES = ("train_trunk", "train_decoder")


@dataclass
class StageContext:
    """What a family's preparation may use: the experiment config, the stage's folder, the ranks, and the
    training images (float [-1, 1] batches of `batch` images, shuffled with `seed`)."""

    cfg: object  # the experiment config (OmegaConf, typed by pipeline.config.ExperimentConfig)
    stage: str
    stage_dir: Path
    dist: DistInfo
    train_images: Callable[[int, int], Iterator[torch.Tensor]]  # (batch, seed) -> batches


def trunk_trains(cfg, stage: str) -> bool:
    """The trunk trains in this stage: the trunk stage, or the decoder stage with freeze_trunk=false."""
    return stage == "train_trunk" or (stage == "train_decoder" and not cfg.train_decoder.freeze_trunk)


def trains_any_stage(cfg) -> bool:
    return bool(set(cfg.stages) & set(TRAIN_STAGES))


def trunk_trains_anywhere(cfg) -> bool:
    return any(trunk_trains(cfg, s) for s in TRAIN_STAGES if s in cfg.stages)


class Family:
    kind: str = ""
    decoder_kinds: tuple[str, ...] = ()
    # The model.init values its networks implement; `published` initialises them as the family's official code
    # does (PixelDiT's: only its embedding and zero inits, PyTorch's default for every other Linear).
    inits: tuple[str, ...] = (Init.pixelgen,)
    # Metric keys worth a panel in curves.png (those a run never logs are left out), after the total loss.
    plot_keys: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------- config
    def check(self, model_cfg: ModelConfig, trunk: TrunkConfig, dec: DecoderConfig, fail: Fail) -> None:
        """The family's own cross-field checks of the model keys (the generic ones ran before); a family's
        override calls this one too."""
        if model_cfg.init not in self.inits:
            fail("init", str(model_cfg.init), f"trunk kind {self.kind} implements only {' | '.join(self.inits)} "
                 f"(published follows a family's official code, and {self.kind} has none to follow): "
                 f"set model.init={self.inits[0]}")

    def check_experiment(self, cfg, fail: Callable[[str, object, str], None]) -> None:
        """Checks that need more of the experiment than the model keys; `fail(full key, value, why)`."""

    def teachers(self, cfg) -> list[tuple[str, TeacherConfig]]:
        """(config key, teacher) of each frozen teacher the configured stages load, whose weights must exist."""
        return []

    def alignment_terms(self, model_cfg: ModelConfig) -> list[tuple[str, str, float, TeacherConfig, str]]:
        """(log name, feature key, weight, teacher, teacher's config key) of each alignment loss the model's
        features are trained with while the trunk trains (pixelgen.alignment)."""
        return []

    # ------------------------------------------------------------------------------------------ network
    def build(self, model_cfg: ModelConfig, trunk: TrunkConfig, dec: DecoderConfig, resolution: int, *,
              pretrained: bool) -> nn.Module:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- training
    def prepare(self, ctx: StageContext) -> Optional[Callable[[nn.Module], None]]:
        """Work a training stage does before its model exists (k-means for a dictionary); returns what to do
        to each freshly built model, or None."""
        return None

    def trainable(self, cfg, stage: str) -> Callable[[str], bool]:
        """Parameter name -> does it train in this stage. The decoder stage trains the decoder, and the trunk
        too unless frozen (a frozen trunk also freezes whatever serves it, like REPA's projector)."""
        if stage == "train_decoder" and cfg.train_decoder.freeze_trunk:
            return lambda name: name.startswith("decoder.")
        return lambda name: True

    def lr_of(self, cfg, stage: str) -> Optional[Callable[[str], float]]:
        """Parameter name -> its base learning rate (None: the stage's lr for all)."""
        if stage != "train_decoder":
            return None
        tc = cfg.train_decoder
        trunk_lr = tc.trunk_lr if tc.trunk_lr is not None else tc.lr
        return lambda name: tc.lr if name.startswith("decoder.") else trunk_lr

    def loss(self, cfg, stage: str, model_cfg: ModelConfig, device) -> LossFn:
        raise NotImplementedError

    def sampler(self, cfg, sampler_cfg=None) -> DrawFn:
        """Images for labels with `sampler_cfg` (default: the config's sampler), the network under
        `sampler_cfg.precision`."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- memory estimation
    def trace_loss(self, model_cfg: ModelConfig, resolution: int) -> LossFn:
        """The training loss the memory estimator traces on fake tensors (no teacher is built: teachers are
        not counted)."""
        raise NotImplementedError


class FlowFamily(Family):
    """Diffusion trunks (PixelDiT and the DINO student): a PixelGenerator trained by flow matching, REPA where
    configured, sampled by the ODE samplers with CFG."""

    decoder_kinds = (*PIXEL_DECODERS, "linear")
    plot_keys = ("fm_loss", "repa_loss")

    def check(self, model_cfg, trunk, dec, fail):
        super().check(model_cfg, trunk, dec, fail)
        repa = model_cfg.repa
        if repa.weight > 0:
            if repa.teacher.name not in TEACHERS:
                fail("repa.teacher.name", repa.teacher.name, f"must be one of {', '.join(TEACHERS)}")
            if not 1 <= repa.block <= trunk.depth:
                fail("repa.block", repa.block, f"must be a trunk block between 1 and model.trunk.depth={trunk.depth}")

    def teachers(self, cfg):
        if cfg.model.repa.weight > 0 and trunk_trains_anywhere(cfg):
            return [("model.repa.teacher", cfg.model.repa.teacher)]
        return []

    def alignment_terms(self, model_cfg):
        if model_cfg.repa.weight > 0:
            return [("repa_loss", "repa", model_cfg.repa.weight, model_cfg.repa.teacher, "model.repa.teacher")]
        return []

    def trunk(self, model_cfg: ModelConfig, trunk: TrunkConfig, *, pretrained: bool) -> nn.Module:
        raise NotImplementedError

    def build(self, model_cfg, trunk, dec, resolution, *, pretrained):
        return pixel_generator(model_cfg, self.trunk(model_cfg, trunk, pretrained=pretrained), trunk, dec, resolution)

    def _objective(self, cfg):
        return FlowMatching(cfg.objective, cfg.model.num_classes, cfg.model.class_dropout)

    def loss(self, cfg, stage, model_cfg, device):
        objective = self._objective(cfg)
        alignment = AlignmentLosses(model_cfg, cfg.data.resolution, device) if trunk_trains(cfg, stage) else None
        return lambda m, x, y: objective.loss(m, x, y, alignment=alignment)

    def sampler(self, cfg, sampler_cfg=None):
        sampler_cfg = cfg.sampler if sampler_cfg is None else sampler_cfg
        objective = self._objective(cfg)
        shape = (3, cfg.data.resolution, cfg.data.resolution)

        def draw(model, y, g):
            with autocast(sampler_cfg.precision, y.device):
                return sample(model, y, shape=shape, cfg=sampler_cfg, num_classes=cfg.model.num_classes,
                              generator=g, objective=objective)

        return draw

    def trace_loss(self, model_cfg, resolution):
        objective = FlowMatching(ObjectiveConfig(), model_cfg.num_classes, model_cfg.class_dropout)
        return objective.loss
