"""Sampling step time with the position tables cached against rebuilt on every call, side by side in one run (CPU).

    .venv/bin/python benchmarks/position_tables.py [--repeats 21] [--write-docs]

The RoPE cos/sin tables, the decoder's 2D sin-cos pixel positions and the timestep frequencies depend on shapes
only. pixelgen.models.layers memoises them per arguments and device (`cached_table`); inside
`layers.tables_uncached()` every call builds them again, which is what the code did before the cache, so the two
paths run the same model on the same inputs and differ only in that. Cases:
  diffusion demo      pixelgen.diffusion.sample on the configs/demo.yaml generator (32 px, trunk 128 x 4 blocks,
                      PiT pixel dim 16 x 2, compact attention), Euler, CFG on every step (the model runs on the
                      conditional and the unconditional batch), batch 1 and 4: per forward the trunk's RoPE,
                      its timestep frequencies, the decoder's RoPE and its sin-cos pixel table;
  diffusion tiny      the same on the "tiny" size (patch 4, the tests' model), where per-op overhead weighs most;
  AR C (pit head)     pixelgen.ar.generate, method C: semantic AR 64 x 2 blocks, a PiT diffusion head (pixel dim
                      16 x 2), Euler per patch, guidance on z (the head runs on both batches): per head call its
                      RoPE, sin-cos and timestep frequencies;
  AR B (pixel AR)     method B at 8 px, pixel AR 64 x 4 blocks: generate builds its two RoPE tables once per call,
                      before its loops, with or without the cache: the control, whose distance from 1 is this run's
                      noise.
Random weights with every parameter nudged by N(0, 0.02^2) (the zero-initialised output layers would otherwise
make the outputs independent of the inputs); the time does not depend on the values. Per case, one untimed call
of each path, then `repeats` timed pairs in alternating order (so load from other work on this shared machine
falls on both), timed in CPU seconds of the process; the table has the medians and the median of the per-pair
ratios. Every pair must give identical samples (torch.equal). One torch thread.

Prints progress to stderr and a markdown section to stdout; --write-docs replaces the block between
<!-- position_tables:start --> and <!-- position_tables:end --> in docs/benchmarks.md (appending the section
"## Position tables: cached vs rebuilt per call (CPU)" when it is missing). The defaults take about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

import torch
from omegaconf import OmegaConf

from pixelgen import ar, diffusion
from pixelgen.families import build_generator
from pixelgen.models import layers
from pixelgen.models.config import (DecoderConfig, ModelConfig, ObjectiveConfig, PixelARConfig, SamplerConfig,
                                    SemanticARConfig, TeacherConfig, TrunkConfig)

from report import DOC, REPO, git_commit, log, machine, write_section

HEADING = "## Position tables: cached vs rebuilt per call (CPU)"
DIFFUSION_STEPS = 10
TEACHER = TeacherConfig(name="vit_small_patch16_dinov3", allow_random_init=True, depth=1)


def nudged(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def diffusion_case(model_cfg: ModelConfig, resolution: int, batch: int, seed: int) -> Callable[[], torch.Tensor]:
    torch.manual_seed(seed)
    model = nudged(build_generator(model_cfg, resolution), seed)
    cfg = SamplerConfig(kind="euler", steps=DIFFUSION_STEPS, cfg_scale=2.0, cfg_interval=[0.0, 1.0])
    y = torch.arange(batch) % model_cfg.num_classes

    def run():
        return diffusion.sample(model, y, shape=(3, resolution, resolution), cfg=cfg,
                                num_classes=model_cfg.num_classes, generator=torch.Generator().manual_seed(seed))
    return run


def ar_case(decoder: DecoderConfig, resolution: int, patch: int, batch: int, seed: int) -> Callable[[], torch.Tensor]:
    trunk = TrunkConfig(kind="semantic_ar", patch_size=patch, dim=64, depth=2, heads=4,
                        ar=SemanticARConfig(mode="continuous", z_dim=16, teacher=TEACHER))
    torch.manual_seed(seed)
    model = nudged(build_generator(ModelConfig(trunk=trunk, decoder=decoder, num_classes=4, class_dropout=0.0),
                                   resolution), seed)
    cfg = SamplerConfig(kind="euler", steps=DIFFUSION_STEPS, guidance="z", cfg_scale=2.0)
    y = torch.arange(batch) % 4

    def run():
        return ar.generate(model, y, cfg, objective=ObjectiveConfig(),
                           generator=torch.Generator().manual_seed(seed)).images
    return run


def demo_model() -> ModelConfig:
    model = OmegaConf.load(REPO / "configs" / "demo.yaml").model
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model))


# name, what one step is, steps per call, builder(batch, seed)
CASES: dict[str, tuple[str, int, Callable[[int, int], Callable[[], torch.Tensor]]]] = {
    "diffusion demo": ("sampler step (one CFG forward)", DIFFUSION_STEPS,
                       lambda batch, seed: diffusion_case(demo_model(), 32, batch, seed)),
    "diffusion tiny": ("sampler step (one CFG forward)", DIFFUSION_STEPS,
                       lambda batch, seed: diffusion_case(ModelConfig(trunk=TrunkConfig(size="tiny", patch_size=4),
                                                                      num_classes=10), 32, batch, seed)),
    "AR C (pit head)": ("head ODE step", 4 * DIFFUSION_STEPS,
                        lambda batch, seed: ar_case(DecoderConfig(kind="pit", pixel_dim=16, depth=2, heads=4,
                                                                  adaln="patch"), 16, 8, batch, seed)),
    "AR B (pixel AR)": ("pixel step", 4 * 16,
                        lambda batch, seed: ar_case(DecoderConfig(kind="pixel_ar", pixel_dim=64, depth=4, heads=4,
                                                                  pixel_ar=PixelARConfig(context="none")),
                                                    8, 4, batch, seed)),
}
DEFAULT_RUNS = [("diffusion demo", 1), ("diffusion demo", 4), ("diffusion tiny", 1), ("AR C (pit head)", 1),
                ("AR B (pixel AR)", 1)]


@dataclass
class Row:
    case: str
    batch: int
    cached_s: list[float] = field(default_factory=list)
    uncached_s: list[float] = field(default_factory=list)
    identical: bool = True

    @property
    def ratio(self) -> float:
        """Median over the pairs of uncached / cached time: > 1 means the cache saves time."""
        return statistics.median(u / c for u, c in zip(self.uncached_s, self.cached_s))

    def step_ms(self, seconds: list[float]) -> float:
        return 1e3 * statistics.median(seconds) / CASES[self.case][1]


def timed(run: Callable[[], torch.Tensor], cached: bool) -> tuple[float, torch.Tensor]:
    """CPU seconds of this process (one thread): unlike wall time, not lengthened while other work on the
    shared machine holds the cores."""
    start = time.process_time()
    if cached:
        out = run()
    else:
        with layers.tables_uncached():
            out = run()
    return time.process_time() - start, out


def measure(case: str, batch: int, repeats: int, seed: int) -> Row:
    run = CASES[case][2](batch, seed)
    row = Row(case, batch)
    reference = {cached: timed(run, cached)[1] for cached in (True, False)}  # untimed: fills the cache
    row.identical = torch.equal(reference[True], reference[False])
    for r in range(repeats):
        for cached in ((True, False) if r % 2 == 0 else (False, True)):
            seconds, out = timed(run, cached)
            (row.cached_s if cached else row.uncached_s).append(seconds)
            row.identical &= torch.equal(out, reference[cached])
    log(f"{case}, batch {batch}: cached {row.step_ms(row.cached_s):.2f} ms/step, uncached "
        f"{row.step_ms(row.uncached_s):.2f} ms/step, uncached / cached {row.ratio:.3f}, identical {row.identical}")
    return row


def table_costs(repeats: int = 5000) -> list[tuple[str, float, float]]:
    """(table, build µs, cached lookup µs) at the demo generator's shapes."""
    out = []
    for name, fn, args in [("RoPE 8x8 grid, head dim 32 (trunk and decoder)", layers.rope_2d, (32, 8, 8)),
                           ("sin-cos 32x32 pixels, dim 16 (decoder)", layers.sincos_2d, (16, 32, 32)),
                           ("timestep frequencies, 256 features (trunk)", layers.timestep_frequencies, (256, 10.0))]:
        costs = []
        for cached in (False, True):
            fn(*args, device="cpu")
            start = time.process_time()
            if cached:
                for _ in range(repeats):
                    fn(*args, device="cpu")
            else:
                with layers.tables_uncached():
                    for _ in range(repeats):
                        fn(*args, device="cpu")
            costs.append(1e6 * (time.process_time() - start) / repeats)
        out.append((name, *costs))
    return out


