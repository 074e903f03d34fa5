import math

import pytest
import torch

from pixelgen.diffusion import FlowMatching, sample, time_shift, velocity_cfg
from pixelgen.families import build_generator
from pixelgen.models.config import ModelConfig, ObjectiveConfig, SamplerConfig, TrunkConfig

NUM_CLASSES = 10


NULL = NUM_CLASSES


class VelocityField(torch.nn.Module):
    """A stand-in network returning a known velocity f(x, t, y); records the batch size of every call."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t[0].item()))
        return self.fn(x, t.view(-1, 1, 1, 1), y.view(-1, 1, 1, 1))


def test_time_shift_convention():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, 1.0), t)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] < t[1:-1]).all()  # shift > 1 moves t toward noise (t = 0)
    assert time_shift(0.5, 3.0) == pytest.approx(0.25)


def test_interpolation_and_velocity_target():
    x0 = torch.tensor([1.0, -0.5]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    e = torch.tensor([0.2, 0.4]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    x_t, v = FlowMatching.interpolate(x0, e, torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(x_t[0], torch.full((3, 2, 2), 1.0))  # t = 1 is data
    torch.testing.assert_close(x_t[1], torch.full((3, 2, 2), 0.25 * -0.5 + 0.75 * 0.4))
    torch.testing.assert_close(v[:, 0, 0, 0], torch.tensor([0.8, -0.9]))  # x0 - e
    x_0, _ = FlowMatching.interpolate(x0, e, torch.zeros(2))
    torch.testing.assert_close(x_0, e)  # t = 0 is noise


def test_loss_uses_generator_draws_and_velocity_target():
    obj = FlowMatching(ObjectiveConfig(t_mean=0.3, t_std=0.7, time_shift=2.0), NUM_CLASSES, class_dropout=0.5)
    seen = {}

    def record(x, t, y):
        seen.update(x=x, t=t, y=y)
        return torch.zeros_like(x)

    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    y = torch.arange(8)
    loss, logs = obj.loss(record, x0, y, generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)  # replay the same draws in the documented order: t, e, label drop
    t = time_shift(torch.sigmoid(0.3 + 0.7 * torch.randn(8, generator=g)), 2.0)
    e = torch.randn(x0.shape, generator=g)
    drop = torch.rand(8, generator=g) < 0.5
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x"], t.view(-1, 1, 1, 1) * x0 + (1 - t.view(-1, 1, 1, 1)) * e)
    assert torch.equal(seen["y"], torch.where(drop, NULL, y))
    torch.testing.assert_close(loss, (x0 - e).square().mean())
    assert logs["loss"] == loss and not logs["loss"].requires_grad


def test_class_dropout_and_t_distribution():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(NUM_CLASSES).repeat(100)
    assert torch.equal(FlowMatching(ObjectiveConfig(), NUM_CLASSES, 0.0).drop_labels(y, g), y)
    assert (FlowMatching(ObjectiveConfig(), NUM_CLASSES, 1.0).drop_labels(y, g) == NULL).all()
    frac = (FlowMatching(ObjectiveConfig(), NUM_CLASSES, 0.1).drop_labels(y, g) == NULL).float().mean()
    assert 0.05 < frac < 0.15
    t = FlowMatching(ObjectiveConfig(), NUM_CLASSES, 0.1).sample_t(20_000, "cpu", g)
    assert 0 < t.min() and t.max() < 1 and abs(t.median() - 0.5) < 0.02  # logit-normal(0, 1)
    t3 = FlowMatching(ObjectiveConfig(time_shift=3.0), NUM_CLASSES, 0.1).sample_t(20_000, "cpu", g)
    assert abs(t3.median() - 0.25) < 0.02
    with pytest.raises(ValueError, match="objective.kind"):
        FlowMatching(ObjectiveConfig(kind="eps"), NUM_CLASSES, 0.1)


def test_velocity_cfg_arithmetic_and_interval():
    v_c, v_u = torch.full((3, 1, 2, 2), 2.0), torch.full((3, 1, 2, 2), 0.5)
    torch.testing.assert_close(velocity_cfg(v_c, v_u, 3.0, 0.5, (0.1, 0.9)), torch.full_like(v_c, 0.5 + 3.0 * 1.5))
    torch.testing.assert_close(velocity_cfg(v_c, v_u, 1.0, 0.5, (0.1, 0.9)), v_c)
    for t_out in (0.05, 0.1, 0.9, 1.0):  # open interval: the ends are unguided
        assert torch.equal(velocity_cfg(v_c, v_u, 3.0, t_out, (0.1, 0.9)), v_c)
    per_sample = velocity_cfg(v_c, v_u, 3.0, torch.tensor([0.0, 0.5, 0.95]), (0.1, 0.9))
    torch.testing.assert_close(per_sample[:, 0, 0, 0], torch.tensor([2.0, 5.0, 2.0]))


def test_sample_guides_only_inside_interval_with_one_batched_forward():
    # Conditional velocity 0.1, unconditional 0: guided velocity = 0.1 * scale, so x(1) - x(0) counts guided steps.
    model = VelocityField(lambda x, t, y: torch.where(y == NULL, 0.0, 0.1).expand_as(x))
    y = torch.tensor([1, 2])
    noise = torch.zeros(2, 3, 4, 4)
    cfg = SamplerConfig(kind="euler", steps=10, cfg_scale=3.0, cfg_interval=[0.25, 0.65])
    x = sample(model, y, shape=(3, 4, 4), cfg=cfg, num_classes=NUM_CLASSES, noise=noise)
    guided = [t for b, t in model.calls if b == 4]
    assert len(model.calls) == 10
    assert all(b in (2, 4) for b, _ in model.calls)
    assert all(0.25 < t < 0.65 for t in guided) and len(guided) == 4  # t = 0.3, 0.4, 0.5, 0.6
    torch.testing.assert_close(x, torch.full_like(x, 0.1 * (0.4 * 3 + 0.6 * 1)))

    model.calls.clear()
    sample(model, y, shape=(3, 4, 4), cfg=SamplerConfig(steps=5), num_classes=NUM_CLASSES, noise=noise)
    assert [b for b, _ in model.calls] == [2] * 5  # scale 1: no unconditional pass at all


@pytest.mark.parametrize("kind", ["euler", "heun", "ab2", "ab2_variable"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_constant_velocity_is_integrated_exactly(kind, shift):
    c = torch.tensor([0.3, -0.2, 0.5]).view(1, 3, 1, 1)
    model = VelocityField(lambda x, t, y: c.expand_as(x))
    noise = 0.1 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(kind=kind, steps=7, time_shift=shift)
    y = torch.zeros(2, dtype=torch.long)
    x = sample(model, y, shape=(3, 4, 4), cfg=cfg, num_classes=NUM_CLASSES, noise=noise)
    torch.testing.assert_close(x, noise + c, atol=1e-6, rtol=0)


def test_heun_is_exact_for_time_linear_velocity():
    c = 0.8
    model = VelocityField(lambda x, t, y: (c * t).expand_as(x))  # x(1) = x(0) + c / 2, trapezoid is exact
    noise = torch.zeros(1, 3, 2, 2)
    x = sample(model, torch.zeros(1, dtype=torch.long), shape=(3, 2, 2), cfg=SamplerConfig(kind="heun", steps=3),
               num_classes=NUM_CLASSES, noise=noise)
    torch.testing.assert_close(x, torch.full_like(x, c / 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,order", [("euler", 1), ("heun", 2), ("ab2", 2), ("ab2_variable", 2)])
def test_convergence_order_on_linear_ode(kind, order):
    a = 1.0  # dx/dt = a x  ->  x(1) = x(0) e^a
    model = VelocityField(lambda x, t, y: a * x)
    noise = torch.full((1, 1, 1, 1), 0.2, dtype=torch.float64)
    exact = 0.2 * math.exp(a)
    errors = []
    for steps in (16, 32, 64):
        cfg = SamplerConfig(kind=kind, steps=steps)
        x = sample(model, torch.zeros(1, dtype=torch.long), shape=(1, 1, 1), cfg=cfg, num_classes=1, noise=noise)
        errors.append(abs(x.item() - exact))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(abs(math.log2(r) - order) < 0.15 for r in ratios), (errors, ratios)
    if kind == "heun":
        assert errors[0] < 1e-3
    if kind.startswith("ab2"):  # one evaluation per step, like Euler, for a second-order error
        assert errors[0] < 1e-2


def test_ab2_uses_the_previous_velocity_with_1_5_and_minus_0_5_on_equal_steps():
    # v depends on the step index only, so each update is a known combination of the evaluations.
    values = iter([1.0, 3.0, -2.0, 0.5])
    model = VelocityField(lambda x, t, y: torch.full_like(x, next(values)))
    x = sample(model, torch.zeros(1, dtype=torch.long), shape=(1, 1, 1), cfg=SamplerConfig(kind="ab2", steps=4),
               num_classes=1, noise=torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    dt = 0.25
    expected = dt * 1.0 + dt * (1.5 * 3.0 - 0.5 * 1.0) + dt * (1.5 * -2.0 - 0.5 * 3.0) + dt * (1.5 * 0.5 + 0.5 * 2.0)
    assert x.item() == pytest.approx(expected)
    assert len(model.calls) == 4


def test_x_pred_targets_and_the_one_minus_t_clamp():
    obj = FlowMatching(ObjectiveConfig(kind="x_pred", t_eps=0.05), NUM_CLASSES, class_dropout=0.0)
    x0 = torch.tensor([0.5, -1.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    e = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    t = torch.tensor([0.5, 0.99])
    x_t, _ = FlowMatching.interpolate(x0, e, t)
    # A perfect x0 prediction implies the true velocity x0 - e where 1 - t >= t_eps ...
    torch.testing.assert_close(obj.to_velocity(x0, x_t, t)[0], (x0 - e)[0])
    # ... and near t = 1 the division is by t_eps, not by 1 - t = 0.01.
    torch.testing.assert_close(obj.to_velocity(x0, x_t, t)[1], ((x0 - x_t) / 0.05)[1])

    pred = torch.full((2, 3, 2, 2), 0.25)
    g = torch.Generator().manual_seed(3)
    seen = {}

    def record(x, t_, y):
        seen.update(x=x, t=t_)
        return pred

    loss, logs = obj.loss(record, x0, torch.arange(2), generator=g)
    denom = (1 - seen["t"]).clamp_min(0.05).view(-1, 1, 1, 1)
    expected = (((pred - seen["x"]) - (x0 - seen["x"])) / denom).square().mean()  # the v-loss
    torch.testing.assert_close(loss, expected)
    assert logs["loss"] == loss and "fm_loss" not in logs  # no alignment terms: the loss is all flow matching


def test_noise_scale_scales_the_noise():
    obj = FlowMatching(ObjectiveConfig(noise_scale=2.0), NUM_CLASSES, class_dropout=0.0)
    seen = {}
    x0 = torch.zeros(4, 3, 8, 8)
    obj.loss(lambda x, t, y: seen.update(x=x, t=t) or torch.zeros_like(x), x0, torch.arange(4),
             generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(4, generator=g)  # t is drawn first
    e = 2.0 * torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(seen["x"], (1 - seen["t"]).view(-1, 1, 1, 1) * e)


@pytest.mark.parametrize("kind", ["euler", "heun", "ab2"])
def test_x_pred_sampling_lands_on_a_constant_prediction(kind):
    # A network that always predicts x*: the flow x(t) = x* + (1 - t)(x(0) - x*) has a constant velocity,
    # so every sampler ends exactly on x*.
    target = torch.tensor([0.3, -0.6, 0.9]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    model = VelocityField(lambda x, t, y: target)
    obj = FlowMatching(ObjectiveConfig(kind="x_pred"), NUM_CLASSES, class_dropout=0.0)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).clamp(-0.9, 0.9)
    x = sample(model, torch.zeros(2, dtype=torch.long), shape=(3, 4, 4), cfg=SamplerConfig(kind=kind, steps=10),
               num_classes=NUM_CLASSES, noise=noise, objective=obj)
    torch.testing.assert_close(x, target, atol=1e-5, rtol=0)
    # Heun's last step is Euler for x_pred: no evaluation at t = 1, where the velocity divides by t_eps.
    assert max(t for _, t in model.calls) < 1.0


def tiny_generator():
    torch.manual_seed(0)
    cfg = ModelConfig(trunk=TrunkConfig(size="tiny", patch_size=4), num_classes=NUM_CLASSES)
    return build_generator(cfg, resolution=32)


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_generator().eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    y = torch.tensor([0, 5])
    cfg = SamplerConfig(kind="heun", steps=3, cfg_scale=2.0, cfg_interval=[0.1, 1.0])

    def run(seed):
        return sample(model, y, shape=(3, 32, 32), cfg=cfg, num_classes=NUM_CLASSES,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 3, 32, 32) and a.abs().max() <= 1
