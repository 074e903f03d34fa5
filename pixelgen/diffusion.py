"""Rectified-flow objective and ODE samplers, kept apart from the networks.

Convention (PixelDiT): t in [0, 1], t = 1 is data and t = 0 pure noise; x_t = t * x0 + (1 - t) * e with
e ~ N(0, I), and the network predicts the velocity v = dx_t/dt = x0 - e. Sampling integrates dx/dt = v
from t = 0 to t = 1.
"""

import torch
import torch.nn.functional as F

from pixelgen.models.config import ObjectiveConfig, SamplerConfig


def time_shift(t, shift: float):
    """Warp t toward noise when shift > 1 (identity at shift = 1).

    This is SD3's shift on the noise level sigma = 1 - t, sigma' = shift * sigma / (1 + (shift - 1) * sigma),
    written in t: t' = t / (t + shift * (1 - t)), as in PixelDiT's `time_shift_fn` / `shift_respace_fn`.
    """
    return t / (t + shift * (1 - t))


def _broadcast_B(t_B, like):
    return t_B.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class FlowMatching:
    """Velocity flow matching with logit-normal timesteps and class dropout for CFG."""

    def __init__(self, objective_cfg: ObjectiveConfig, num_classes: int, class_dropout: float):
        if objective_cfg.kind != "flow_velocity":
            raise ValueError(f"unknown objective.kind {objective_cfg.kind!r}; known kinds: flow_velocity")
        self.cfg = objective_cfg
        self.null_class = num_classes
        self.class_dropout = class_dropout

    def sample_t(self, n: int, device, generator=None):
        z_B = torch.randn(n, device=device, generator=generator)
        return time_shift(torch.sigmoid(self.cfg.t_mean + self.cfg.t_std * z_B), self.cfg.time_shift)

    def drop_labels(self, y_B, generator=None):
        drop_B = torch.rand(y_B.shape, device=y_B.device, generator=generator) < self.class_dropout
        return torch.where(drop_B, torch.full_like(y_B, self.null_class), y_B)

    @staticmethod
    def interpolate(x0_BCHW, e_BCHW, t_B):
        """(x_t, target velocity)."""
        t = _broadcast_B(t_B, x0_BCHW)
        return t * x0_BCHW + (1 - t) * e_BCHW, x0_BCHW - e_BCHW

    def loss(self, model, x0_BCHW, y_B, generator=None):
        """All randomness comes from `generator` when given; it must live on x0's device."""
        t_B = self.sample_t(x0_BCHW.shape[0], x0_BCHW.device, generator)
        e_BCHW = torch.randn(x0_BCHW.shape, device=x0_BCHW.device, dtype=x0_BCHW.dtype, generator=generator)
        y_B = self.drop_labels(y_B, generator)
        x_t, v_target = self.interpolate(x0_BCHW, e_BCHW, t_B)
        # fp32 so that a bf16-autocast prediction does not quantise the regression error.
        loss = F.mse_loss(model(x_t, t_B, y_B).float(), v_target.float())
        return loss, {"loss": loss.detach()}


def velocity_cfg(v_c, v_u, scale: float, t, interval):
    """Classifier-free guidance on the velocity: v_u + scale * (v_c - v_u) where low < t < high, else v_c.

    t: a float or a [B] tensor (one time per sample); interval: (low, high), an open interval.
    """
    low, high = interval
    t = torch.as_tensor(t, device=v_c.device)
    inside = (t > low) & (t < high)
    inside = inside.reshape(*inside.shape, *([1] * (v_c.ndim - inside.ndim)))
    return torch.where(inside, v_u + scale * (v_c - v_u), v_c)


def _velocity(model, x_BCHW, t: float, y_B, null_class: int, cfg: SamplerConfig):
    t_B = torch.full((x_BCHW.shape[0],), t, device=x_BCHW.device)
    low, high = cfg.cfg_interval
    # Outside the guidance interval the unconditional half would be discarded, so it is not evaluated.
    if cfg.cfg_scale == 1.0 or not low < t < high:
        return model(x_BCHW, t_B, y_B)
    v_c, v_u = model(
        torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, torch.full_like(y_B, null_class)])
    ).chunk(2)
    return velocity_cfg(v_c, v_u, cfg.cfg_scale, t, cfg.cfg_interval)


@torch.no_grad()
def sample(model, y_B, *, shape, cfg: SamplerConfig, num_classes: int, generator=None, noise=None):
    """Integrate the flow ODE from noise (t=0) to data (t=1); returns x_BCHW clamped to [-1, 1].

    shape: (C, H, W) per sample (or the full (B, C, H, W)); noise, when given, is the starting point and
    replaces drawing from `generator`. The model runs in whatever train/eval mode the caller set.
    Euler takes `steps` evaluations, Heun 2 * `steps`; both on time_shift(linspace(0, 1, steps + 1)).
    """
    if cfg.kind not in ("euler", "heun"):
        raise ValueError(f"unknown sampler.kind {cfg.kind!r}; known kinds: euler, heun")
    if noise is None:
        shape = tuple(shape) if len(shape) == 4 else (y_B.shape[0], *shape)
        noise = torch.randn(shape, device=y_B.device, generator=generator)
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))  # integrate in fp32 or finer
    ts = time_shift(torch.linspace(0.0, 1.0, cfg.steps + 1, dtype=torch.float64), cfg.time_shift).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        dt = t1 - t0
        v0 = _velocity(model, x, t0, y_B, num_classes, cfg)
        if cfg.kind == "euler":
            x = x + dt * v0
        else:
            v1 = _velocity(model, x + dt * v0, t1, y_B, num_classes, cfg)
            x = x + dt * 0.5 * (v0 + v1)
    return x.clamp(-1, 1)
