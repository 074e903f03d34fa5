"""Parameters, forward GFLOPs and estimated training memory of the named sizes and of the decoder design space.

    .venv/bin/python benchmarks/model_zoo.py [--out docs/models.md]

Everything is counted on fake tensors (torch's FakeTensorMode), so nothing is allocated and no GPU is needed:
parameters and FLOPs are exact counts for the code as it is, memory is pixelgen.models.memory's estimate.
FLOPs follow PixelDiT's tools/compute_flops.py: 2 per multiply-add, matmuls (Linear) and attention
(Q K^T and A V) only, one image, one forward. Three tables:
  1. B, L, XL at 256 px, patch 16: parameters against the paper's, GFLOPs, memory per GPU;
  2. the JiT family (configs/jit_*.yaml) at 256 px, patch 16: the same, against the JiT paper's;
  3. the decoder's knobs on the XL trunk: decoder parameters, GFLOPs and activations per sample.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode

from pipeline.config import load_config

from pixelgen.engine import flops
from pixelgen.families import build_generator
from pixelgen.models import SIZES, count_params
from pixelgen.models.config import DecoderConfig, ModelConfig, TrunkConfig
from pixelgen.models.memory import GiB, estimate_memory

RESOLUTION = 256
PATCH = 16
# PixelDiT paper (arXiv 2511.20645); see /work/shared/reference/models.md. GFLOPs known for XL only.
PUBLISHED_PARAMS_M = {"B": 184, "L": 569, "XL": 797}
PUBLISHED_GFLOPS = {"XL": 311}

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The JiT family (Li & He, "Back to Basics: Let Denoising Generative Models Denoise"): (name, config, the paper's
# parameters in millions, the paper's GFLOPs per forward at 256 px). JiT counts a multiply-add as one FLOP.
JIT: list[tuple[str, str, int, int]] = [
    ("JiT-B/16", "jit_b16.yaml", 131, 25),
    ("JiT-L/16", "jit_l16.yaml", 459, 88),
    ("JiT-H/16", "jit_h16.yaml", 953, 182),
    ("JiT-G/16", "jit_g16.yaml", 2000, 383),
]

# Decoder knobs on the XL trunk, as DecoderConfig overrides of the XL decoder (pit, pixel dim 16, 4 blocks,
# 16 heads, compact attention, pixel-wise AdaLN). Add a row here to measure another design.
DESIGNS: list[tuple[str, dict]] = [
    ("pit (XL as published)", {}),
    ("pit, pixel_dim 32", {"pixel_dim": 32}),
    ("pit, pixel_dim 64", {"pixel_dim": 64}),
    ("pit, heads 1", {"heads": 1}),
    ("pit, heads 4", {"heads": 4}),
    ("pit, adaln patch", {"adaln": "patch"}),
    ("pit, adaln factored", {"adaln": "factored"}),
    ("pit, attention pixel (width 16, 4 heads)", {"attention": "pixel", "heads": 4}),
    ("pit, attention pixel (width 64, 4 heads)", {"attention": "pixel", "heads": 4, "attn_dim": 64}),
    ("mlp, adaln factored (DeCo-like)", {"kind": "mlp", "adaln": "factored"}),
    ("mlp, pixel_dim 32, adaln factored", {"kind": "mlp", "pixel_dim": 32, "adaln": "factored"}),
    ("DeCo-XL's (mlp, pixel_dim 32, 3 blocks, hidden 32, adaln factored, LayerNorm, SiLU, DeCo's DCT)",
     {"kind": "mlp", "adaln": "factored", "pixel_dim": 32, "depth": 3, "mlp_hidden": 32, "norm": "layer",
      "activation": "silu", "dct": "deco"}),
    ("mlp, adaln pixel", {"kind": "mlp"}),
    ("mixer, adaln pixel", {"kind": "mixer"}),
    ("mixer, adaln factored", {"kind": "mixer", "adaln": "factored"}),
]


def named(size: str) -> ModelConfig:
    """The named size spelled out, so decoder keys can be overridden (a `size` key would reset them)."""
    s = SIZES[size]
    return ModelConfig(trunk=TrunkConfig(patch_size=PATCH, dim=s.dim, depth=s.depth, heads=s.heads),
                       decoder=DecoderConfig(pixel_dim=s.pixel_dim, depth=s.pixel_depth, heads=s.pixel_heads))


def decoder_only(name: str) -> bool:
    return name.startswith("decoder.")


@dataclass
class Counts:
    params: dict[str, int] = field(default_factory=dict)  # trunk, decoder, total
    flops: dict[str, int] = field(default_factory=dict)  # trunk, decoder, attention, total (one image, forward)


def count(model_cfg: ModelConfig, resolution: int) -> Counts:
    with FakeTensorMode():
        model = build_generator(model_cfg, resolution, pretrained=False)
        x = torch.randn(1, 3, resolution, resolution)
        t, y = torch.rand(1), torch.zeros(1, dtype=torch.long)
        counter = flops.counter()
        with torch.no_grad(), counter:
            model(x, t, y)
    by_module = counter.get_flop_counts()
    root = type(model).__name__
    out = Counts()
    for part in ("trunk", "decoder"):
        out.params[part] = count_params(getattr(model, part))
        out.flops[part] = sum(by_module.get(f"{root}.{part}", {}).values())
    out.params["total"] = count_params(model)
    out.flops["total"] = counter.get_total_flops()
    out.flops["attention"] = sum(n for op, n in by_module["Global"].items() if "scaled_dot_product" in str(op))
    return out


def sizes_table(sizes: list[str], batch: int, gpus: int, zero_stage: int) -> tuple[list[str], list[str]]:
    """(markdown rows, phrases comparing with the paper)."""
    rows = [
        "| size | trunk | decoder | total | paper | diff | GFLOPs trunk | GFLOPs decoder | GFLOPs total | paper "
        "| model states, joint | joint, no ckpt | joint, ckpt | decoder stage, no ckpt | decoder stage, ckpt |",
        "|---|" + "---:|" * 14,
    ]
    gaps, truncated = [], True
    for size in sizes:
        cfg = named(size)
        c = count(cfg, RESOLUTION)
        mem = dict(batch_size=batch, world_size=gpus, zero_stage=zero_stage, precision="bf16")
        joint = estimate_memory(cfg, RESOLUTION, **mem)
        dec = estimate_memory(cfg, RESOLUTION, trainable=decoder_only, **mem)
        paper, paper_flops = PUBLISHED_PARAMS_M.get(size), PUBLISHED_GFLOPS.get(size)
        diff = "-"
        if paper:
            diff = f"{100 * (c.params['total'] / (paper * 1e6) - 1):+.2f}%"
            gaps.append(f"{size} {c.params['total'] / 1e6:.1f}M vs {paper}M ({diff})")
            truncated &= c.params["total"] // 10**6 == paper
        if paper_flops:
            gaps.append(f"{size} {c.flops['total'] / 1e9:.1f} GFLOPs vs {paper_flops}, of which attention "
                        f"{c.flops['attention'] / 1e9:.1f}")
        memory = [_gib(e.model_state_bytes + batch * a) for e in (joint, dec)
                  for a in (e.activations_per_sample, e.activations_per_sample_checkpointed)]
        states = f"{_gib(joint.model_state_bytes)} (EMA {joint.ema_bytes / GiB:.1f})"
        rows.append(
            f"| {size} | {_m(c.params['trunk'])} | {_m(c.params['decoder'])} | {_m(c.params['total'])} "
            f"| {f'{paper}M' if paper else '-'} | {diff} | {_g(c.flops['trunk'])} | {_g(c.flops['decoder'])} "
            f"| {_g(c.flops['total'])} | {paper_flops or '-'} | {states} | " + " | ".join(memory) + " |"
        )
    if truncated and any(size in PUBLISHED_PARAMS_M for size in sizes):
        gaps.append("every parameter count truncated to whole millions gives the paper's figure, so the gaps look "
                    "like the paper truncating, not a different architecture")
    return rows, gaps


def jit_config(name: str) -> tuple[ModelConfig, int]:
    """The model section of configs/NAME as a ModelConfig, and how many EMAs its trunk stage keeps."""
    cfg = load_config(CONFIGS / name, ["data.imagenet_dir=/x", "data.shard_dir=/x"])  # paths only validated
    return OmegaConf.to_object(cfg.model), len(cfg.train_trunk.ema_decays)


def jit_table(batch: int, gpus: int, zero_stage: int) -> tuple[list[str], list[str], set[int]]:
    """(markdown rows, phrases comparing with the JiT paper, the EMA counts of the configs)."""
    rows = [
        "| model | trunk | decoder | total | paper | diff | GFLOPs trunk | GFLOPs decoder | GFLOPs total "
        "| JiT's GFLOPs | ratio | model states, joint | joint, no ckpt | joint, ckpt |",
        "|---|" + "---:|" * 13,
    ]
    gaps, ema_counts = [], set()
    for name, path, paper, paper_flops in JIT:
        cfg, emas = jit_config(path)
        ema_counts.add(emas)
        c = count(cfg, RESOLUTION)
        joint = estimate_memory(cfg, RESOLUTION, batch_size=batch, world_size=gpus, zero_stage=zero_stage,
                                precision="bf16", emas=emas)
        diff = f"{100 * (c.params['total'] / (paper * 1e6) - 1):+.2f}%"
        ratio = c.flops["total"] / (paper_flops * 1e9)
        gaps.append(f"{name} {c.params['total'] / 1e6:.1f}M vs {_paper_m(paper)} ({diff}), "
                    f"{c.flops['total'] / 1e9:.1f} GFLOPs = {ratio:.2f} x JiT's {paper_flops}")
        memory_cols = [_gib(joint.model_state_bytes + batch * a)
                       for a in (joint.activations_per_sample, joint.activations_per_sample_checkpointed)]
        states = f"{_gib(joint.model_state_bytes)} (EMA {joint.ema_bytes / GiB:.1f})"
        rows.append(
            f"| {name} | {_m(c.params['trunk'])} | {_m(c.params['decoder'])} | {_m(c.params['total'])} "
            f"| {_paper_m(paper)} | {diff} | {_g(c.flops['trunk'])} | {_g(c.flops['decoder'])} "
            f"| {_g(c.flops['total'])} | {paper_flops} | {ratio:.2f} | {states} | " + " | ".join(memory_cols) + " |"
        )
    return rows, gaps, ema_counts


def _paper_m(millions: int) -> str:
    return f"{millions // 1000}B" if millions % 1000 == 0 else f"{millions}M"


def designs_table(batch: int) -> list[str]:
    rows = [
        "| decoder | params | GFLOPs | activations / sample, no ckpt | activations / sample, ckpt |",
        "|---|---:|---:|---:|---:|",
    ]
    base = named("XL")
    for label, overrides in DESIGNS:
        cfg = ModelConfig(trunk=base.trunk, decoder=DecoderConfig(**{**vars(base.decoder), **overrides}))
        c = count(cfg, RESOLUTION)
        est = estimate_memory(cfg, RESOLUTION, batch_size=batch, trainable=decoder_only)
        rows.append(f"| {label} | {_m(c.params['decoder'])} | {_g(c.flops['decoder'])} "
                    f"| {_mib(est.activations_per_sample)} | {_mib(est.activations_per_sample_checkpointed)} |")
    return rows


def _emas(counts: set[int]) -> str:
    words = {1: "one fp32 EMA", 2: "two fp32 EMAs", 3: "three fp32 EMAs"}
    return " or ".join(words.get(n, f"{n} fp32 EMAs") for n in sorted(counts))


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _g(flops: int) -> str:
    return f"{flops / 1e9:.1f}"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def report(sizes: list[str], batch: int, gpus: int, zero_stage: int, command: str) -> str:
    t0 = time.time()
    table1, gaps = sizes_table(sizes, batch, gpus, zero_stage)
    table_jit, jit_gaps, jit_emas = jit_table(batch, gpus, zero_stage)
    table2 = designs_table(batch)
    seconds = time.time() - t0
    return "\n".join([
        "## Parameters, FLOPs, training memory",
        "",
        f"Produced by `{command}` ({seconds:.0f} s on a 2-core {platform.machine()} CPU, torch "
        f"{torch.__version__}, no GPU). Parameters and GFLOPs are exact counts of the code as it is, taken on "
        "fake tensors (`FakeTensorMode`, nothing allocated); GFLOPs are one forward of one image, counted like "
        "PixelDiT's `tools/compute_flops.py`: 2 FLOPs per multiply-add, in matmuls and attention (QK^T, AV) "
        "only. Memory per GPU is an estimate from `pixelgen.models.memory`: the ZeRO paper's accounting of bf16 "
        "weights, gradients and fp32 Adam states, the trainer's fp32 EMA, and activations = the bytes autograd "
        "saves in a traced training step (flow-matching loss); `tests/test_memory.py` checks the activation "
        "estimate against the measured peak of real CPU steps within 25% (it runs a few percent under, the "
        "measured peak also holding backward's transient buffers). Not counted: the CUDA context, allocator "
        "fragmentation, DeepSpeed's communication buckets, the REPA teacher; budget a few GiB on top. Against "
        f"the paper: {'; '.join(gaps)}.",
        "",
        f"### Named sizes at {RESOLUTION} px, patch {PATCH}",
        "",
        f"Memory per GPU in GiB: bf16, ZeRO-{zero_stage} over {gpus} GPUs, batch {batch} per GPU. *joint*: every "
        "parameter trains (trunk stage, end to end as in PixelDiT); *decoder stage*: the trunk is frozen. "
        "*ckpt*: activation checkpointing on every trunk and decoder block. *model states*: weights, gradients, "
        "optimizer states and one fp32 EMA (sharded over the GPUs like the fp32 masters it averages), before activations.",
        "",
        *table1,
        "",
        f"### JiT at {RESOLUTION} px, patch 16",
        "",
        "The JiT family as configured in `configs/jit_{b,l,h,g}16.yaml` (trunk kind jit, decoder kind linear: "
        "JiT's output layer, the *decoder* column). GFLOPs are counted as in the tables above (2 per multiply-add, matmuls and "
        "attention only); JiT's paper counts a multiply-add as one FLOP, so *ratio* (ours / JiT's) should be "
        "about 2. The paper's parameters are rounded (G's \"2B\" most of all). Memory per GPU in GiB as for the "
        f"named sizes (bf16, ZeRO-{zero_stage} over {gpus} GPUs, batch {batch} per GPU, not the configs' 1024 "
        "over the cluster); JiT trains end to end, so only the *joint* columns apply, and *model states* hold "
        f"{_emas(jit_emas)} (the configs' `ema_decays`). The activations are traced with the flow-matching loss "
        "of the other tables; JiT's x-prediction v-loss adds a few image-sized fp32 tensors (under 1 MiB each "
        f"per sample) to that. Against the paper: {'; '.join(jit_gaps)}.",
        "",
        *table_jit,
        "",
        "### Decoder design space on the XL trunk",
        "",
        f"XL trunk (width 1152, 26 blocks) at {RESOLUTION} px; each row changes the XL decoder (pit, pixel_dim "
        "16, 4 blocks, 16 heads, compact attention at the trunk width, pixel-wise AdaLN) as named. Params and "
        "GFLOPs are the decoder's. Activations are those of the decoder stage (trunk frozen, so they are the "
        f"decoder's alone), bf16, per sample at batch {batch}: multiply by the batch per GPU and add the model "
        "states above.",
        "",
        *table2,
        "",
        "The trace dispatches attention like the CPU, whose fused kernel saves q, k, v, the output and the "
        "logsumexp for any head size. On the GPU, PyTorch picks flash or memory-efficient attention (the same "
        "saves) only for shapes they support; with a head dim that is not a multiple of 8 (the pixel attention "
        "of width 16 with 4 heads has 4) it may pad q, k, v or fall back to the math kernel, which would also "
        "save the 256 x 256 attention matrix of every patch and head (for that row +128 MiB per sample and block "
        "in bf16, +512 MiB over its 4 blocks). Not checked on a GPU yet.",
        "",
    ])


MARKER = "<!-- generated by benchmarks/model_zoo.py below this line -->"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the markdown here (e.g. docs/models.md) instead of stdout")
    parser.add_argument("--sizes", nargs="+", default=["B", "L", "XL"], choices=list(SIZES),
                        help="named sizes for the first table (default: B L XL)")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU for the memory columns (default 32)")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs for ZeRO partitioning (default 8)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage (default 2)")
    args = parser.parse_args(argv)
    command = "python benchmarks/model_zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(args.sizes, args.batch, args.gpus, args.zero_stage, command.strip())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # A hand-written part above the marker (the guide in docs/models.md) is kept; the tables below it are replaced.
        old = args.out.read_text() if args.out.exists() else ""
        head = old[:old.index(MARKER) + len(MARKER)] + "\n\n" if MARKER in old else ""
        args.out.write_text(head + text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
