"""Published checkpoints: pixelgen's converted generator computes what the official code computes.

tests/fixtures/pixeldit_official/ holds the outputs of the official PixelDiT code (run once at a tiny size with
random weights; MADE.md says how): its state dict, an input and its forward output, and its sampler's
trajectories with CFG at two time shifts. The conversion (pixelgen.models.official) must reproduce them, and
`pixelgen import` must turn a Lightning-style checkpoint of those weights into a file that sampling and the FID
stage load.
"""

import argparse
import fractions
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline import cli
from pipeline.config import load_config
from pipeline.stages import _load_generator
from pixelgen import families
from pixelgen.diffusion import sample
from pixelgen.engine.export import weights_metadata
from pixelgen.models.config import SamplerConfig
from pixelgen.models.official import CheckpointMismatch, convert
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "pixeldit_official" / "tiny.safetensors"


@pytest.fixture(scope="module")
def official():
    data = load_file(str(FIXTURE))
    state = {k.removeprefix("official."): v for k, v in data.items() if k.startswith("official.")}
    return state, data


def _generator(converted, resolution=8):
    from pixelgen.models.config import DecoderConfig, ModelConfig, RepaConfig, TrunkConfig

    m = converted.model
    cfg = ModelConfig(trunk=TrunkConfig(**m["trunk"]), decoder=DecoderConfig(**m["decoder"]),
                      num_classes=m["num_classes"], repa=RepaConfig(**m["repa"]))
    model = families.build_generator(cfg, resolution).eval()
    model.load_state_dict(converted.state, strict=True)
    return model


