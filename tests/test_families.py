"""Each model family trains in the existing stages, through the real `pixelgen` command: REPA with JiT's
x-prediction (configs/tiny_repa.yaml) and the DINO student with LoRA (configs/tiny_student.yaml); and every
example config in configs/ builds (on the meta device: no memory) with its published parameter count."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, load_config
from pixelgen.families import build_generator
from pixelgen.models import count_params
from tests.conftest import ROOT, TINY, pixelgen

CONFIGS = ROOT / "configs"


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, fake_imagenet) -> Path:
    run_dir = tmp_path_factory.mktemp("shards") / "run"
    pixelgen("stage", "shard", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}")
    return run_dir / "shard"


def test_repa_family_trains_in_the_stages(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    # bf16 and ZeRO-3 as on a GPU (slow on the CPU, but the same DeepSpeed and autocast path): the generator's
    # fp32 inputs, buffers and teacher meet bf16 weights here.
    proc = pixelgen("run", str(CONFIGS / "tiny_repa.yaml"), f"run_dir={run_dir}", f"data.shard_dir={tiny_shards}",
                    "train_trunk.precision=bf16", "train_trunk.zero_stage=3", "train_decoder.precision=bf16",
                    "--executor", "debug")
    for stage in ("train_trunk", "train_decoder", "fid"):
        assert (run_dir / stage / "DONE.json").is_file(), proc.stdout
    trunk_log = _metrics(run_dir, "train_trunk")
    # The REPA term is logged beside the flow-matching loss and the total is their weighted sum.
    for r in trunk_log:
        assert 0.0 <= r["repa_loss"] <= 2.0
        assert r["loss"] == pytest.approx(r["fm_loss"] + 0.5 * r["repa_loss"], rel=1e-4)
    # The decoder stage freezes the trunk, so there is nothing to align: no REPA term, no teacher.
    assert all("repa_loss" not in r for r in _metrics(run_dir, "train_decoder"))
    trunk = load_file(run_dir / "train_trunk" / "export" / "ema.safetensors")  # what the decoder stage starts from
    dec = load_file(run_dir / "train_decoder" / "export" / "model.safetensors")
    assert trunk["projector.4.weight"].shape == (768, 32)  # trunk width -> DINOv2-B width
    for k in trunk:
        if not k.startswith("decoder."):
            assert torch.equal(trunk[k], dec[k]), k  # trunk and projector frozen in the decoder stage
    assert any(not torch.equal(trunk[k], dec[k]) for k in trunk if k.startswith("decoder."))
    assert "decoder.blocks.0.attn.qkv.weight" in dec  # per-patch pixel attention
    assert json.loads((run_dir / "fid" / "metrics.json").read_text())["fid"] > 0


def test_jit_family_trains_and_is_scored_in_the_stages(tmp_path, tiny_shards):
    """JiT end to end in the trunk stage (no decoder stage: its decoder is its output layer), x-prediction, then
    the FID stage samples it with Heun and CFG."""
    run_dir = tmp_path / "run"
    proc = pixelgen("run", str(CONFIGS / "tiny_jit.yaml"), f"run_dir={run_dir}", f"data.shard_dir={tiny_shards}",
                    "--executor", "debug")
    for stage in ("train_trunk", "fid"):
        assert (run_dir / stage / "DONE.json").is_file(), proc.stdout
    assert not (run_dir / "train_decoder").exists()
    log = _metrics(run_dir, "train_trunk")
    assert len(log) == 2 and all(0 < r["loss"] < 10 and "repa_loss" not in r for r in log)  # the v-loss alone
    ema = load_file(run_dir / "train_trunk" / "export" / "ema.safetensors")
    assert ema["trunk.context_pos"].shape == (1, 2, 32) and ema["decoder.linear.weight"].shape == (4 * 4 * 3, 32)
    assert ema["decoder.linear.weight"].abs().max() > 0  # the zero-initialised output layer trained
    assert json.loads((run_dir / "fid" / "metrics.json").read_text())["fid"] > 0
    # Refused before anything runs: a decoder stage, a decoder JiT has no use for, in-context tokens past the end.
    with pytest.raises(ConfigError, match=r"'stages'.*JiT trains end to end in train_trunk"):
        _tiny("tiny_jit", "stages=[train_trunk,train_decoder]")
    with pytest.raises(ConfigError, match=r"'model.decoder.kind'.*the pit decoder needs trunk kind pixeldit"):
        _tiny("tiny_jit", "model.decoder.kind=pit")
    with pytest.raises(ConfigError, match=r"'model.trunk.jit.context_start' = 3: must be a block index in 0..2"):
        _tiny("tiny_jit", "model.trunk.jit.context_start=3")


def test_dino_student_family_trains_in_the_stages(tmp_path, fake_imagenet):
    from pixelgen.models.config import TeacherConfig
    from pixelgen.models.teachers import create_dino

    torch.manual_seed(0)
    teacher = create_dino(TeacherConfig(name="vit_small_patch16_dinov3", depth=1, allow_random_init=True))
    weights = tmp_path / "dinov3_s16_depth1.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, weights)

    run_dir = tmp_path / "run"
    proc = pixelgen("run", str(CONFIGS / "tiny_student.yaml"), f"run_dir={run_dir}",
                    f"data.imagenet_dir={fake_imagenet}", f"model.trunk.student.teacher.weights={weights}",
                    "--executor", "debug")
    for stage in ("shard", "train_trunk", "train_decoder", "fid"):
        assert (run_dir / stage / "DONE.json").is_file(), proc.stdout
    assert all(0.0 <= r["student_loss"] <= 2.0 for r in _metrics(run_dir, "train_trunk"))
    exported = load_file(run_dir / "train_trunk" / "export" / "model.safetensors")
    # The student started from the teacher's file, and LoRA kept every base weight of it frozen ...
    for k, v in load_file(weights).items():
        name = f"trunk.encoder.{k}"
        if name not in exported:  # a Linear wrapped by LoRA keeps its weights under .base
            name = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(exported[name], v), name
    # ... while the adapters and the semantic blocks trained: both start at zero (LoRA's B, adaLN-Zero).
    lora_b = [k for k in exported if k.endswith("lora_B")]
    assert lora_b and all(exported[k].abs().sum() > 0 for k in lora_b)
    assert exported["trunk.semantic.blocks.0.adaLN.weight"].abs().sum() > 0
    assert json.loads((run_dir / "fid" / "metrics.json").read_text())["fid"] > 0


@pytest.mark.parametrize("name,published", [("pixeldit_b", 184e6), ("pixeldit_xl_repa", 797e6),
                                            ("dino_student_s", None), ("demo", None), ("tiny", None),
                                            ("tiny_repa", None), ("tiny_student", None),
                                            ("dual_ar_discrete_b", None), ("dual_ar_continuous_b", None),
                                            ("ar_diffusion_b", None), ("tiny_dual_ar_discrete", None),
                                            ("tiny_dual_ar_continuous", None), ("tiny_ar_diffusion", None),
                                            ("jit_b16", 131e6), ("jit_l16", 459e6), ("jit_h16", 953e6),
                                            ("jit_g16", 2.0e9), ("tiny_jit", None)])
def test_every_example_config_loads_and_builds(name, published):
    # Teacher files are not here: a random teacher stands in (what the config would load is checked elsewhere).
    overrides = ["data.imagenet_dir=/x", "data.shard_dir=/x"]
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    if OmegaConf.select(raw, "model.repa.weight"):
        overrides += ["model.repa.teacher.weights=null", "model.repa.teacher.allow_random_init=true"]
    if OmegaConf.select(raw, "model.trunk.kind") == "dino_student":
        overrides += ["model.trunk.student.teacher.weights=null", "model.trunk.student.teacher.allow_random_init=true"]
    if OmegaConf.select(raw, "model.trunk.kind") == "semantic_ar":
        overrides += ["model.trunk.ar.teacher.weights=null", "model.trunk.ar.teacher.allow_random_init=true"]
    cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
    with torch.device("meta"):
        model = build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    # The family's networks, as the config names them.
    from pixelgen.families import check_model_config
    from pixelgen.models import ARGenerator, PatchLinearHead, PixelDecoder, PixelGenerator
    from pixelgen.models.ar_generator import PatchDiffusionHead
    from pixelgen.models.jit import JiTTrunk
    from pixelgen.models.pixel_ar import PixelARDecoder
    from pixelgen.models.semantic_ar import SemanticAR
    from pixelgen.models.student import DinoStudentTrunk
    from pixelgen.models.trunk import PatchTrunk

    kind, dec_kind = cfg.model.trunk.kind, cfg.model.decoder.kind
    trunk_cfg, dec_cfg = check_model_config(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    assert isinstance(model, ARGenerator if kind == "semantic_ar" else PixelGenerator)
    assert type(model.trunk) is {"pixeldit": PatchTrunk, "dino_student": DinoStudentTrunk, "semantic_ar": SemanticAR,
                                 "jit": JiTTrunk}[kind]
    if dec_kind == "pixel_ar":
        assert isinstance(model.decoder, PixelARDecoder)
    elif dec_kind == "linear":
        assert isinstance(model.decoder, PatchLinearHead)
    else:
        pixel = model.decoder.net if kind == "semantic_ar" else model.decoder
        assert isinstance(model.decoder, PatchDiffusionHead if kind == "semantic_ar" else PixelDecoder)
        assert isinstance(pixel, PixelDecoder) and pixel.kind == dec_kind
    if kind != "semantic_ar":
        assert len(model.trunk.blocks) == trunk_cfg.depth
        assert dec_kind == "linear" or len(model.decoder.blocks) == dec_cfg.depth
    assert (model.projector is not None) == (cfg.model.repa.weight > 0) if kind != "semantic_ar" else True
    if published:
        # The published count is the generator alone; REPA's projector is a training aid on top.
        n = count_params(model) - (count_params(model.projector) if model.projector is not None else 0)
        assert abs(n - published) / published < (0.01 if kind == "jit" else 0.02), n


# Methods B and C through the real command, each tiny config exercising another corner: a discrete AR with its
# k-means dictionary + categorical pixel AR with window context (z guidance); a continuous AR learned end to end
# + logistic pixel AR with the left neighbour (semantic guidance); a discrete AR + per-patch diffusion head (both).
AR_CONFIGS = {"tiny_dual_ar_discrete": ("semantic_ce", "bits_per_dim"),
              "tiny_dual_ar_continuous": ("bits_per_dim", "bits_per_dim"),  # end to end: the decoder trains z
              "tiny_ar_diffusion": ("semantic_ce", "diffusion_loss")}


@pytest.mark.parametrize("name", list(AR_CONFIGS))
def test_semantic_ar_families_train_and_evaluate_in_the_stages(name, tmp_path, tiny_shards):
    trunk_term, decoder_term = AR_CONFIGS[name]
    run_dir = tmp_path / "run"
    sweep = ["fid.sweep=[guidance=decoder cfg_scale=2.0]"] if name == "tiny_ar_diffusion" else []
    proc = pixelgen("run", str(CONFIGS / f"{name}.yaml"), f"run_dir={run_dir}", f"data.shard_dir={tiny_shards}",
                    "stages=[train_trunk,train_decoder,fid]", *sweep, "--executor", "debug")
    for stage in ("train_trunk", "train_decoder", "fid"):
        assert (run_dir / stage / "DONE.json").is_file(), proc.stdout
    assert all(trunk_term in r for r in _metrics(run_dir, "train_trunk"))
    assert all(decoder_term in r for r in _metrics(run_dir, "train_decoder"))
    trunk = load_file(run_dir / "train_trunk" / "export" / "ema.safetensors")
    dec = load_file(run_dir / "train_decoder" / "export" / "model.safetensors")
    for k in trunk:
        if k.startswith("trunk."):
            assert torch.equal(trunk[k], dec[k]), k  # the semantic AR is frozen in the decoder stage
    assert any(not torch.equal(trunk[k], dec[k]) for k in trunk if k.startswith("decoder."))
    if "discrete" in OmegaConf.load(CONFIGS / f"{name}.yaml").model.trunk.ar.mode:
        # The k-means dictionary built in the trunk stage travels inside the weights, unchanged.
        entries = load_file(run_dir / "train_trunk" / "dictionary.safetensors")["dictionary"]
        assert entries.shape == (8, 384) and entries.abs().sum() > 0
        assert torch.equal(dec["trunk.dictionary"], entries)
    metrics = json.loads((run_dir / "fid" / "metrics.json").read_text())
    assert metrics["fid"] > 0
    if sweep:
        assert [row["sampler"] for row in metrics["sweep"]] == ["", "guidance=decoder cfg_scale=2.0"]
        assert metrics["sweep"][0]["fid"] == metrics["fid"] and metrics["sweep"][1]["fid"] > 0
        assert "sweep best" in proc.stdout


def test_two_ranks_share_rank_zeros_dictionary(tmp_path, tiny_shards):
    # Rank 0 clusters while rank 1 waits at a barrier; both then train with the entries rank 0 wrote.
    run_dir = tmp_path / "run"
    proc = pixelgen("run", str(CONFIGS / "tiny_dual_ar_discrete.yaml"), f"run_dir={run_dir}",
                    f"data.shard_dir={tiny_shards}", "stages=[train_trunk]", "launch.train_trunk.tasks=2",
                    "--executor", "local")
    assert (run_dir / "train_trunk" / "DONE.json").is_file(), proc.stdout
    assert proc.stdout.count("dictionary: 8 entries") == 1, proc.stdout  # computed once, by rank 0
    entries = load_file(run_dir / "train_trunk" / "dictionary.safetensors")["dictionary"]
    assert torch.equal(load_file(run_dir / "train_trunk" / "export" / "model.safetensors")["trunk.dictionary"],
                       entries)


# ------------------------------------------------------------------------------------------- the registry
FAMILY_CONFIGS = {"tiny": "pixeldit", "tiny_repa": "pixeldit", "tiny_student": "dino_student",
                  "tiny_dual_ar_discrete": "semantic_ar", "tiny_dual_ar_continuous": "semantic_ar",
                  "tiny_ar_diffusion": "semantic_ar", "tiny_jit": "jit"}
STUDENT_STAND_IN = ["model.trunk.student.teacher.weights=null", "model.trunk.student.teacher.allow_random_init=true"]


def _tiny(name: str, *overrides: str):
    return load_config(CONFIGS / f"{name}.yaml", ["data.imagenet_dir=/x", "data.shard_dir=/x", *STUDENT_STAND_IN,
                                                 *overrides])


def test_the_registry_holds_one_family_per_trunk_kind():
    from pixelgen import families

    assert set(families.KINDS) == set(FAMILY_CONFIGS.values())
    for kind in families.KINDS:
        assert families.get(kind).kind == kind
    with pytest.raises(ValueError, match=r"'model.trunk.kind' = 'nosuch': must be one of pixeldit, dino_student"):
        families.get("nosuch")
    # A decoder only another family takes is refused with the family that takes it named.
    with pytest.raises(ConfigError, match=r"'model.decoder.kind'.*model.trunk.kind=semantic_ar"):
        _tiny("tiny", "model.decoder.kind=pixel_ar")


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_each_stage_trains_what_its_family_says(name):
    """Through the family's own loss and the engine's rule (a parameter trains when the family's predicate says
    so), one backward gives gradients to exactly the parameters the stage trains: the trunk stage of a
    semantic AR trains the AR alone (unless z is learned end to end), a frozen-trunk decoder stage the decoder."""
    from pixelgen import families
    from pixelgen.models.config import end_to_end

    cfg = _tiny(name)
    family = families.get(cfg.model.trunk.kind)
    assert family.kind == FAMILY_CONFIGS[name]
    model_cfg = OmegaConf.to_object(cfg.model)
    expect = {"train_trunk": "trunk." if family.kind == "semantic_ar" and not end_to_end(model_cfg.trunk.ar) else "",
              "train_decoder": "decoder."}
    for stage, prefix in expect.items():
        torch.manual_seed(0)
        model = families.build_generator(model_cfg, cfg.data.resolution)
        trains = family.trainable(cfg, stage)
        for n, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and trains(n))
        x = torch.rand(4, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
        y = torch.arange(4) % cfg.model.num_classes
        loss, parts = family.loss(cfg, stage, model_cfg, "cpu")(model, x, y)
        loss.backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert got and got <= trainable, (stage, sorted(got - trainable)[:4])
        assert all(n.startswith(prefix) for n in trainable), (stage, [n for n in trainable if not n.startswith(prefix)][:4])
        if prefix:  # the other part is frozen, and really gets nothing
            assert any(not n.startswith(prefix) for n, _ in model.named_parameters())
        # Every term the loss logs has a panel in the curves.
        assert set(parts) - {"loss"} <= set(family.plot_keys), (stage, set(parts) - set(family.plot_keys))


@pytest.mark.parametrize("name", ["tiny_dual_ar_discrete", "tiny_ar_diffusion", "tiny_dual_ar_continuous",
                                  "tiny_jit"])  # and JiT's blockless linear decoder
def test_memory_estimate_of_the_ar_families(name):
    from pixelgen.models.memory import estimate_memory

    cfg = _tiny(name)
    model_cfg = OmegaConf.to_object(cfg.model)
    with torch.device("meta"):
        model = build_generator(model_cfg, cfg.data.resolution)
    est = estimate_memory(model_cfg, cfg.data.resolution, batch_size=2)
    assert est.params_total == count_params(model)
    assert est.activations_per_sample > 0
    assert est.activations_per_sample_checkpointed < est.activations_per_sample


@pytest.mark.parametrize("sampler", [[], ["sampler.kind=heun", "sampler.cfg_scale=2.0"]])
def test_bf16_sampling_stays_close_to_fp32(sampler):
    """sampler.precision=bf16 (what `auto` gives on a GPU) runs the network under autocast while the ODE state
    and the guidance stay fp32: on a tiny PixelDiT with random non-zero weights, images in [-1, 1] differ from
    fp32 sampling by under 0.005 on average and 0.1 at most (0.0017 and 0.03 measured: 0.2 and 4 of 255 levels)."""
    from pixelgen import families

    images = {}
    for precision in ("fp32", "bf16"):
        cfg = _tiny("tiny", f"sampler.precision={precision}", *sampler)
        torch.manual_seed(0)
        model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution).eval()
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():  # wake the zero-initialised output layers, so the network's output matters
                    p.normal_(0.0, 0.2)
        draw = families.get("pixeldit").sampler(cfg)
        images[precision] = draw(model, torch.arange(4), torch.Generator().manual_seed(0))
    assert images["bf16"].dtype == torch.float32
    diff = (images["bf16"] - images["fp32"]).abs()
    assert 0 < diff.mean() < 0.005 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_bf16_on_a_gpu_also_turns_tf32_on_for_fp32_matmuls_and_restores_it():
    """Inside the sampling/training precision block on CUDA, fp32 matmuls may use TF32; outside (the Inception
    features of FID) and with precision fp32 (for checks) they stay strict fp32. CUDA's autocast itself is
    disabled without a GPU (with a warning); the TF32 switch is a host setting and is what this checks."""
    import warnings

    from pixelgen.precision import autocast

    before = torch.get_float32_matmul_precision()
    assert before == "highest"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available. Disabling" on this machine
        with autocast("bf16", "cuda"):
            assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    for precision, device in (("fp32", "cuda"), ("auto", "cpu"), ("bf16", "cpu")):
        with autocast(precision, device):
            assert torch.get_float32_matmul_precision() == "highest", (precision, device)