def section(rows: list[Row], costs, args, command: str, commit: str, seconds: float) -> str:
    intro = (f"`{command}`. Machine: {machine()}; one torch thread; torch {metadata.version('torch')}. Run of "
             f"{datetime.date.today().isoformat()}, commit {commit}; {seconds:.0f} s in all. Same model, inputs and "
             f"seed on both paths; *uncached* rebuilds every table on every call (`layers.tables_uncached()`, the "
             f"code before the cache). Ratio = median over {args.repeats} alternating pairs of uncached / cached "
             f"CPU time of the process (> 1: the cache saves time); ms per step are medians, for context only. "
             f"Diffusion: Euler {DIFFUSION_STEPS} steps, CFG 2.0 on every step; AR: continuous semantic AR 64 x 2, "
             f"guidance on z (C: 16 px, 8 px patches, PiT head 16 x 2, Euler {DIFFUSION_STEPS} per patch; B: 8 px, "
             f"4 px patches, pixel AR 64 x 4).")
    lines = ["| case | batch | step | cached ms/step | uncached ms/step | **uncached / cached** | same samples |",
             "|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.batch} | {CASES[r.case][0]} | {r.step_ms(r.cached_s):.2f} | "
                     f"{r.step_ms(r.uncached_s):.2f} | **{r.ratio:.3f}** | "
                     f"{'yes (torch.equal)' if r.identical else 'NO'} |")
    cost_lines = ["| table (demo shapes) | built per call (µs) | cached lookup (µs) |", "|---|---:|---:|"]
    cost_lines += [f"| {name} | {build:.0f} | {lookup:.1f} |" for name, build, lookup in costs]
    per_forward = 2 * costs[0][1] + costs[1][1] + costs[2][1]
    control = next((r for r in rows if r.case.startswith("AR B")), None)
    outro = (f"Per forward of the demo generator the four tables cost about {per_forward / 1e3:.2f} ms of CPU to "
             f"build (a handful of small ops each; a lookup is a dict access): all the cache can save, a few percent "
             f"of a CPU step, most where the model is small and the batch is 1. "
             + (f"Method B builds its tables once per generate call before and after, so its row is the control: "
                f"{control.ratio:.3f} is this run's noise. " if control else "")
             + "On a GPU each build is about a dozen kernel launches per forward; not measured here.")
    fill = lambda text: textwrap.fill(text, 115, break_long_words=False, break_on_hyphens=False)  # noqa: E731
    return "\n\n".join([fill(intro), "\n".join(lines), "\n".join(cost_lines), fill(outro)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21, help="timed pairs per case (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace the section in {DOC.relative_to(REPO)} (see above)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    command = shlex.join([".venv/bin/python", "benchmarks/position_tables.py", *sys.argv[1:]])
    commit = git_commit()
    torch.set_num_threads(1)  # a second thread only adds noise on a shared 2-core machine
    start = time.time()
    rows = [measure(case, batch, args.repeats, args.seed) for case, batch in DEFAULT_RUNS]
    costs = table_costs()
    body = section(rows, costs, args, command, commit, time.time() - start)
    print(body)
    if args.write_docs:
        write_section(body, HEADING, "position_tables")
    if not all(r.identical for r in rows):
        sys.exit("the cached and uncached paths gave different samples")


if __name__ == "__main__":
    main()
