"""One GPU, one run: what pixelgen's own training, attention and sampling paths cost on one H100 / H200.

    .venv/bin/python benchmarks/gpu.py [--smoke] [--out FILE] [--write-docs] [--cases trunk decoder sync sdpa
                                       sampling ar] [--peer-jit PATH]

One process, one device, every case one after the other (memory freed between them: the run deleted,
gc.collect, torch.cuda.empty_cache, peak statistics reset). Nothing is downloaded: all weights are random and
the training data are random uint8 images held in memory (timing and memory do not depend on either). A case
that runs out of memory shows "OOM" in its row; any other failure "failed: <reason>" (the traceback goes to
stderr); the other cases go on. Meant to finish in under 8 minutes on an H100 / H200, most of it torch.compile
of case 1's four compiled rows (not yet timed on one: --no-compile leaves them out, --cases runs a part).

The cases (GPU mode, the default where CUDA is available):
  1. trunk   the trunk stage (train_trunk) of configs/pixeldit_b.yaml at 256 px with model.trunk.size=B and XL,
             bf16, ZeRO-2, batch 32, each with and without train_trunk.compile and with and without activation
             checkpointing (model.trunk.activation_checkpointing and model.decoder.activation_checkpointing
             together). It is the real engine, pixelgen.engine.train: the TrainTask is built as pipeline/
             stages.py's _train builds it (the family's loss, trainable, lr_of), `train._setup` starts DeepSpeed,
             `train._train_step` makes each step; only the data differ (random images in memory). --warmup steps
             (the first one counts FLOPs, and compiles after them where compile is on), then --steps timed
             steps between two torch.cuda.synchronize: images/s, MFU (the engine's FLOPs per image over
             pixelgen.engine.flops.peak_tflops), peak memory (torch.cuda.max_memory_allocated over the whole
             run, model build included) beside pixelgen.models.memory.estimate_memory for the same config.
  2. decoder the decoder stage (train_decoder, XL trunk frozen as the stage freezes it) with model.decoder.
             pixel_dim=64 and model.decoder.heads=4, attention pixel (attention among the 256 pixels of a
             patch at width 64, heads of 16) and compact (one token per patch at the trunk's 1152, heads of
             288), batch 32: first without activation checkpointing, then, if that runs out of memory, with it.
             XL's dims are spelled out (model.trunk.dim/depth/heads) because a named model.trunk.size resets
             the decoder's pixel_dim, depth and heads to the size's.
  3. sync    steady-state trunk steps (B, no compile) after the warm-up: --sync-steps steps under
             torch.cuda.set_sync_debug_mode("warn"), counting the synchronizing-operation warnings per call
             site (the innermost four frames outside torch), then as many under a TorchDispatchMode that
             counts host reads (aten._local_scalar_dense: .item(), bool(tensor)), as tests/host_reads_worker.py
             does. Per step. DeepSpeed 0.19's ZeRO step reads one bool per step in
             runtime/utils.py is_invalid_grad_norm; that site is expected once per step. (A sync inside
             backward, on autograd's device thread, is replayed by autograd after it and counted at the
             backward call.)
  4. sdpa    every attention shape of the model zoo at 256 px: each size of pixelgen.models.SIZES (patch 16)
             and the XL decoder designs of benchmarks/model_zoo.py that have attention, plus case 2's, built on
             the meta device and run once there to record the sequence length of each
             pixelgen.models.layers.Attention module (grouped by heads, head width, length). Per shape:
             pixelgen.models.layers.sdpa_cuda_kernel's prediction in bf16, the width layers.sdpa pads it to
             (sdpa_head_dim) and the prediction there; on CUDA also which SDPBackend accepts the shape (forward
             and backward under torch.nn.attention.sdpa_kernel, each of FLASH_ATTENTION, EFFICIENT_ATTENTION,
             CUDNN_ATTENTION, MATH) and which kernel the default dispatch ran, for the raw shape and for
             pixelgen's padded call (the aten op and the CUDA kernel in torch.profiler). On the CPU only the
             prediction.
  5. sampling the family's sampler (families.get(kind).sampler(cfg) with per-image noise streams: the FID
             stage's draw, pixelgen/eval/sampling.py) for PixelDiT-XL, random
             weights, heun 50 steps, CFG 1.5 on the config's interval, sampler.precision bf16 (batch 64 and 16)
             and fp32 (batch 16, to keep the run short): images/s after a one-step warm-up call, and the hours
             50 000 images (an FID-50k) take on one GPU at that rate.
  6. ar      the dual-level AR (configs/dual_ar_discrete_b.yaml's networks: semantic AR 768 x 12, pixel AR
             256 x 6), as benchmarks/ar_sampling.py times it on the CPU: the family's sampler with
             sampler.kv_cache true and false, random weights and dictionary, at 64 px (16 patches; a 256 px
             image is 256 patches of the same work each, about 16x the time: shown as an extrapolation).
  7. --peer-jit PATH is accepted and not implemented yet: the output says so and gives no numbers.

--smoke (the default without CUDA): the same code on the CPU at toy sizes (model.trunk.size=tiny, 16 px in
4 px patches, batch 4, one warm-up and two timed steps; configs/tiny_dual_ar_discrete.yaml for the AR), so the
script cannot rot; ~25 s on 2 cores with a warm inductor cache, ~75 s cold, most of it torch.compile of the
one compiled case (tiny, no checkpointing; --no-compile leaves it out, as it leaves out case 1's compile rows on
a GPU). MFU, measured GPU memory and the CUDA columns are n/a there; its absolute numbers mean nothing.

Imports only torch, deepspeed, omegaconf, pixelgen and pipeline.config (the GPU machine lacks webdataset,
submitit, wandb, torch-fidelity; none of these is imported on this path, and tests/test_gpu_benchmark.py runs
the smoke mode with them made unimportable). Configs go through pipeline.config.load_config and its checks.

Progress and the engine's own output go to stderr, the markdown section to stdout. --out FILE writes it to FILE
too; --write-docs (GPU runs only) replaces the block between <!-- gpu:start --> and <!-- gpu:end --> in
docs/benchmarks.md, appending the section "## One GPU, one run (benchmarks/gpu.py)" when it is missing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import os
import re
import shlex
import socket
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py and model_zoo.py, also when loaded by path

from report import REPO, git_commit, log, write_section  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pipeline import config as pipeline_config  # noqa: E402
from pixelgen import families  # noqa: E402
from pixelgen.engine import flops as flops_lib  # noqa: E402
from pixelgen.engine import train  # noqa: E402
from pixelgen.engine.config import LoggingConfig  # noqa: E402
from pixelgen.engine.dist import init_distributed  # noqa: E402
from pixelgen.models import SIZES  # noqa: E402
from pixelgen.models.config import ModelConfig  # noqa: E402
from pixelgen.models.layers import Attention, sdpa, sdpa_cuda_kernel, sdpa_head_dim  # noqa: E402
from pixelgen.models.memory import GiB, estimate_memory  # noqa: E402
from pixelgen.noise import Streams  # noqa: E402
from pixelgen.precision import use_bf16  # noqa: E402

HEADING = "## One GPU, one run (benchmarks/gpu.py)"
TAG = "gpu"
CASES = ("trunk", "decoder", "sync", "sdpa", "sampling", "ar")
PIXELDIT = REPO / "configs" / "pixeldit_b.yaml"
DUAL_AR = REPO / "configs" / "dual_ar_discrete_b.yaml"
TINY_DUAL_AR = REPO / "configs" / "tiny_dual_ar_discrete.yaml"
SYNC_WARNING = "called a synchronizing CUDA operation"
FID_IMAGES = 50_000
NA_CPU = "n/a (CPU)"


# ------------------------------------------------------------------------------------------------- the config
def load_config(path: Path, overrides: list[str] = ()):
    """pipeline.config's own loader and checks, for what runs here: the two training stages on in-memory data
    (a placeholder shard folder that nothing reads) and teachers at random initialisation (nothing downloaded;
    the time does not depend on their weights)."""
    base = ["stages=[train_trunk,train_decoder]", "data.shard_dir=in-memory"]
    if OmegaConf.select(OmegaConf.load(path), "model.trunk.ar.teacher") is not None:
        base += ["model.trunk.ar.teacher.weights=null", "model.trunk.ar.teacher.allow_random_init=true"]
    return pipeline_config.load_config(path, [*base, *overrides])


def spelled_size(size: str) -> list[str]:
    """Overrides that set a named size's dims one by one (model.trunk.size itself would reset any decoder key)."""
    s = SIZES[size]
    return ["model.trunk.size=null", f"model.trunk.dim={s.dim}", f"model.trunk.depth={s.depth}",
            f"model.trunk.heads={s.heads}", f"model.decoder.pixel_dim={s.pixel_dim}",
            f"model.decoder.depth={s.pixel_depth}", f"model.decoder.heads={s.pixel_heads}"]


