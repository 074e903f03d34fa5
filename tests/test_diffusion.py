import math

import pytest
import torch

from pixelgen.diffusion import FlowMatching, sample, time_shift, velocity_cfg
from pixelgen.models import build_generator
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


@pytest.mark.parametrize("kind", ["euler", "heun"])
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


@pytest.mark.parametrize("kind,order", [("euler", 1), ("heun", 2)])
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


def test_tiny_generator_overfits_four_images():
    model = tiny_generator()
    obj = FlowMatching(ObjectiveConfig(), NUM_CLASSES, class_dropout=0.0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x0 = torch.stack([  # four smooth, distinct images in [-1, 1]
        torch.stack([xx, yy, xx * yy]),
        torch.stack([-yy, torch.sin(3 * xx), yy.abs() * 2 - 1]),
        torch.stack([torch.cos(4 * yy), -xx, xx.abs() * 2 - 1]),
        torch.stack([xx * 0.5, torch.sin(5 * (xx + yy)), -yy]),
    ])
    y = torch.arange(4)

    def eval_loss():
        with torch.no_grad():
            return sum(obj.loss(model, x0, y, torch.Generator().manual_seed(s))[0] for s in range(8)) / 8

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(123)
    for _ in range(150):
        loss, _ = obj.loss(model, x0, y, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"overfit loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before