def test_the_converted_pixeldit_computes_the_official_forward(official):
    state, data = official
    converted = convert("pixeldit", state)
    assert converted.model["trunk"] | {"kind": "pixeldit"} == {"kind": "pixeldit", "size": None, "patch_size": 2,
                                                                "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 4.0}
    assert converted.model["decoder"]["pixel_dim"] == 8 and converted.model["decoder"]["depth"] == 2
    model = _generator(converted)
    with torch.no_grad():  # a non-square image (8 x 12): rows and columns cannot stand in for each other
        out = model(data["input.x"], data["input.t"], data["input.y"])  # the second label is the null class
    torch.testing.assert_close(out, data["output"], atol=2e-6, rtol=1e-5)
    # Without each of the three layout mappings the outputs differ (so the test sees them).
    for broken in ("rope", "sincos", "adaln"):
        wrong = dict(converted.state)
        if broken == "rope":
            wrong["trunk.semantic.blocks.0.attn.qkv.weight"] = state["patch_blocks.0.attn.qkv.weight"]
        elif broken == "sincos":
            wrong["decoder.pixel_embed.weight"] = state["pixel_embedder.proj.weight"]
        else:
            wrong["decoder.blocks.0.adaLN.linear.weight"] = state["pixel_blocks.0.adaLN_modulation.0.weight"]
        model.load_state_dict(wrong)
        with torch.no_grad():
            assert (model(data["input.x"], data["input.t"], data["input.y"]) - data["output"]).abs().max() > 1e-4


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_the_ab2_sampler_with_cfg_follows_the_official_trajectory(official, shift):
    """FlowDPMSolverSampler, 5 steps, CFG 2.5 on t in (0.1, 0.9): the first step is outside the interval, the
    last inside; at time shift 2 the steps are unequal and the official update keeps 1.5 / -0.5."""
    state, data = official
    model = _generator(convert("pixeldit", state))
    trajectory = data[f"sample.shift{shift:g}"]  # [steps + 1, B, C, H, W], noise first
    for steps in (1, 2, 5):  # the first steps, then the whole run (the official last x is not clamped)
        cfg = SamplerConfig(kind="ab2", steps=5, cfg_scale=2.5, cfg_interval=[0.1, 0.9], time_shift=shift)
        if steps < 5:
            x = _partial(model, data, cfg, steps)
        else:
            x = sample(model, data["sample.y"], shape=(3, 8, 8), cfg=cfg, num_classes=10, noise=data["sample.noise"])
        torch.testing.assert_close(x, trajectory[steps].clamp(-1, 1) if steps == 5 else trajectory[steps],
                                   atol=2e-6, rtol=1e-5)


def _partial(model, data, cfg, steps):
    """x after the first `steps` sampler steps: the sampler with the model stopped there (clamp aside)."""

    class Stop(Exception):
        pass

    calls, states = [0], []

    def spy(x, t, y):
        if calls[0] == steps:
            states.append(x[: data["sample.y"].shape[0]].clone())
            raise Stop
        calls[0] += 1
        return model(x, t, y)

    with pytest.raises(Stop):
        sample(spy, data["sample.y"], shape=(3, 8, 8), cfg=cfg, num_classes=10, noise=data["sample.noise"])
    return states[0]


def test_a_checkpoint_that_does_not_fit_is_named(official):
    state, _ = official
    missing = {k: v for k, v in state.items() if k != "pixel_blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointMismatch, match=r"no tensor 'pixel_blocks\.1\.mlp\.fc2\.bias'"):
        convert("pixeldit", missing)
    reshaped = {**state, "patch_blocks.1.mlp.w2.weight": torch.zeros(32, 64)}
    with pytest.raises(CheckpointMismatch, match=r"'patch_blocks\.1\.mlp\.w2\.weight' has shape \(32, 64\), expected \(32, 85\)"):
        convert("pixeldit", reshaped)
    extra = {**state, "patch_blocks.0.mlp.experts.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatch, match=r"1 tensors .* no place in the model \(patch_blocks\.0\.mlp\.experts"):
        convert("pixeldit", extra)
    post = {**state, "pixel_blocks.0.adaLN_modulation.0.weight": torch.zeros(4 * 4 * 8, 32)}
    with pytest.raises(CheckpointMismatch, match="pit_adaln_post_modulation"):
        convert("pixeldit", post)
    gap = {k.replace("patch_blocks.1.", "patch_blocks.2."): v for k, v in state.items()}
    with pytest.raises(CheckpointMismatch, match=r"numbered \[0, 2\]"):
        convert("pixeldit", gap)
    with pytest.raises(ValueError, match="unknown checkpoint kind 'dit'"):
        convert("dit", state)


def _lightning_checkpoint(state, path: Path, extra=None):
    """What the official training writes: the model under denoiser. and its EMA under ema_denoiser."""
    inner = {**{f"denoiser.{k}": torch.zeros_like(v) for k, v in state.items()},
             **{f"ema_denoiser.{k}": v for k, v in state.items()}, "diffusion_trainer.proj.weight": torch.zeros(2)}
    torch.save({"state_dict": inner, "epoch": 80, **(extra or {})}, path)
    return path


def test_import_writes_weights_that_sampling_and_the_fid_stage_load(official, tmp_path, capsys):
    state, data = official
    ckpt = _lightning_checkpoint(state, tmp_path / "pixeldit.ckpt")
    out = tmp_path / "weights" / "tiny.safetensors"
    assert cli.main(["import", "pixeldit", str(ckpt), str(out), "--resolution", "8", "sampler.steps=7"]) == 0
    assert "73,907 parameters" in capsys.readouterr().out
    meta = weights_metadata(out)
    assert meta["stage"] == "import" and meta["source"]["weights"] == "state_dict/ema_denoiser"
    cfg = OmegaConf.load(out.with_suffix(".yaml"))
    assert list(cfg.stages) == ["fid"] and cfg.fid.weights == str(out.resolve()) and cfg.sampler.steps == 7
    assert meta["config"]["model"] == OmegaConf.to_container(cfg.model)
    # The written config is a valid run config once it says where the images are; the FID stage's loader
    # (strict) takes the weights with it, and they compute the official forward.
    model = _load_generator(load_config(out.with_suffix(".yaml"), [f"data.shard_dir={tmp_path}"]), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data["input.x"], data["input.t"], data["input.y"]), data["output"],
                                   atol=2e-6, rtol=1e-5)
    assert cli.main(["sample", str(out), "--classes", "1,2", "--per-class", "1", "--steps", "2",
                     "--device", "cpu", "--out", str(tmp_path / "look")]) == 0
    assert "imported from pixeldit pixeldit.ckpt" in capsys.readouterr().out
    assert (tmp_path / "look" / "grid.png").is_file()
    # Nothing is replaced without --force; the trained (non-EMA) weights on request.
    assert cli.main(["import", "pixeldit", str(ckpt), str(out), "--resolution", "8"]) == 2
    assert "already exist" in capsys.readouterr().out
    assert cli.main(["import", "pixeldit", str(ckpt), str(out), "--resolution", "8", "--weights", "model",
                     "--force"]) == 0
    assert weights_metadata(out)["source"]["weights"] == "state_dict/denoiser"
    assert all(v.abs().max() == 0 for v in load_file(str(out)).values())


def test_import_published_sampler_and_refusals(official, tmp_path, capsys):
    state, _ = official
    ckpt = tmp_path / "pixeldit.ckpt"
    _lightning_checkpoint(state, ckpt, extra={"hyper_parameters": {"lr": fractions.Fraction(1, 10_000)}})
    out = tmp_path / "a.safetensors"
    # Pickled Python objects are refused unless asked for; nothing is written.
    assert cli.main(["import", "pixeldit", str(ckpt), str(out)]) == 2
    text = capsys.readouterr().out
    assert "holds Python objects besides tensors, which loading it safely refuses (such as a fractions.Fraction)" in text
    assert "--allow-pickle" in text and not out.exists()
    assert cli.main(["import", "pixeldit", str(ckpt), str(out), "--allow-pickle"]) == 0
    sampler = OmegaConf.load(out.with_suffix(".yaml")).sampler  # 256 px: the 320-epoch checkpoint's FID 1.61
    assert (sampler.kind, sampler.steps, sampler.cfg_scale, list(sampler.cfg_interval)) == ("ab2", 100, 2.75, [0.1, 0.9])
    clean = _lightning_checkpoint(state, tmp_path / "clean.ckpt")
    for args, message in ((["model.decoder.depth=3"], "the model keys come from the checkpoint"),
                          (["sampler.cfg_scale=x"], "sampler.cfg_scale"),
                          (["--resolution", "7"], "model.trunk.patch_size"),
                          (["--weights", "model"], None)):
        target = tmp_path / f"b{len(args)}{args[0][2:6]}.safetensors"
        code = cli.main(["import", "pixeldit", str(clean), str(target), *args])
        text = capsys.readouterr().out
        if message is None:
            assert code == 0
            continue
        assert code == 2 and message in text.replace("\n", " "), text
        assert not target.exists()
    plain = tmp_path / "plain.safetensors"  # a bare state dict of the EMA, no trainer around it
    from safetensors.torch import save_file
    save_file(state, str(plain))
    assert cli.main(["import", "pixeldit", str(plain), str(tmp_path / "c.safetensors"), "--resolution", "8"]) == 0
    assert weights_metadata(tmp_path / "c.safetensors")["source"]["weights"] == "the model's state dict"


# ------------------------------------------------------------------------------------------------------ JiT
JIT_FIXTURE = ROOT / "tests" / "fixtures" / "jit_official" / "tiny.safetensors"


@pytest.fixture(scope="module")
def official_jit():
    data = load_file(str(JIT_FIXTURE))
    return {k.removeprefix("official."): v for k, v in data.items() if k.startswith("official.")}, data


def _jit_generator(converted):
    from pixelgen.models.config import DecoderConfig, JiTConfig, ModelConfig, TrunkConfig

    m = converted.model
    trunk = TrunkConfig(**{**m["trunk"], "jit": JiTConfig(**m["trunk"]["jit"])})
    model = families.build_generator(ModelConfig(trunk=trunk, decoder=DecoderConfig(**m["decoder"]),
                                                 num_classes=m["num_classes"]), converted.resolution).eval()
    model.load_state_dict(converted.state, strict=True)
    return model


def test_the_converted_jit_computes_the_official_forward_and_its_heun_sampler(official_jit):
    """3 blocks, the 3 in-context class tokens joining before block 2 (so blocks run with and without them), the
    null class in the batch; then JiT's own generate(): Heun, the last step Euler, x-prediction with the
    (1 - t) clamp, noise scale 2, CFG 2.5 on (0.1, 1.0)."""
    from pixelgen.diffusion import FlowMatching
    from pixelgen.models.config import ObjectiveConfig

    state, data = official_jit
    converted = convert("jit", state, context_start=2)
    assert converted.resolution == 8 and converted.objective == {"kind": "x_pred"}
    assert converted.model["trunk"]["jit"] == {"bottleneck": 6, "context_tokens": 3, "context_start": 2, "dropout": 0.0}
    model = _jit_generator(converted)
    with torch.no_grad():
        torch.testing.assert_close(model(data["input.x"], data["input.t"], data["input.y"]), data["output"],
                                   atol=2e-6, rtol=1e-5)
        # The in-context tokens matter, and join where the official code puts them.
        moved = _jit_generator(convert("jit", state, context_start=1))
        assert (moved(data["input.x"], data["input.t"], data["input.y"]) - data["output"]).abs().max() > 1e-3
    objective = FlowMatching(ObjectiveConfig(kind="x_pred", noise_scale=2.0, t_eps=0.05), 10, class_dropout=0.1)
    cfg = SamplerConfig(kind="heun", steps=4, cfg_scale=2.5, cfg_interval=[0.1, 1.0])
    x = sample(model, data["sample.y"], shape=(3, 8, 8), cfg=cfg, num_classes=10, noise=2.0 * data["sample.noise"],
               objective=objective)
    torch.testing.assert_close(x, data["sample.heun"].clamp(-1, 1), atol=2e-6, rtol=1e-5)


def _jit_checkpoint(state, path: Path, model_name="JiT-tiny"):
    """What main_jit.py saves: the Denoiser's state dict (the network under net.) and its two EMAs, with the
    training arguments as an argparse.Namespace."""
    def net(scale):  # the position table is a constant: every copy holds it as it is
        return {f"net.{k}": v if k == "pos_embed" else v * scale for k, v in state.items()}

    torch.save({"model": net(0.0), "model_ema1": net(1.0), "model_ema2": net(2.0), "epoch": 3,
                "optimizer": {"state": {}}, "args": argparse.Namespace(model=model_name, img_size=8)}, path)
    return path


def test_import_jit_reads_its_training_checkpoint(official_jit, tmp_path, capsys):
    state, data = official_jit
    ckpt = _jit_checkpoint(state, tmp_path / "checkpoint-last.pth")
    out = tmp_path / "jit.safetensors"
    # A size the paper does not have, and the file does not name one: the block the tokens join is asked for.
    assert cli.main(["import", "jit", str(ckpt), str(out)]) == 2
    assert "give it (pixelgen import jit ... --context-start N)" in capsys.readouterr().out and not out.exists()
    assert cli.main(["import", "jit", str(ckpt), str(out), "--resolution", "16", "--context-start", "2"]) == 2
    assert "the checkpoint's weights are for 8 px images" in capsys.readouterr().out
    assert cli.main(["import", "jit", str(ckpt), str(out), "--context-start", "2", "sampler.steps=4"]) == 0
    capsys.readouterr()
    meta = weights_metadata(out)
    assert meta["source"]["weights"] == "model_ema1/net"
    cfg = load_config(out.with_suffix(".yaml"), [f"data.shard_dir={tmp_path}"])
    assert (cfg.data.resolution, cfg.objective.kind, cfg.objective.t_eps, cfg.sampler.kind, cfg.sampler.steps) == \
        (8, "x_pred", 0.05, "heun", 4)
    model = _load_generator(cfg, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data["input.x"], data["input.t"], data["input.y"]), data["output"],
                                   atol=2e-6, rtol=1e-5)
    # A size the file's arguments name must be the size of its weights; the second EMA on request.
    named = _jit_checkpoint(state, tmp_path / "b.pth", "JiT-B/16")
    assert cli.main(["import", "jit", str(named), str(tmp_path / "b.safetensors")]) == 2
    assert "training arguments name JiT-B/16 (12 blocks), its weights have 3" in capsys.readouterr().out
    assert cli.main(["import", "jit", str(named), str(tmp_path / "b.safetensors"), "--weights", "ema2",
                     "--context-start", "2"]) == 0
    assert "JiT (JiT-B/16): 3 blocks" in capsys.readouterr().out
    b = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(b["trunk.embed_out.bias"], 2.0 * state["x_embedder.proj2.bias"])
    assert cli.main(["import", "jit", str(named), str(tmp_path / "c.safetensors"), "--weights", "ema3"]) == 2
    assert "--weights ema3: a jit checkpoint holds ema | ema2 | model" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- DeCo
DECO_FIXTURE = ROOT / "tests" / "fixtures" / "deco_official" / "tiny.safetensors"


@pytest.fixture(scope="module")
def official_deco():
    data = load_file(str(DECO_FIXTURE))
    return {k.removeprefix("official."): v for k, v in data.items() if k.startswith("official.")}, data


def _deco_generator(converted, **decoder):
    """The converted generator; `decoder` overrides model.decoder keys (to switch one of DeCo's options back)."""
    from pixelgen.models.config import DecoderConfig, ModelConfig, RepaConfig, TrunkConfig

    m = converted.model
    cfg = ModelConfig(trunk=TrunkConfig(**m["trunk"]), decoder=DecoderConfig(**{**m["decoder"], **decoder}),
                      num_classes=m["num_classes"], repa=RepaConfig(**m["repa"]))
    return families.build_generator(cfg, 16).eval()


def test_the_converted_deco_computes_the_official_forward(official_deco):
    state, data = official_deco
    converted = convert("deco", state)
    assert converted.model["trunk"] == {"kind": "pixeldit", "size": None, "patch_size": 4, "dim": 32, "depth": 2,
                                        "heads": 2, "mlp_ratio": 4.0}
    assert converted.model["decoder"] == {"kind": "mlp", "adaln": "factored", "pixel_dim": 8, "depth": 2,
                                          "mlp_hidden": 8, "norm": "layer", "activation": "silu", "dct": "deco"}
    model = _deco_generator(converted)
    model.load_state_dict(converted.state, strict=True)
    x, t, y = data["input.x"], data["input.t"], data["input.y"]  # 4 x 6 patches; the second label is the null class
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), data["output"], atol=2e-6, rtol=1e-5)
    # Each of DeCo's three decoder options matters: with it set back to pixelgen's the output is another one.
    for key, value in (("norm", "rms"), ("activation", "gelu"), ("dct", "pixelgen")):
        other = _deco_generator(converted, **{key: value})
        weights = dict(converted.state)
        if key == "norm":  # RMSNorm has no bias, and a weight before the output layer
            weights = {k: v for k, v in weights.items() if not k.endswith("norm.bias")}
            weights["decoder.final_norm.weight"] = torch.ones(8)
        if key == "dct":  # 16 DCT-II features at patch 4 instead of DeCo's 64
            weights["decoder.pixel_embed.weight"] = weights["decoder.pixel_embed.weight"][:, :3 + 16]
        other.load_state_dict(weights, strict=True)
        with torch.no_grad():
            assert (other(x, t, y) - data["output"]).abs().max() > 1e-3, key