# ---------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    smoke: bool
    trunk_sizes: tuple[str, ...]
    resolution: int
    patch: int
    batch: int
    warmup: int
    steps: int
    compile: tuple[bool, ...]
    compile_skipped: Optional[str]  # why compile is not measured
    decoder_size: str  # the frozen trunk of case 2
    sync_size: str
    sync_steps: int
    sample_size: str
    sample_rows: tuple[tuple[str, int], ...]  # (sampler.precision, batch)
    sample_steps: int
    ar_config: Path
    ar_resolution: Optional[int]  # None: the config's own
    ar_batch: int


def make_plan(args) -> Plan:
    no_compile = "torch.compile is not measured (--no-compile)" if args.no_compile else None
    if not args.smoke:
        return Plan(smoke=False, trunk_sizes=tuple(args.sizes), resolution=256, patch=16, batch=args.batch,
                    warmup=args.warmup, steps=args.steps, compile=(False,) if args.no_compile else (False, True),
                    compile_skipped=no_compile,
                    decoder_size="XL", sync_size="B", sync_steps=args.sync_steps, sample_size="XL",
                    sample_rows=(("bf16", args.sample_batch), ("bf16", 16), ("fp32", 16)), sample_steps=50,
                    ar_config=DUAL_AR, ar_resolution=64, ar_batch=16)
    # One compiled case (tiny, no checkpointing: ~30 s of inductor on 2 cores), so the compile path runs too.
    return Plan(smoke=True, trunk_sizes=("tiny",), resolution=16, patch=4, batch=4, warmup=1, steps=2,
                compile=(False,) if args.no_compile else (False, True), compile_skipped=no_compile,
                decoder_size="tiny", sync_size="tiny", sync_steps=2, sample_size="tiny",
                sample_rows=(("bf16", 4), ("fp32", 4)), sample_steps=50, ar_config=TINY_DUAL_AR,
                ar_resolution=None, ar_batch=2)


