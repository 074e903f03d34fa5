"""Objective and samplers of the semantic-AR families (method B: + pixel AR, method C: + per-patch diffusion),
kept apart from the networks (pixelgen/models/ar_generator.py).

Training is teacher-forced at both levels. The semantic AR learns the next patch's semantic target from the
frozen DINO teacher: its dictionary index (discrete, cross-entropy) or its feature (continuous, regression);
the decoder learns each patch's pixels given the ground-truth z of that patch (the dictionary entry or the
teacher feature), so the two levels train independently. Continuous `end_to_end` has no teacher: z is the
AR's own output and the decoder's loss trains both.

Sampling goes patch by patch in raster order: the AR (with a KV cache) gives z for the next patch, the decoder
turns z into the patch's pixels, and the patch becomes the AR's next input. Guidance (`sampler.guidance`):
- z: pred(. | z_null) + s (pred(. | z_c) - pred(. | z_null)), z_c from the AR with the class, z_null with the
  null class, both fed the same generated patches (cfg_scale);
- semantic: the AR's logits (or continuous z) mixed the same way before the decoder (semantic_cfg_scale);
- decoder: the decoder given z vs its learned null condition (cfg_scale);
- both: semantic, then decoder.
"pred" is the decoder's logits per channel (pixel AR) or its velocity (diffusion). A scale of 1 is the
conditional model and skips the unconditional branch. MAR's linear schedule raises each scale from ~1 at the
first patch to its value at the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from pixelgen.diffusion import FlowMatching, sample
from pixelgen.models.config import CFGSchedule, Guidance, ModelConfig, ObjectiveConfig, SamplerConfig, end_to_end
from pixelgen.models.pixel_ar import to_pixels
from pixelgen.models.semantic_ar import kmeans
from pixelgen.noise import Generator, categorical, randn

GUIDANCE, CFG_SCHEDULES = tuple(Guidance), tuple(CFGSchedule)


def needs_teacher(model_cfg: ModelConfig) -> bool:
    ar = model_cfg.trunk.ar
    return ar.mode == "discrete" or ar.target == "teacher"


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond): scale 1 is the conditional prediction, 0 the unconditional."""
    return uncond + scale * (cond - uncond)


def scale_at(scale: float, schedule: str, step: int, steps: int) -> float:
    """The guidance scale at AR step `step` (0-based) of `steps`: constant, or MAR's linear schedule
    1 + (scale - 1) * (tokens known after this step) / steps."""
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (step + 1) / steps
    return scale