def test_the_deco_position_table_is_the_official_one(official_deco):
    """At DeCo-XL's patch 16, which the tiny model (patch 4) does not reach."""
    from pixelgen.models.decoder import deco_features

    _, data = official_deco
    torch.testing.assert_close(deco_features(16), data["table.dct16"], atol=1e-7, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_the_euler_sampler_with_cfg_follows_the_official_deco_trajectory(official_deco, shift):
    """EulerSampler, 5 steps, CFG 2.5 on t in (0.1, 0.9]: the first step is outside the interval (t = 0 at any
    shift); at time shift 2 the steps are unequal."""
    state, data = official_deco
    converted = convert("deco", state)
    model = _deco_generator(converted)
    model.load_state_dict(converted.state, strict=True)
    trajectory = data[f"sample.shift{shift:g}"]  # [steps + 1, B, C, H, W], noise first
    cfg = SamplerConfig(kind="euler", steps=5, cfg_scale=2.5, cfg_interval=[0.1, 0.9], time_shift=shift)
    for steps in (1, 2):
        torch.testing.assert_close(_partial(model, data, cfg, steps), trajectory[steps], atol=2e-6, rtol=1e-5)
    x = sample(model, data["sample.y"], shape=(3, 8, 8), cfg=cfg, num_classes=10, noise=data["sample.noise"])
    torch.testing.assert_close(x, trajectory[5].clamp(-1, 1), atol=2e-6, rtol=1e-5)  # the official x is unclamped


def test_import_deco_writes_weights_and_the_published_sampler(official_deco, tmp_path, capsys):
    state, data = official_deco
    ckpt = _lightning_checkpoint(state, tmp_path / "deco.ckpt")  # with a diffusion_trainer.* (REPA) entry
    out = tmp_path / "deco.safetensors"
    assert cli.main(["import", "deco", str(ckpt), str(out)]) == 0
    text = capsys.readouterr().out
    assert "54,187 parameters" in text  # the official 54,259 less input_proj's 8 x 8 + 8, fused into the embedding
    assert "DeCo: 2 trunk blocks x 32" in text
    assert weights_metadata(out)["source"]["weights"] == "state_dict/ema_denoiser"
    cfg = load_config(out.with_suffix(".yaml"), [f"data.shard_dir={tmp_path}"])
    s = cfg.sampler  # 256 px: the 800-epoch checkpoint's FID 1.62
    assert (s.kind, s.steps, s.cfg_scale, list(s.cfg_interval), s.time_shift) == ("euler", 100, 3.2, [0.1, 1.0], 1.0)
    assert (cfg.model.decoder.norm, cfg.model.decoder.activation, cfg.model.decoder.dct) == ("layer", "silu", "deco")
    model = _load_generator(cfg, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(data["input.x"], data["input.t"], data["input.y"]), data["output"],
                                   atol=2e-6, rtol=1e-5)
    big = tmp_path / "deco512.safetensors"
    assert cli.main(["import", "deco", str(ckpt), str(big), "--resolution", "512"]) == 0
    assert OmegaConf.load(big.with_suffix(".yaml")).sampler.cfg_scale == 5.0


def test_a_deco_checkpoint_that_does_not_fit_is_named(official_deco, tmp_path, capsys):
    state, _ = official_deco
    missing = {k: v for k, v in state.items() if k != "dec_net.res_blocks.1.in_ln.bias"}
    with pytest.raises(CheckpointMismatch, match=r"no tensor 'dec_net\.res_blocks\.1\.in_ln\.bias'"):
        convert("deco", missing)
    reshaped = {**state, "dec_net.cond_embed.weight": torch.zeros(64, 32)}
    with pytest.raises(CheckpointMismatch, match=r"'dec_net\.cond_embed\.weight' has shape \(64, 32\), expected \(128, 32\)"):
        convert("deco", reshaped)
    freqs = {**state, "x_embedder.embedder.0.weight": torch.zeros(8, 3 + 16)}
    with pytest.raises(CheckpointMismatch, match=r"'x_embedder\.embedder\.0\.weight' takes 3 \+ 16 inputs"):
        convert("deco", freqs)
    extra = {**state, "dec_net.final_layer.norm_final.weight": torch.ones(8)}
    with pytest.raises(CheckpointMismatch, match=r"1 tensors .* no place in the model \(dec_net\.final_layer\.norm_final"):
        convert("deco", extra)
    # Another code base's checkpoint, through the command: refused naming the file, nothing written.
    other = {k.removeprefix("official."): v for k, v in load_file(str(FIXTURE)).items() if k.startswith("official.")}
    pixeldit = _lightning_checkpoint(other, tmp_path / "pixeldit.ckpt")
    out = tmp_path / "x.safetensors"
    assert cli.main(["import", "deco", str(pixeldit), str(out)]) == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert "pixeldit.ckpt" in text and "DeCo: 0 trunk blocks and 0 decoder ResBlocks" in text and not out.exists()