# ----------------------------------------------------------------------------------------------- small helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def short_reason(err: BaseException, limit: int = 90) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def guarded(what: str, device: torch.device, fn: Callable[[], None]) -> Optional[str]:
    """Run fn; None when it worked, else "OOM" or "failed: <reason>" (the traceback to stderr). Frees memory
    after it either way (once the exception, and with it the frames that hold the case's tensors, is gone)."""
    status = None
    try:
        fn()
    except Exception as err:  # noqa: BLE001  one case's failure must not stop the others
        if is_oom(err):
            status = "OOM"
            log(f"{what}: out of memory ({short_reason(err, 200)})")
        else:
            status = f"failed: {short_reason(err)}"
            log(f"{what}: FAILED\n{traceback.format_exc()}")
    finally:
        free_memory(device)
    return status


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def md_table(headers: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" * len(headers)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wrap(text: str) -> str:
    return textwrap.fill(text, 115, break_long_words=False, break_on_hyphens=False)


def call_site(frames: list[traceback.FrameSummary], depth: int = 4) -> str:
    """The innermost `depth` frames outside torch and the warnings machinery, innermost first."""
    kept = [f for f in frames if "/torch/" not in f.filename
            and not f.filename.endswith(("warnings.py", "_py_warnings.py"))]
    return " < ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(kept[-depth:])) or "(inside torch)"


class SyncWarnings:
    """Counts, per call site, the warnings torch.cuda.set_sync_debug_mode("warn") raises while active (every
    warning is shown, not only the first per site). On a CPU there is no sync debug mode and nothing is counted
    but warnings raised with the same text (the unit test's)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sites: collections.Counter[str] = collections.Counter()
        self.other = 0  # other warnings seen meanwhile (DeepSpeed's deprecations), not printed

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            self.sites[call_site(traceback.extract_stack()[:-1])] += 1
        else:
            self.other += 1

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        if self.device.type == "cuda":
            self._before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(self._before)
        self._catch.__exit__(*exc)
        return False


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense (what .item(), bool(tensor) and a tensor bound as a Scalar dispatch to,
    each a wait for the device on a GPU) per call site, as tests/host_reads_worker.py does."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.sites[call_site(traceback.extract_stack()[:-1])] += 1
        return func(*args, **(kwargs or {}))


# -------------------------------------------------------------------------------------- training (cases 1-3)
@dataclass
class TrainRow:
    stage: str
    size: str
    attention: str
    compile: bool
    checkpointing: bool
    batch: int
    status: Optional[str] = None  # None: measured; "OOM"; "failed: ..."; "skipped: ..."
    images_per_s: Optional[float] = None
    step_ms: Optional[float] = None
    warmup_s: Optional[float] = None
    mfu: Optional[float] = None
    flops_per_image: Optional[float] = None
    peak_gib: Optional[float] = None
    held_before_gib: float = 0.0  # allocated when the case started (left over by an earlier case), in peak_gib
    estimate_gib: Optional[float] = None
    compiled: Optional[bool] = None  # the engine reported it compiled
    params_trainable: Optional[int] = None


def synthetic_data(resolution: int, num_classes: int, device: torch.device, pool: int = 2):
    """TrainTask.data_fn over random uint8 images in memory: (micro, rank, world, start, segments) -> endless
    iterator of (uint8 [micro, 3, H, W], int64 [micro]) on the host, pinned on a GPU machine as the loader's
    batches are."""
    def data_fn(micro, rank, world, start_batch, segments):
        g = torch.Generator().manual_seed(start_batch * world + rank)
        batches = []
        for _ in range(pool):
            x = torch.randint(0, 256, (micro, 3, resolution, resolution), dtype=torch.uint8, generator=g)
            y = torch.randint(0, num_classes, (micro,), generator=g)
            if device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            batches.append((x, y))

        def stream():
            i = 0
            while True:
                yield batches[i % pool]
                i += 1

        return stream()

    return data_fn


def _no_grid(model):
    raise RuntimeError("benchmarks/gpu.py draws no sample grid")


def build_on(device: torch.device, build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """`build` with the default device set, so an XL's weights are initialised on the GPU (seconds on one CPU
    core otherwise); the engine moves the model to its device anyway."""
    def make():
        with torch.device(device):
            return build()
    return make


_ESTIMATES: dict[tuple, float] = {}


def memory_estimate_gib(cfg, stage: str, device: torch.device) -> float:
    """memory.py's total per GPU for the stage's config (bf16 as the engine trains, ZeRO as configured, one rank,
    one fp32 EMA per entry of ema_decays)."""
    tc = cfg[stage]
    model_cfg = OmegaConf.to_object(cfg.model)
    precision = "bf16" if use_bf16(tc.precision, device) else "fp32"
    key = (repr(model_cfg), cfg.data.resolution, tc.batch_size, tc.zero_stage, precision, stage, len(tc.ema_decays))
    if key not in _ESTIMATES:
        est = estimate_memory(model_cfg, cfg.data.resolution, batch_size=tc.batch_size // tc.grad_accum,
                              world_size=1, zero_stage=tc.zero_stage, precision=precision,
                              trainable=families.get(cfg.model.trunk.kind).trainable(cfg, stage),
                              emas=len(tc.ema_decays))
        _ESTIMATES[key] = est.total_bytes / GiB
    return _ESTIMATES[key]


def make_task(cfg, stage: str, device: torch.device) -> train.TrainTask:
    """The stage's TrainTask as pipeline/stages.py's _train makes it, with random in-memory images for data and
    the generator built directly (random weights: the decoder stage's trunk would come from the trunk's export)."""
    family = families.get(cfg.model.trunk.kind)
    model_cfg = OmegaConf.to_object(cfg.model)
    resolution = cfg.data.resolution
    return train.TrainTask(
        make_model=build_on(device, lambda: families.build_generator(model_cfg, resolution, pretrained=False)),
        trainable=family.trainable(cfg, stage), loss_fn=family.loss(cfg, stage, model_cfg, device),
        sample_fn=_no_grid, data_fn=synthetic_data(resolution, cfg.data.num_classes, device),
        lr_of=family.lr_of(cfg, stage), loss_terms=family.plot_keys)


@contextlib.contextmanager
def engine_run(cfg, stage: str, device: torch.device):
    """A started run of the real engine (`train._setup`: seeds, model, DeepSpeed, EMA, logger with wandb
    disabled) in a scratch folder, closed and released afterwards."""
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        run = train._setup(make_task(cfg, stage, device), cfg[stage], Path(tmp), logging=LoggingConfig(wandb="disabled"),
                           run_name=f"gpu-benchmark/{stage}", group="gpu-benchmark", run_config={})
        try:
            run.engine.train()
            yield run
        finally:
            run.flag.restore()
            run.log.close()
            compiled = bool(getattr(run.engine, "is_compiled", False))
            with contextlib.suppress(Exception):
                run.engine.destroy()
            del run
            if compiled:
                torch._dynamo.reset()


def step(run) -> None:
    """One optimizer step, as run_training's loop takes it (log, sample and checkpoint steps never come up)."""
    train._train_step(run)
    run.step += 1
    run.meter.steps += 1


def train_overrides(plan: Plan, size: str, stage: str, *, compile_: bool, ckpt: bool) -> list[str]:
    res = [f"data.resolution={plan.resolution}", f"model.trunk.patch_size={plan.patch}", "logging.wandb=disabled",
           f"{stage}.batch_size={plan.batch}", f"{stage}.precision=bf16",
           f"{stage}.zero_stage=2", f"{stage}.compile={str(compile_).lower()}",
           f"{stage}.steps={plan.warmup + plan.steps + 10}",
           f"model.trunk.activation_checkpointing={str(ckpt).lower()}",
           f"model.decoder.activation_checkpointing={str(ckpt).lower()}"]
    return res + ([f"model.trunk.size={size}"] if stage == "train_trunk" else [])


def measure_training(row: TrainRow, cfg, stage: str, plan: Plan, device: torch.device) -> None:
    row.estimate_gib = memory_estimate_gib(cfg, stage, device)
    free_memory(device)
    if device.type == "cuda":
        row.held_before_gib = torch.cuda.memory_allocated(device) / GiB
    with engine_run(cfg, stage, device) as run:
        t0 = time.perf_counter()
        # Compiled: step 1 counts FLOPs eagerly and calls engine.compile(), step 2 compiles, step 3 catches a
        # recompile; none of them is timed.
        for _ in range(max(plan.warmup, 3) if cfg[stage].compile else plan.warmup):
            step(run)
        sync(device)
        row.warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(plan.steps):
            step(run)
        sync(device)
        seconds = time.perf_counter() - t0
        row.images_per_s = plan.steps * cfg[stage].batch_size / seconds
        row.step_ms = 1e3 * seconds / plan.steps
        row.flops_per_image = run.meter.flops_per_image
        if run.peak and row.flops_per_image:
            row.mfu = row.flops_per_image * row.images_per_s / (run.peak * 1e12)
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
        row.compiled = bool(run.engine.is_compiled)
        row.params_trainable = sum(p.numel() for _, p in run.named_trainable)