def sample_index(logits: torch.Tensor, temperature: float, top_k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row of logits [N, V] at `temperature` among the `top_k` largest (0 = all); returns
    (index [N], its log-probability under the distribution drawn from [N])."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = F.log_softmax(logits, dim=-1)
    idx = categorical(logp.exp(), generator)
    return idx[:, 0], logp.gather(-1, idx)[:, 0]


class SemanticTeacher:
    """The frozen DINO teacher's patch features on the generator's patch grid, each token layer-normalised (no
    affine) so the dictionary, the regression target and the decoder's z share one scale. Outside the model:
    never trained, saved, or handed to the optimizer."""

    def __init__(self, model_cfg: ModelConfig, resolution: int, device):
        from pixelgen.models.teachers import DinoTeacher, create_dino  # imports timm

        self.device = torch.device(device)
        p = model_cfg.trunk.patch_size
        self.grid = (resolution // p, resolution // p)
        cfg = model_cfg.trunk.ar.teacher
        # A random stand-in teacher (allow_random_init, tests) must be the same network wherever it is built:
        # the dictionary and the training targets come from two instances.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            encoder = create_dino(cfg, key="model.trunk.ar.teacher")
        self.teacher = DinoTeacher(encoder).to(self.device)

    @torch.no_grad()
    def __call__(self, x0_BCHW: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            f = self.teacher(x0_BCHW, self.grid)
        return F.layer_norm(f.float(), (f.shape[-1],))


@torch.no_grad()
def build_dictionary(model_cfg: ModelConfig, resolution: int, batches: Iterable[torch.Tensor], device,
                     seed: int = 0) -> torch.Tensor:
    """k-means over the teacher features of `kmeans_images` training images (float [-1, 1] batches):
    the discrete semantic AR's dictionary [dict_size, teacher dim]."""
    ar = model_cfg.trunk.ar
    teacher = SemanticTeacher(model_cfg, resolution, device)
    feats, seen = [], 0
    for x in batches:
        x = x[: ar.kmeans_images - seen].to(device)
        feats.append(teacher(x).flatten(0, 1))
        seen += x.shape[0]
        if seen >= ar.kmeans_images:
            break
    feats = torch.cat(feats)
    if feats.shape[0] < ar.dict_size:
        raise ValueError(f"key 'model.trunk.ar.dict_size' = {ar.dict_size}: k-means over {seen} images gives only "
                         f"{feats.shape[0]} patch features; raise model.trunk.ar.kmeans_images or lower dict_size")
    g = torch.Generator().manual_seed(seed)
    return kmeans(feats, ar.dict_size, ar.kmeans_iters, g).cpu()


class ARObjective:
    """loss(model, x0, y) for a training stage: the semantic AR's loss (train_semantic), the decoder's
    (train_decoder), or both (a decoder stage with the trunk unfrozen). Class dropout (the null class) trains
    the AR's unconditional branch; the same probability replaces z by the decoder's null condition."""

    def __init__(self, model_cfg: ModelConfig, objective_cfg: ObjectiveConfig, resolution: int, device, *,
                 train_semantic: bool, train_decoder: bool, teacher=None):
        """`teacher`: x0 -> targets [B, L, D] in place of the frozen DINO teacher (the memory estimator's
        stand-in); default: the teacher the config names, where the objective needs one."""
        ar = model_cfg.trunk.ar
        self.mode, self.end_to_end = ar.mode, end_to_end(ar)
        self.learned_dictionary = ar.mode == "discrete" and ar.dictionary == "learned"
        self.train_semantic, self.train_decoder = train_semantic, train_decoder
        self.flow = FlowMatching(objective_cfg, model_cfg.num_classes, model_cfg.class_dropout)
        self.cfg = objective_cfg
        if teacher is None and needs_teacher(model_cfg):
            teacher = SemanticTeacher(model_cfg, resolution, device)
        self.teacher = teacher

    def loss(self, model, x0_BCHW, y_B, generator=None):
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the generator
        B, device = x0_BCHW.shape[0], x0_BCHW.device
        L = module.trunk.num_patches
        feats = self.teacher(x0_BCHW) if self.teacher is not None else None  # [B, L, Dt]
        # z from the AR itself where there is no target (end_to_end) or where the decoder trains the AR with it.
        z_from_trunk = self.train_decoder and (self.end_to_end or (self.mode == "continuous" and self.train_semantic))
        y_in = self.flow.drop_labels(y_B, generator)
        kwargs = {}
        if self.train_decoder:
            # The decoder learns from `decoder_patches` random patches of each image (all when 0).
            n = self.cfg.decoder_patches if 0 < self.cfg.decoder_patches < L else L
            sel = None if n == L else torch.rand(B, L, device=device, generator=generator).argsort(dim=1)[:, :n]
            drop = torch.rand(B * n, device=device, generator=generator) < self.flow.class_dropout
            kwargs.update(drop=drop, patches=sel)
            if module.method == "diffusion":
                p, mul = module.patch_size, self.cfg.diffusion_batch_mul
                x0_N = rearrange(x0_BCHW, "b c (h p1) (w p2) -> b (h w) c p1 p2", p1=p, p2=p)
                if sel is not None:
                    x0_N = x0_N[torch.arange(B, device=device)[:, None], sel]
                x0_N = x0_N.flatten(0, 1).repeat(mul, 1, 1, 1)
                t = self.flow.sample_t(x0_N.shape[0], device, generator)
                e = torch.randn(x0_N.shape, device=device, dtype=x0_N.dtype, generator=generator) * self.cfg.noise_scale
                x_t, v_target = self.flow.interpolate(x0_N, e, t)
                kwargs.update(x_t=x_t, t=t)
        out = model(x0_BCHW, y_in, semantic=self.train_semantic, decoder=self.train_decoder, features=feats,
                    z_from_trunk=z_from_trunk, **kwargs)
        loss = x0_BCHW.new_zeros((), dtype=torch.float32)
        logs = {}
        if self.train_semantic and not self.end_to_end:
            s = out["semantic"].float()
            if self.mode == "discrete":
                term = F.cross_entropy(s.flatten(0, 1), out["targets"].flatten())
                logs["semantic_ce"] = term.detach()
                if self.learned_dictionary:  # VQ-VAE's codebook loss: each used entry moves toward its features
                    codebook = F.mse_loss(out["entries"].float(), feats)
                    logs["codebook_mse"] = codebook.detach()
                    term = term + codebook
            else:
                term = F.mse_loss(s, feats)
                logs["semantic_mse"] = term.detach()
            loss = loss + (self.cfg.semantic_weight if self.train_decoder else 1.0) * term
        if self.train_decoder:
            if module.method == "diffusion":
                term = self.flow.velocity_loss(out["pred"], x_t, t, x0_N, v_target)
                logs["diffusion_loss"] = term.detach()
            else:
                term = -out["logp"].mean()  # nats per sub-pixel
                logs["bits_per_dim"] = term.detach() / math.log(2)
            loss = loss + term
        logs["loss"] = loss.detach()
        return loss, logs


@dataclass
class ARSamples:
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    indices: Optional[torch.Tensor]  # [B, L] the dictionary entries drawn (discrete), else None
    logprob: torch.Tensor  # [B] the sum of the log-probabilities of every discrete draw (indices and pixels)


def _diffusion_sampler(cfg: SamplerConfig) -> SamplerConfig:
    # The head's own ODE: the sampler's kind, steps and time shift; guidance is applied by the caller.
    return SamplerConfig(kind=cfg.kind, steps=cfg.steps, time_shift=cfg.time_shift, cfg_scale=1.0)


@torch.no_grad()
def generate(model, y_B: torch.Tensor, cfg: SamplerConfig, *, objective: ObjectiveConfig,
             generator: Generator = None, kv_cache: bool | None = None) -> ARSamples:
    """Sample images class-conditionally, patch by patch. `kv_cache` overrides cfg.kv_cache (None: the config's):
    without it every step runs the whole prefix again, with the same result."""
    trunk, dec = model.trunk, model.decoder
    use_cache = cfg.kv_cache if kv_cache is None else kv_cache
    B, device = y_B.shape[0], y_B.device
    L, p, (gh, gw) = trunk.num_patches, trunk.patch_size, trunk.grid
    sem_guided = cfg.guidance in ("semantic", "both") and cfg.semantic_cfg_scale != 1.0
    z_guided = cfg.guidance == "z" and cfg.cfg_scale != 1.0
    dec_guided = cfg.guidance in ("decoder", "both") and cfg.cfg_scale != 1.0
    two_ar = sem_guided or z_guided  # the AR also runs with the null class, on the same patches
    ys = torch.cat([y_B, torch.full_like(y_B, model.null_class)]) if two_ar else y_B
    flow = FlowMatching(objective, model.num_classes, 0.0)

    rope, dec_rope = trunk.rope(device), dec.rope() if model.method == "pixel_ar" else None
    caches = trunk.new_cache() if use_cache else None
    seen = []  # the AR's input tokens so far (uncached path)
    patches = torch.zeros(B, L, 3, p, p, device=device)
    values = torch.zeros(B, L, p * p, 3, dtype=torch.long, device=device)
    indices = torch.zeros(B, L, dtype=torch.long, device=device) if trunk.mode == "discrete" else None
    logprob = torch.zeros(B, device=device)
    for i in range(L):
        if i == 0:
            tok = trunk.embed_class(ys)
        else:
            tok = trunk.embed_patches(patches[:, i - 1:i]).repeat(2 if two_ar else 1, 1, 1)
        if use_cache:
            h = trunk.run(tok, i, rope, caches)[:, -1]
        else:
            seen.append(tok)
            h = trunk.run(torch.cat(seen, 1), 0, rope)[:, -1]
        out = trunk.head(h).float()
        s_sem = scale_at(cfg.semantic_cfg_scale, cfg.cfg_schedule, i, L)
        s_dec = scale_at(cfg.cfg_scale, cfg.cfg_schedule, i, L)
        if sem_guided:
            out = guide(*out.chunk(2), s_sem)
        if trunk.mode == "discrete":
            idx, lp = sample_index(out, cfg.semantic_temperature, cfg.top_k, generator)
            indices[:, i], z = idx[:B], trunk.dictionary[idx]
            logprob += lp[:B]
        else:
            z = out
        zs = list(z.chunk(2)) if z_guided else [z]
        conds = [dec.condition(zz) for zz in zs] + ([dec.null_condition(B)] if dec_guided else [])
        scale = s_dec if len(conds) == 2 else 1.0
        if model.method == "pixel_ar":
            vals, lp = _pixel_ar_patch(dec, dec_rope, conds, scale, values, i, cfg, generator, use_cache)
            values[:, i] = vals
            patches[:, i] = rearrange(to_pixels(vals), "b (p1 p2) c -> b c p1 p2", p1=p)
            logprob += lp
        else:
            patches[:, i] = _diffusion_patch(dec, conds, scale, cfg, flow, generator, B, p)
    images = rearrange(patches, "b (h w) c p1 p2 -> b c (h p1) (w p2)", h=gh, w=gw)
    return ARSamples(images, indices, logprob)


def _pixel_ar_patch(dec, rope, conds, scale, values_BLP3, i, cfg, generator, use_cache):
    """The pixels of patch i [B, P, 3] and the log-probability of the values drawn [B]."""
    n, B = len(conds), conds[0].shape[0]
    c = torch.cat(conds)
    ctx, inside = dec.context(values_BLP3, torch.full((B, 1), i, device=c.device))
    ctx, inside = ctx[:, 0].repeat(n, 1, 1, 1), inside[:, 0].repeat(n, 1)
    caches = dec.new_cache() if use_cache else None
    tokens = [dec.prefix_tokens(c, ctx, inside)]
    start = tokens[0].shape[1]
    if use_cache:
        h = dec.run(tokens[0], 0, rope, caches)[:, -1]
    P = dec.pixels
    vals = torch.zeros(B, P, 3, dtype=torch.long, device=c.device)
    logprob = torch.zeros(B, device=c.device)
    for j in range(P):
        if not use_cache:
            h = dec.run(torch.cat(tokens, 1), 0, rope)[:, -1]
        prev = vals[:, j, :0]
        for ch in range(3):
            logits = dec.channel_logits(h, prev.repeat(n, 1), ch)
            if n == 2:
                logits = guide(*logits.chunk(2), scale)
            v, lp = sample_index(logits, cfg.temperature, 0, generator)
            prev = torch.cat([prev, v[:, None]], 1)
            logprob += lp
        vals[:, j] = prev
        if j < P - 1:
            tok = dec.pixel_tokens(prev.repeat(n, 1)[:, None], c)
            if use_cache:
                h = dec.run(tok, start + j, rope, caches)[:, -1]
            else:
                tokens.append(tok)
    return vals, logprob


def _diffusion_patch(head, conds, scale, cfg, flow: FlowMatching, generator, B: int, p: int):
    """One patch per image [B, 3, p, p], integrated from noise scaled by the decoder temperature."""
    n = len(conds)
    c = torch.cat(conds)
    noise = randn((B, 3, p, p), generator, device=c.device) * flow.cfg.noise_scale * cfg.temperature

    def velocity(x, t_B, _y):
        xx, tt = x.repeat(n, 1, 1, 1), t_B.repeat(n)
        v = flow.to_velocity(head(xx, tt, c).float(), xx, tt)
        return guide(*v.chunk(2), scale) if n == 2 else v

    return sample(velocity, torch.zeros(B, dtype=torch.long, device=c.device), shape=(3, p, p),
                  cfg=_diffusion_sampler(cfg), num_classes=0, noise=noise)


def log_likelihood(model, x_BCHW: torch.Tensor, y_B: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced log p(indices, pixels | y) per image [B] in nats: the dictionary indices' log-probs
    (discrete; `indices` [B, L] are the entries the sequence used) plus every pixel channel's (pixel AR). With
    guidance off and temperatures 1 it equals the sum of the draws' log-probs along the sampling path."""
    discrete = model.trunk.mode == "discrete"
    out = model(x_BCHW, y_B, semantic=True, decoder=model.method == "pixel_ar", indices=indices,
                z_from_trunk=not discrete)
    total = torch.zeros(x_BCHW.shape[0], device=x_BCHW.device)
    if discrete:
        total += F.log_softmax(out["semantic"].float(), -1).gather(-1, indices[..., None])[..., 0].sum(1)
    if "logp" in out:
        total += out["logp"].reshape(x_BCHW.shape[0], -1).sum(1)
    return total


__all__ = ["ARObjective", "ARSamples", "GUIDANCE", "CFG_SCHEDULES", "build_dictionary", "generate", "guide",
           "log_likelihood", "needs_teacher", "sample_index", "scale_at"]
