"""Rectified-flow objective and ODE samplers, kept apart from the networks.

Convention (PixelDiT, JiT): t in [0, 1], t = 1 is data and t = 0 pure noise; x_t = t * x0 + (1 - t) * e with
e ~ N(0, noise_scale^2 I), and the velocity is v = dx_t/dt = x0 - e. The network predicts v (flow_velocity) or
x0 (x_pred); sampling integrates dx/dt = v from t = 0 to t = 1.
"""

import torch
import torch.nn.functional as F

from pixelgen.models.config import ObjectiveConfig, ObjectiveKind, SamplerConfig, SamplerKind
from pixelgen.noise import Generator, randn


def time_shift(t, shift: float):
    """Warp t toward noise when shift > 1 (identity at shift = 1).

    This is SD3's shift on the noise level sigma = 1 - t, sigma' = shift * sigma / (1 + (shift - 1) * sigma),
    written in t: t' = t / (t + shift * (1 - t)), as in PixelDiT's `time_shift_fn` / `shift_respace_fn`.
    """
    return t / (t + shift * (1 - t))


def _broadcast_B(t_B, like):
    return t_B.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


OBJECTIVES = tuple(ObjectiveKind)
SAMPLERS = tuple(SamplerKind)


class FlowMatching:
    """Flow matching with logit-normal timesteps and class dropout for CFG, in two parametrisations.

    flow_velocity: the network predicts v = x0 - e and the loss is ||v_pred - v||^2 (PixelDiT).
    x_pred: the network predicts x0; both prediction and target are turned into velocities through
    (x - x_t) / max(1 - t, t_eps) and compared there (JiT's v-loss). The clamp keeps the division finite
    near t = 1 and is kept when sampling (JiT's authors: it improves FID).
    """

    def __init__(self, objective_cfg: ObjectiveConfig, num_classes: int, class_dropout: float):
        if objective_cfg.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective.kind {objective_cfg.kind!r}; known kinds: {', '.join(OBJECTIVES)}")
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

    def to_velocity(self, pred_BCHW, x_t_BCHW, t_B):
        """The velocity implied by the network's prediction at (x_t, t)."""
        if self.cfg.kind == "flow_velocity":
            return pred_BCHW
        one_minus_t = (1 - _broadcast_B(t_B, x_t_BCHW)).clamp_min(self.cfg.t_eps)
        return (pred_BCHW - x_t_BCHW) / one_minus_t

    def velocity_loss(self, pred, x_t, t_B, x0, v_target):
        """The regression loss of a prediction at (x_t, t) against the velocity target, in the objective's
        parametrisation."""
        # fp32 so that a bf16-autocast prediction does not quantise the regression error.
        if self.cfg.kind == "x_pred":
            v_target = self.to_velocity(x0.float(), x_t.float(), t_B)
        return F.mse_loss(self.to_velocity(pred.float(), x_t.float(), t_B), v_target.float())

    def loss(self, model, x0_BCHW, y_B, generator=None, alignment=None):
        """(loss, detached logs). All randomness comes from `generator` when given (on x0's device), drawn in the
        order t, e, label drop. `alignment` (pixelgen.alignment.AlignmentLosses) adds REPA / the DINO student's
        loss on the features the model returns with `return_features=True`."""
        t_B = self.sample_t(x0_BCHW.shape[0], x0_BCHW.device, generator)
        e_BCHW = torch.randn(x0_BCHW.shape, device=x0_BCHW.device, dtype=x0_BCHW.dtype, generator=generator)
        e_BCHW = e_BCHW * self.cfg.noise_scale
        y_B = self.drop_labels(y_B, generator)
        x_t, v_target = self.interpolate(x0_BCHW, e_BCHW, t_B)
        if alignment:
            pred, features = model(x_t, t_B, y_B, return_features=True)
        else:
            pred = model(x_t, t_B, y_B)
        loss = self.velocity_loss(pred, x_t, t_B, x0_BCHW, v_target)
        logs = {}
        if alignment:
            logs["fm_loss"] = loss.detach()
            for name, (weight, term) in alignment(features, x0_BCHW).items():
                loss = loss + weight * term
                logs[name] = term.detach()
        logs["loss"] = loss.detach()
        return loss, logs