def case_trunk(plan: Plan, device: torch.device) -> list[TrainRow]:
    rows = []
    for size in plan.trunk_sizes:
        for compile_ in plan.compile:
            for ckpt in (False, True):
                if plan.smoke and compile_ and ckpt:
                    continue  # the smoke run compiles one case
                row = TrainRow("train_trunk", size, "compact", compile_, ckpt, plan.batch)
                what = f"[trunk] {size}, compile {compile_}, checkpointing {ckpt}, batch {plan.batch}"
                log(f"{what} ...")

                def run_it(row=row, size=size, compile_=compile_, ckpt=ckpt):
                    cfg = load_config(PIXELDIT, train_overrides(plan, size, "train_trunk", compile_=compile_,
                                                                ckpt=ckpt))
                    measure_training(row, cfg, "train_trunk", plan, device)

                row.status = guarded(what, device, run_it)
                log(f"{what}: {describe_row(row)}")
                rows.append(row)
    return rows


def decoder_overrides(plan: Plan, attention: str, ckpt: bool) -> list[str]:
    return [*train_overrides(plan, plan.decoder_size, "train_decoder", compile_=False, ckpt=False),
            *spelled_size(plan.decoder_size), "model.decoder.pixel_dim=64", "model.decoder.heads=4",
            f"model.decoder.attention={attention}", f"model.decoder.activation_checkpointing={str(ckpt).lower()}",
            "train_decoder.freeze_trunk=true"]


def case_decoder(plan: Plan, device: torch.device) -> list[TrainRow]:
    rows = []
    for attention in ("pixel", "compact"):
        for ckpt in (False, True):
            row = TrainRow("train_decoder", plan.decoder_size, attention, False, ckpt, plan.batch)
            what = f"[decoder] {plan.decoder_size} trunk frozen, pixel_dim 64, 4 heads, attention {attention}, " \
                   f"checkpointing {ckpt}"
            log(f"{what} ...")

            def run_it(row=row, attention=attention, ckpt=ckpt):
                cfg = load_config(PIXELDIT, decoder_overrides(plan, attention, ckpt))
                measure_training(row, cfg, "train_decoder", plan, device)

            row.status = guarded(what, device, run_it)
            log(f"{what}: {describe_row(row)}")
            rows.append(row)
            if row.status != "OOM":
                break  # it fits (or failed otherwise): checkpointing is only tried when it does not fit
    return rows


def describe_row(row: TrainRow) -> str:
    if row.status:
        return row.status
    return (f"{row.images_per_s:.1f} images/s, {row.step_ms:.1f} ms/step, MFU {fmt(row.mfu, '.1%', 'n/a')}, "
            f"peak {fmt(row.peak_gib, '.2f', 'n/a')} GiB, estimate {row.estimate_gib:.2f} GiB")


@dataclass
class SyncResult:
    size: str
    steps: int
    status: Optional[str] = None
    warnings: dict[str, int] = field(default_factory=dict)  # site -> count over `steps` (CUDA only)
    host_reads: dict[str, int] = field(default_factory=dict)  # site -> count over `steps`


def case_sync(plan: Plan, device: torch.device) -> SyncResult:
    result = SyncResult(plan.sync_size, plan.sync_steps)
    what = f"[sync] {plan.sync_size}, no compile, {plan.sync_steps} steady steps"
    log(f"{what} ...")

    def run_it():
        cfg = load_config(PIXELDIT, train_overrides(plan, plan.sync_size, "train_trunk", compile_=False, ckpt=False))
        with engine_run(cfg, "train_trunk", device) as run:
            for _ in range(max(plan.warmup, 2)):
                step(run)
            sync(device)
            with SyncWarnings(device) as seen:
                for _ in range(plan.sync_steps):
                    step(run)
            sync(device)
            result.warnings = dict(seen.sites)
            with HostReads() as reads:
                for _ in range(plan.sync_steps):
                    step(run)
            sync(device)
            result.host_reads = dict(reads.sites)

    result.status = guarded(what, device, run_it)
    log(f"{what}: {result.status or f'{sum(result.warnings.values())} sync warnings, '}"
        f"{'' if result.status else f'{sum(result.host_reads.values())} host reads'}")
    return result


# ----------------------------------------------------------------------------------------------- SDPA (case 4)
@dataclass
class AttentionShape:
    model: str
    modules: list[str]
    heads: int
    head_dim: int
    length: int
    sequences: int  # per image
    accepts: dict[str, str] = field(default_factory=dict)  # backend -> "yes" / "no" (CUDA only)
    default: str = ""  # what the default dispatch ran for the raw shape (CUDA only)
    padded: str = ""  # what pixelgen's padded call ran (CUDA only)


def zoo_models() -> list[tuple[str, ModelConfig]]:
    """(label, config) of each named size at patch 16, then the XL decoder designs with attention."""
    from pixelgen.models.config import DecoderConfig, TrunkConfig

    import model_zoo

    out = [(f"size {size}", model_zoo.named(size)) for size in SIZES]
    designs = list(model_zoo.DESIGNS) + [("pit, pixel_dim 64, 4 heads, attention pixel (case 2)",
                                          {"pixel_dim": 64, "heads": 4, "attention": "pixel"}),
                                         ("pit, pixel_dim 64, 4 heads, attention compact (case 2)",
                                          {"pixel_dim": 64, "heads": 4, "attention": "compact"})]
    base = model_zoo.named("XL")
    for label, keys in designs:
        dec = DecoderConfig(**{**base.decoder.__dict__, **keys})
        if dec.kind != "pit" or not keys:
            continue
        out.append((f"XL decoder: {label}", ModelConfig(trunk=TrunkConfig(**base.trunk.__dict__), decoder=dec)))
    return out