def velocity_cfg(v_c, v_u, scale: float, t, interval):
    """Classifier-free guidance on the velocity: v_u + scale * (v_c - v_u) where low < t < high, else v_c.

    t: a float or a [B] tensor (one time per sample); interval: (low, high), an open interval.
    """
    low, high = interval
    t = torch.as_tensor(t, device=v_c.device)
    inside = (t > low) & (t < high)
    inside = inside.reshape(*inside.shape, *([1] * (v_c.ndim - inside.ndim)))
    return torch.where(inside, v_u + scale * (v_c - v_u), v_c)


def _velocity(model, x_BCHW, t: float, y_B, null_class: int, cfg: SamplerConfig, objective):
    t_B = torch.full((x_BCHW.shape[0],), t, device=x_BCHW.device)
    low, high = cfg.cfg_interval

    def velocity(x, t_, y):
        pred = model(x, t_, y).float()  # bf16 under autocast: the guidance and the ODE step stay fp32
        return pred if objective is None else objective.to_velocity(pred, x, t_)

    # Outside the guidance interval the unconditional half would be discarded, so it is not evaluated.
    if cfg.cfg_scale == 1.0 or not low < t < high:
        return velocity(x_BCHW, t_B, y_B)
    v_c, v_u = velocity(
        torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), torch.cat([y_B, torch.full_like(y_B, null_class)])
    ).chunk(2)
    return velocity_cfg(v_c, v_u, cfg.cfg_scale, t, cfg.cfg_interval)


@torch.no_grad()
def sample(model, y_B, *, shape, cfg: SamplerConfig, num_classes: int, generator: Generator = None, noise=None,
           objective: FlowMatching | None = None):
    """Integrate the flow ODE from noise (t=0) to data (t=1); returns x_BCHW clamped to [-1, 1].

    shape: (C, H, W) per sample (or the full (B, C, H, W)); noise, when given, is the starting point and
    replaces drawing from `generator` (a torch.Generator or per-image pixelgen.noise.Streams; drawn noise is
    scaled by the objective's noise_scale). `objective` turns the network's prediction into a velocity (None: the
    network predicts the velocity). The model runs in whatever train/eval mode the caller set. All samplers step on time_shift(linspace(0, 1, steps + 1)):
    euler takes `steps` evaluations; heun 2 per step (the last step is Euler for x_pred, as in JiT, where the
    velocity at t = 1 divides by t_eps); ab2 one per step, Adams-Bashforth with the previous velocity (the first
    step is Euler), PixelDiT's sampler with its fixed 1.5 / -0.5 (ab2_variable: the coefficients of unequal steps).
    """
    if cfg.kind not in SAMPLERS:
        raise ValueError(f"unknown sampler.kind {cfg.kind!r}; known kinds: {', '.join(SAMPLERS)}")
    if noise is None:
        shape = tuple(shape) if len(shape) == 4 else (y_B.shape[0], *shape)
        noise = randn(shape, generator, device=y_B.device)
        if objective is not None:
            noise = noise * objective.cfg.noise_scale
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))  # integrate in fp32 or finer
    ts = time_shift(torch.linspace(0.0, 1.0, cfg.steps + 1, dtype=torch.float64), cfg.time_shift).tolist()
    x_pred = objective is not None and objective.cfg.kind == "x_pred"
    v_prev, dt_prev = None, None
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t1 - t0
        v0 = _velocity(model, x, t0, y_B, num_classes, cfg, objective)
        if cfg.kind == "heun" and not (x_pred and i == cfg.steps - 1):
            v1 = _velocity(model, x + dt * v0, t1, y_B, num_classes, cfg, objective)
            x = x + dt * 0.5 * (v0 + v1)
        elif cfg.kind in ("ab2", "ab2_variable") and v_prev is not None:
            # Second-order extrapolation of v over [t0, t1] from (t_prev, v_prev) and (t0, v0): 1.5 / -0.5 as
            # PixelDiT's FlowDPMSolverSampler does on every step; ab2_variable weighs by the step sizes.
            r = dt / (2 * dt_prev) if cfg.kind == "ab2_variable" else 0.5
            x = x + dt * ((1 + r) * v0 - r * v_prev)
        else:
            x = x + dt * v0
        v_prev, dt_prev = v0, dt
    return x.clamp(-1, 1)