def attention_shapes(label: str, model_cfg: ModelConfig, resolution: int = 256,
                     prefix: str = "") -> list[AttentionShape]:
    """The model's Attention modules (those whose name starts with `prefix`) grouped by (heads, head width,
    sequence length), the lengths taken from one forward of one image on the meta device (nothing is allocated
    or computed)."""
    with torch.device("meta"):
        model = families.build_generator(model_cfg, resolution, pretrained=False)
    seen: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.startswith(prefix):
            def record(module, args, name=name):  # returns None: the inputs stay as they are
                seen.setdefault(name, tuple(args[0].shape[:2]))

            handles.append(module.register_forward_pre_hook(record))
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with torch.no_grad():
        model(x, torch.empty(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    for h in handles:
        h.remove()
    groups: dict[tuple[int, int, int, int], list[str]] = {}
    modules = dict(model.named_modules())
    for name, (n, length) in seen.items():
        groups.setdefault((modules[name].heads, modules[name].head_dim, length, n), []).append(name)
    return [AttentionShape(label, names, h, d, length, n) for (h, d, length, n), names in groups.items()]


BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
_ATEN_BACKEND = (("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
                 ("_scaled_dot_product_flash_attention", "flash"), ("_flash_attention", "flash"),
                 ("_scaled_dot_product_efficient_attention", "efficient"), ("_efficient_attention", "efficient"),
                 ("_scaled_dot_product_cudnn_attention", "cudnn"), ("_cudnn_attention", "cudnn"),
                 ("_scaled_dot_product_attention_math", "math"))


def backend_of(op_names: list[str]) -> str:
    """The SDPA backend named by the aten ops a profiler saw (the first known one, in dispatch order)."""
    for pattern, backend in _ATEN_BACKEND:
        if any(pattern in name for name in op_names):
            return backend
    return "?"


def _dispatched(fn: Callable[[], torch.Tensor], device: torch.device) -> str:
    """'<backend> (<main CUDA kernel>)' that a forward and backward of fn ran, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn().float().sum().backward()
        sync(device)
    events = prof.events()
    backend = backend_of([e.name for e in events])
    try:  # the longest attention-looking CUDA kernel (any kernel if none looks like one)
        kernels = [(getattr(e, "device_time_total", 0) or 0, e.name)
                   for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        attn = [k for k in kernels if re.search(r"flash|fmha|attention|attn|sdpa|softmax", k[1], re.I)]
        if attn or kernels:
            name = max(attn or kernels)[1]
            backend += f" (`{name[:48]}{'...' if len(name) > 48 else ''}`)"
    except Exception as err:  # noqa: BLE001  the backend is known from the aten op already
        backend += f" (kernel names unavailable: {short_reason(err, 40)})"
    return backend


def probe_sdpa(shape: AttentionShape, device: torch.device, dtype=torch.bfloat16, sequences: int = 8) -> None:
    """Which SDPA backends take the shape (forward and backward), and what the default dispatch runs for it and
    for pixelgen's padded call (layers.sdpa at sdpa_head_dim)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = min(shape.sequences, sequences)

    def qkv():
        return [torch.randn(n, shape.heads, shape.length, shape.head_dim, device=device, dtype=dtype,
                            requires_grad=True) for _ in range(3)]

    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each refusing backend warns why
        for name in BACKENDS:
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    F.scaled_dot_product_attention(q, k, v).float().sum().backward()
                shape.accepts[name] = "yes"
            except RuntimeError:
                shape.accepts[name] = "no"
        shape.default = _dispatched(lambda: F.scaled_dot_product_attention(q, k, v), device)
        pad = sdpa_head_dim(shape.head_dim) if device.type == "cuda" else None  # as layers.Attention calls it
        shape.padded = _dispatched(lambda: sdpa(q, k, v, pad_to=pad), device)


def case_sdpa(plan: Plan, device: torch.device) -> tuple[list[AttentionShape], Optional[str]]:
    shapes = []

    def run_it():
        for label, model_cfg in zoo_models():  # the designs' rows: their decoders (the trunk is XL's)
            prefix = "decoder." if label.startswith("XL decoder") else ""
            shapes.extend(attention_shapes(label, model_cfg, prefix=prefix))
        if device.type == "cuda":
            for shape in shapes:
                status = guarded(f"[sdpa] {shape.heads} x {shape.head_dim}, L {shape.length}", device,
                                 lambda shape=shape: probe_sdpa(shape, device))
                if status:
                    shape.default = shape.default or status

    log("[sdpa] attention shapes of the model zoo ...")
    status = guarded("[sdpa]", device, run_it)
    log(f"[sdpa]: {status or f'{len(shapes)} shapes'}")
    return shapes, status


# ------------------------------------------------------------------------------------------- sampling (case 5)
@dataclass
class SampleRow:
    size: str
    precision: str
    batch: int
    steps: int
    status: Optional[str] = None
    seconds: Optional[float] = None  # one draw of the batch
    peak_gib: Optional[float] = None

    @property
    def images_per_s(self) -> Optional[float]:
        return self.batch / self.seconds if self.seconds else None

    @property
    def fid_hours(self) -> Optional[float]:
        return FID_IMAGES / self.images_per_s / 3600 if self.seconds else None


def sampling_config(plan: Plan):
    overrides = [f"data.resolution={plan.resolution}", f"model.trunk.patch_size={plan.patch}",
                 f"model.trunk.size={plan.sample_size}", "sampler.kind=heun", f"sampler.steps={plan.sample_steps}",
                 "sampler.cfg_scale=1.5"]
    return load_config(PIXELDIT, overrides)


def case_sampling(plan: Plan, device: torch.device) -> tuple[list[SampleRow], Optional[str], str]:
    rows = [SampleRow(plan.sample_size, p, b, plan.sample_steps) for p, b in plan.sample_rows]
    state: dict[str, Any] = {}

    def build():
        cfg = sampling_config(plan)
        state["cfg"] = cfg
        torch.manual_seed(0)
        with torch.device(device):
            state["model"] = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution,
                                                      pretrained=False).eval()

    log(f"[sampling] {plan.sample_size}, heun {plan.sample_steps} steps, CFG 1.5 ...")
    status = guarded("[sampling] build", device, build)
    if status:
        for row in rows:
            row.status = status
        return rows, status, ""
    cfg, family = state["cfg"], families.get(state["cfg"].model.trunk.kind)
    interval = list(cfg.sampler.cfg_interval)
    for row in rows:
        what = f"[sampling] {row.precision}, batch {row.batch}"

        def run_it(row=row):
            model = state["model"]
            sampler_cfg = OmegaConf.merge(cfg.sampler, {"precision": row.precision})
            y = (torch.arange(row.batch) % cfg.model.num_classes).to(device)
            # The FID stage's randomness: one stream per image (pixelgen.noise.Streams), included in the time.
            g = Streams(0, range(row.batch), device)
            family.sampler(cfg, OmegaConf.merge(sampler_cfg, {"steps": 1}))(model, y, g)  # warm-up: same shapes
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            x = family.sampler(cfg, sampler_cfg)(model, y, Streams(0, range(row.batch), device))
            sync(device)
            row.seconds = time.perf_counter() - t0
            if device.type == "cuda":
                row.peak_gib = torch.cuda.max_memory_allocated(device) / GiB
            if not torch.isfinite(x).all():
                raise RuntimeError("non-finite samples")

        row.status = guarded(what, device, run_it)
        log(f"{what}: {row.status or f'{row.images_per_s:.2f} images/s, {row.fid_hours:.2f} h per 50k'}")
    state.clear()
    free_memory(device)
    return rows, None, f"cfg_interval {interval}, time_shift {cfg.sampler.time_shift}"


# ------------------------------------------------------------------------------------------------- AR (case 6)
@dataclass
class ARRow:
    kv_cache: bool
    batch: int
    resolution: int
    target_resolution: int  # the config file's own
    patch: int
    status: Optional[str] = None
    seconds: Optional[float] = None  # one draw of the batch

    @property
    def per_image(self) -> Optional[float]:
        return self.seconds / self.batch if self.seconds else None

    @property
    def per_image_at_target(self) -> Optional[float]:
        """Per image at the config's resolution, scaled by its patch count (each patch is the same work)."""
        if not self.seconds:
            return None
        return self.per_image * (self.target_resolution // self.patch) ** 2 / (self.resolution // self.patch) ** 2


def case_ar(plan: Plan, device: torch.device) -> tuple[list[ARRow], str]:
    base = OmegaConf.load(plan.ar_config)
    target = int(base.data.resolution)
    res = plan.ar_resolution or target
    patch = int(base.model.trunk.patch_size)
    rows = [ARRow(kv, plan.ar_batch, res, target, patch) for kv in (True, False)]
    state: dict[str, Any] = {}
    desc = f"{plan.ar_config.name}" + (f" at {res} px" if res != target else "")

    def build():
        cfg = load_config(plan.ar_config, [f"data.resolution={res}"] if res != target else [])
        torch.manual_seed(0)
        with torch.device(device):
            model = families.build_generator(OmegaConf.to_object(cfg.model), res, pretrained=False).eval()
        with torch.no_grad():
            if getattr(model.trunk, "dictionary", None) is not None:
                model.trunk.dictionary.normal_()  # random entries: the time does not depend on them
        state.update(cfg=cfg, model=model)
        t, d = cfg.model.trunk, cfg.model.decoder
        state["desc"] = (f"semantic AR {t.dim} x {t.depth} ({t.heads} heads, {t.ar.mode}, dictionary "
                         f"{t.ar.dict_size}), {d.kind} {d.pixel_dim} x {d.depth} ({d.heads} heads), "
                         f"guidance {cfg.sampler.guidance} {cfg.sampler.cfg_scale}, {cfg.sampler.cfg_schedule}")

    log(f"[ar] {desc}, batch {plan.ar_batch} ...")
    status = guarded("[ar] build", device, build)
    if status:
        for row in rows:
            row.status = status
        return rows, desc
    cfg, family = state["cfg"], families.get(state["cfg"].model.trunk.kind)
    for row in rows:
        what = f"[ar] kv_cache {row.kv_cache}, batch {row.batch}"

        def run_it(row=row):
            y = (torch.arange(row.batch) % cfg.model.num_classes).to(device)
            g = torch.Generator(device=device).manual_seed(0)
            draw = family.sampler(cfg, OmegaConf.merge(cfg.sampler, {"kv_cache": row.kv_cache}))
            sync(device)
            t0 = time.perf_counter()
            draw(state["model"], y, g)
            sync(device)
            row.seconds = time.perf_counter() - t0

        row.status = guarded(what, device, run_it)
        log(f"{what}: {row.status or f'{row.per_image:.3f} s/image'}")
    desc += f": {state['desc']}"
    state.clear()
    free_memory(device)
    return rows, desc


# ------------------------------------------------------------------------------------------------- the report
def header(plan: Plan, device: torch.device, command: str, seconds: float, cases: list[str]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    versions = (f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'} (torch.version.cuda), "
                f"DeepSpeed {metadata.version('deepspeed')}")
    lines = [f"`{command}`. Device: **{name}**; {versions}; {os.cpu_count()} CPU cores. Run of "
             f"{datetime.date.today().isoformat()}, commit {git_commit()}; {seconds / 60:.1f} min in all "
             f"(cases: {', '.join(cases)})."]
    if plan.smoke:
        lines.append(f"**Smoke run** at toy sizes on the {'GPU' if device.type == 'cuda' else 'CPU'} (tiny model, "
                     f"16 px, batch 4, 2 timed steps): it shows that every case runs through pixelgen's code; its "
                     f"absolute numbers mean nothing, only the GPU run's do."
                     + (f" {plan.compile_skipped}." if plan.compile_skipped else ""))
    return "\n\n".join(wrap(p) for p in lines)


def _gib(value: Optional[float], device: torch.device, held: float = 0.0) -> str:
    text = fmt(value, ".2f", NA_CPU if device.type != "cuda" else "-")
    return text + (f" (incl. {held:.2f} held before the case)" if value is not None and held >= 0.05 else "")


def train_table(rows: list[TrainRow], device: torch.device) -> str:
    cpu = device.type != "cuda"
    out = []
    for r in rows:
        model = f"{r.size}" + (f", attention {r.attention}" if r.stage == "train_decoder" else "")
        ratio = (f"{r.peak_gib / r.estimate_gib:.2f}" if r.peak_gib and r.estimate_gib else
                 (NA_CPU if cpu else "-"))
        if r.status:
            out.append([model, r.stage, "on" if r.compile else "off", "on" if r.checkpointing else "off", r.batch,
                        r.status, "-", "-", "-", "-", _gib(None, device), fmt(r.estimate_gib, ".2f"), "-"])
            continue
        compiled = "on" if r.compile and r.compiled else ("on (not compiled!)" if r.compile else "off")
        out.append([model, r.stage, compiled, "on" if r.checkpointing else "off", r.batch,
                    f"{r.images_per_s:.1f}", f"{r.step_ms:.1f}", fmt(r.mfu, ".1%", "n/a" if cpu else "-"),
                    fmt(r.flops_per_image and r.flops_per_image / 1e9, ".4g"), f"{r.warmup_s:.1f}",
                    _gib(r.peak_gib, device, r.held_before_gib), fmt(r.estimate_gib, ".2f"), ratio])
    return md_table(["model", "stage", "compile", "act. ckpt", "batch", "images/s", "ms/step", "MFU",
                     "GFLOPs/image (train step)", "warm-up s", "peak GiB (max_memory_allocated)",
                     "estimate GiB (memory.py)", "peak / estimate"], out, "lllllrrrrrrrr")


def trunk_section(rows: list[TrainRow], plan: Plan, device: torch.device) -> str:
    steps = f"{plan.warmup} warm-up step(s), then {plan.steps} timed"
    text = (f"configs/pixeldit_b.yaml at {plan.resolution} px (patch {plan.patch}), train_trunk, bf16, ZeRO-2, one "
            f"device, batch {plan.batch}; {steps}. act. ckpt = model.trunk.activation_checkpointing and "
            f"model.decoder.activation_checkpointing. MFU = the engine's FLOPs per image (counted in the first "
            f"step) x images/s over {flops_lib.peak_tflops(device, None) or 'no known'} TFLOP/s "
            f"(pixelgen.engine.flops.peak_tflops). Peak: torch.cuda.max_memory_allocated over the whole run; "
            f"estimate: pixelgen.models.memory.estimate_memory for the config (weights, gradients, Adam states, "
            f"the EMAs of ema_decays, activations; no CUDA context, allocator slack or DeepSpeed buckets). Warm-up "
            f"s holds the FLOP count and, with compile, torch.compile.")
    if plan.compile_skipped:
        text += f" {plan.compile_skipped}."
    return f"### 1. Trunk stage: images/s, MFU, memory\n\n{wrap(text)}\n\n{train_table(rows, device)}"


def decoder_section(rows: list[TrainRow], plan: Plan, device: torch.device) -> str:
    fit = []
    for attention in ("pixel", "compact"):
        ok = [r for r in rows if r.attention == attention and not r.status]
        tried = [r for r in rows if r.attention == attention]
        if ok:
            fit.append(f"attention {attention}: fits at batch {plan.batch} "
                       f"{'with' if ok[0].checkpointing else 'without'} activation checkpointing")
        elif tried:
            fit.append(f"attention {attention}: {tried[-1].status} "
                       f"({'with' if tried[-1].checkpointing else 'without'} checkpointing)")
    text = (f"train_decoder on a frozen {plan.decoder_size} trunk (freeze_trunk: only decoder.* trains), decoder "
            f"pixel_dim 64, 4 heads, bf16, ZeRO-2, batch {plan.batch}: without activation checkpointing first, "
            f"with it (model.decoder.activation_checkpointing) only if that runs out of memory. "
            + "; ".join(fit) + ".")
    return f"### 2. Decoder stage, pixel_dim 64, 4 heads\n\n{wrap(text)}\n\n{train_table(rows, device)}"


def sync_section(result: SyncResult, device: torch.device) -> str:
    cuda = device.type == "cuda"
    title = "### 3. Host syncs in steady-state training steps"
    intro = (f"train_trunk, {result.size}, bf16, ZeRO-2, no compile, after the warm-up: {result.steps} steps under "
             f"torch.cuda.set_sync_debug_mode(\"warn\") (synchronizing-operation warnings), then {result.steps} under "
             f"a dispatch mode counting host reads (aten._local_scalar_dense). Per step, by call site (innermost "
             f"first, frames outside torch). DeepSpeed 0.19's ZeRO step reads one bool per step in "
             f"runtime/utils.py is_invalid_grad_norm.")
    if not cuda:
        intro += " On the CPU there is no sync debug mode: only the host reads are counted."
    if result.status:
        return f"{title}\n\n{wrap(intro)}\n\n{result.status}"
    sites = sorted(set(result.warnings) | set(result.host_reads),
                   key=lambda s: -(result.warnings.get(s, 0) + result.host_reads.get(s, 0)))
    rows = [[f"`{s}`", f"{result.warnings[s] / result.steps:g}" if s in result.warnings else ("0" if cuda else NA_CPU),
             f"{result.host_reads.get(s, 0) / result.steps:g}"] for s in sites]
    rows.append(["**all sites**", f"{sum(result.warnings.values()) / result.steps:g}" if cuda else NA_CPU,
                 f"{sum(result.host_reads.values()) / result.steps:g}"])
    table = md_table(["call site", "sync warnings / step", "host reads / step"], rows, "lrr")
    return f"{title}\n\n{wrap(intro)}\n\n{table}"


def sdpa_section(shapes: list[AttentionShape], status: Optional[str], device: torch.device) -> str:
    cuda = device.type == "cuda"
    intro = ("Each pixelgen.models.layers.Attention shape of the zoo at 256 px (patch 16), grouped by heads, head "
             "width and sequence length (sequences per image: 1 for the trunk and the compact decoder, one per "
             "patch for pixel attention). Predicted: layers.sdpa_cuda_kernel in bf16; pixelgen pads the head "
             "width on CUDA to sdpa_head_dim (a multiple of 8) and calls layers.sdpa there. "
             + ("CUDA: which SDPBackend takes the raw shape (forward + backward, bf16, under sdpa_kernel), and what "
                "the default dispatch ran (aten op, main CUDA kernel in torch.profiler) for the raw shape and for "
                "pixelgen's padded call." if cuda else "On the CPU only the prediction is reported."))
    if status:
        return f"### 4. SDPA backend per attention shape\n\n{wrap(intro)}\n\n{status}"
    rows = []
    for s in shapes:
        pad = sdpa_head_dim(s.head_dim)
        where = s.modules[0] if len(s.modules) == 1 else f"{s.modules[0]} (+{len(s.modules) - 1})"
        row = [s.model, f"`{where}`", s.heads, s.head_dim, s.length, s.sequences,
               sdpa_cuda_kernel(s.head_dim, torch.bfloat16), pad if pad != s.head_dim else f"{pad} (as is)",
               sdpa_cuda_kernel(pad, torch.bfloat16)]
        if cuda:
            row += [", ".join(b.split("_")[0].lower() for b in BACKENDS if s.accepts.get(b) == "yes") or "none",
                    s.default or "-", s.padded or "-"]
        else:
            row += [NA_CPU, NA_CPU, NA_CPU]
        rows.append(row)
    table = md_table(["model", "modules", "heads", "head dim", "L", "sequences / image", "predicted (bf16)",
                      "pixelgen pads to", "predicted padded", "CUDA backends accepting", "default dispatch",
                      "pixelgen's call ran"], rows, "llrrrrllllll")
    return f"### 4. SDPA backend per attention shape\n\n{wrap(intro)}\n\n{table}"


def sampling_section(rows: list[SampleRow], status: Optional[str], details: str, plan: Plan,
                     device: torch.device) -> str:
    intro = (f"families.get('pixeldit').sampler(cfg) (the FID stage's draw) for {plan.sample_size} at "
             f"{plan.resolution} px, random weights, sampler.kind heun, {plan.sample_steps} steps (2 network "
             f"calls each), cfg_scale 1.5 ({details}: the conditional and unconditional halves in one batch "
             f"inside the interval), sampler.precision as given (bf16: autocast, the ODE state in fp32). One draw "
             f"of the batch after a one-step warm-up draw; hours for {FID_IMAGES:,} images at that rate on one "
             f"device. fp32 runs at a smaller batch to keep the run short.")
    out = [[r.size, r.precision, r.batch, r.steps, r.status or f"{r.seconds:.2f}", fmt(r.images_per_s, ".2f"),
            fmt(r.fid_hours, ".2f"), _gib(r.peak_gib, device)] for r in rows]
    table = md_table(["model", "precision", "batch", "steps", "s per batch", "images/s", f"hours for {FID_IMAGES:,}",
                      "peak GiB"], out, "lllrrrrr")
    return f"### 5. FID sampling throughput\n\n{wrap(intro)}\n\n{status or table}"


def ar_section(rows: list[ARRow], desc: str) -> str:
    r0 = rows[0]
    scale = f"x {(r0.target_resolution // r0.patch) ** 2 / (r0.resolution // r0.patch) ** 2:g}"
    intro = (f"The semantic_ar family's sampler (pixelgen.ar.generate under the family's draw, as "
             f"benchmarks/ar_sampling.py times it) for {desc}; random weights and dictionary, one draw of the "
             f"batch per path, sampler.kv_cache true vs false. Per image at {r0.target_resolution} px: the "
             f"measured time per image {scale} (its patch count over the measured one's), an extrapolation "
             f"where the resolutions differ.")
    out = [["cached" if r.kv_cache else "uncached", r.batch, r.resolution, r.status or f"{r.seconds:.2f}",
            fmt(r.per_image, ".3f"), fmt(r.per_image_at_target, ".2f")] for r in rows]
    cached, uncached = rows[0].seconds, rows[1].seconds
    table = md_table(["KV cache", "batch", "px", "s per batch", "s / image", f"s / image at {r0.target_resolution} px"],
                     out, "lrrrrr")
    ratio = f"\n\nUncached / cached: {uncached / cached:.1f}x." if cached and uncached else ""
    return f"### 6. Dual-level AR: seconds per image, KV cache on and off\n\n{wrap(intro)}\n\n{table}{ratio}"


def peer_jit_section(path: Optional[str]) -> str:
    if not path:
        return ""
    return ("### 7. Peer JIT (--peer-jit)\n\n" +
            wrap(f"--peer-jit {path} was given, but measuring it is **not implemented yet**: no numbers are "
                 f"reported for it."))


# ----------------------------------------------------------------------------------------------------- running
def init_single_process() -> torch.device:
    """torch.distributed for a world of one (pixelgen.engine.dist.init_distributed, as the engine calls it), the
    rank variables set first where no launcher did."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise SystemExit(f"benchmarks/gpu.py runs as one process on one device, not WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}")
    return init_distributed().device


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on the CPU, every case through the same code (the default without CUDA)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="cases to run, in this order (default: all)")
    parser.add_argument("--sizes", nargs="+", choices=[s for s in SIZES if s != "tiny"], default=["B", "XL"],
                        help="trunk-stage sizes of case 1 (GPU; default: B XL)")
    parser.add_argument("--batch", type=int, default=32, help="training batch of cases 1-3 (GPU; default 32)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before the timed ones (GPU; default 3: FLOP count, compile)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per case (GPU; default 10)")
    parser.add_argument("--sync-steps", type=int, default=4, help="steps under each counter of case 3 (default 4)")
    parser.add_argument("--sample-batch", type=int, default=64, help="images per bf16 sampling draw (default 64)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile rows of case 1 (most of a GPU run's time; on the CPU the "
                             "smoke run's one compiled case takes ~30 s)")
    parser.add_argument("--peer-jit", metavar="PATH", default=None,
                        help="accepted, not implemented yet: the output says so and reports no numbers")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown section to this file")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"replace the <!-- {TAG}:start/end --> block in docs/benchmarks.md (GPU runs only)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        log("no CUDA device: running the smoke mode (--smoke)")
        args.smoke = True
    if args.write_docs and args.smoke:
        parser.error("--write-docs records a GPU run; it is refused with --smoke (and without CUDA)")
    if min(args.batch, args.steps, args.sync_steps, args.sample_batch) < 1 or args.warmup < 1:
        parser.error("--batch, --steps, --sync-steps, --sample-batch and --warmup must be at least 1")
    return args


def run_cases(plan: Plan, device: torch.device, cases: list[str], peer_jit: Optional[str]) -> list[str]:
    sections = []
    for case in cases:
        t0 = time.time()
        if case == "trunk":
            sections.append(trunk_section(case_trunk(plan, device), plan, device))
        elif case == "decoder":
            sections.append(decoder_section(case_decoder(plan, device), plan, device))
        elif case == "sync":
            sections.append(sync_section(case_sync(plan, device), device))
        elif case == "sdpa":
            sections.append(sdpa_section(*case_sdpa(plan, device), device))
        elif case == "sampling":
            sections.append(sampling_section(*case_sampling(plan, device), plan, device))
        elif case == "ar":
            sections.append(ar_section(*case_ar(plan, device)))
        log(f"case {case}: {time.time() - t0:.1f} s")
    if peer_jit:
        log(f"--peer-jit {peer_jit}: not implemented yet")
        sections.append(peer_jit_section(peer_jit))
    return sections


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    plan = make_plan(args)
    t_start = time.time()
    # The engine, DeepSpeed and rich print to stdout; the markdown alone goes there, at the end.
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        if args.smoke and torch.cuda.is_available():
            log("--smoke on a CUDA machine: the smoke sizes run on the GPU")
        device = init_single_process()
        if not args.smoke and device.type != "cuda":
            raise SystemExit("no CUDA device for the GPU mode: run with --smoke")
        log(f"device {device}; plan: {plan}")
        sections = run_cases(plan, device, args.cases, args.peer_jit)
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
    seconds = time.time() - t_start
    body = "\n\n".join([header(plan, device, command, seconds, args.cases), *sections])
    print(body, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(body + "\n")
        log(f"wrote {args.out}")
    if args.write_docs:
        write_section(body, HEADING, TAG)
    log(f"total {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
