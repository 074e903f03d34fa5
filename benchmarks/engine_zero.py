"""Steps/s and peak memory of the training engine under each DeepSpeed ZeRO stage: CPU, 2 ranks over gloo.

    .venv/bin/python benchmarks/engine_zero.py [--write] [--models baseline tiny small] [--zero 0 1 2 3]

Every run is the real command, `pixelgen stage train_trunk configs/tiny.yaml key=value...`, started as two
processes with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on 127.0.0.1),
one torch thread each (OMP_NUM_THREADS=1: 2 ranks on 2 cores) and no GPU visible (CUDA_VISIBLE_DEVICES=""),
each in a fresh run folder, all on shards written once at the start (a fake ImageNet of 4 classes x 100
images, sharded at 16 and 32 px). The models, all at a global batch of 8 (4 images per rank):
  baseline  the tiny config shrunk to ~8k parameters (trunk dim 8 x 1 block, PiT pixel dim 4): what the
            torch / DeepSpeed / gloo runtime and the loop cost with (almost) no model;
  tiny      configs/tiny.yaml as it is (16 px, patch 4, trunk dim 32 x 2 blocks; 87k parameters);
  small     the tiny config with model.trunk.size=small (trunk dim 384 x 8 blocks, PiT pixel dim 16 x 2) at
            32 px, patch 4 (24.3M parameters: fp32 weights, gradients and Adam states are ~370 MiB per copy
            of the model, so ZeRO has something to partition).

Measured per run, from rank 0's <run_dir>/train_trunk/metrics.jsonl (one record per log line):
  - steps/s: 1 / the median `step_time_s` of the log intervals after the first (the first holds DeepSpeed's
    first step and the FLOP count); `spread` is (slowest - fastest interval) / median;
  - peak RSS: `peak_mem_gib` of the last record, rank 0's process peak resident size up to the last training
    step (the final checkpoint, sample grid and export come after it; nothing else is checkpointed);
  - peak - baseline: that minus the baseline model's peak under the same ZeRO stage, i.e. what the model
    itself adds (its states, activations, DeepSpeed's buffers that grow with it) on top of the runtime.
Estimated: pixelgen.models.memory's model states per rank (fp32 weights, gradients, Adam m and v, and the
trainer's fp32 EMA) for 2 ranks at the same stage. Ratios are against ZeRO-0 of the same model: CPU numbers
compare within one run on one machine, never against a GPU's.

Prints progress to stderr and a markdown table to stdout. --write also replaces the block between
<!-- engine_zero:start --> and <!-- engine_zero:end --> in docs/benchmarks.md (creating the section when it is
missing); text below the end marker is kept. Takes ~11 min on 2 cores. A run that fails shows as `failed` in
the table and its log's tail is printed; the other runs go on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path

from report import DOC, REPO, git_commit, log, machine, write_section

CONFIG = "configs/tiny.yaml"
HEADING = "## The training engine under each ZeRO stage (CPU, 2 ranks)"
RANKS = 2
MiB, GiB = 2**20, 2**30


@dataclass(frozen=True)
class Model:
    name: str
    resolution: int
    log_every: int  # steps per log interval: several intervals per run, each long enough to time
    overrides: tuple[str, ...] = ()


MODELS = {
    "baseline": Model("baseline", 16, 100, (
        "model.trunk.dim=8", "model.trunk.depth=1", "model.trunk.heads=2", "model.trunk.mlp_ratio=1",
        "model.decoder.pixel_dim=4", "model.decoder.attn_dim=8", "model.decoder.heads=2",
        "model.decoder.mlp_ratio=1")),
    "tiny": Model("tiny", 16, 100),
    # The named size sets the trunk and decoder dims; the tiny config's decoder attn_dim (32) would not split
    # into the size's 6 heads, so it goes back to the default (the trunk's width, 384).
    "small": Model("small", 32, 8, ("data.resolution=32", "model.trunk.size=small", "model.decoder.attn_dim=null")),
}


@dataclass
class Result:
    model: str
    zero: int
    params: int
    state_bytes: int  # memory.py's model states per rank
    activation_bytes: int  # memory.py's activations per rank (the same at every stage)
    step_times: list[float] = field(default_factory=list)  # s/step of each timed interval
    peak_gib: float | None = None
    seconds: float = 0.0  # wall time of the whole run, start-up and export included
    error: str | None = None

    @property
    def steps_per_s(self) -> float | None:
        return 1.0 / statistics.median(self.step_times) if self.step_times else None

    @property
    def spread(self) -> float | None:
        if len(self.step_times) < 2:
            return None
        return (max(self.step_times) - min(self.step_times)) / statistics.median(self.step_times)


def pixelgen_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("pixelgen")  # the venv's console script, as a user would run it
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], log_path: Path) -> None:
    with open(log_path, "w") as f:
        rc = subprocess.run(pixelgen_cmd() + args, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"`pixelgen {shlex.join(args)}` failed (exit {rc}); its log: {log_path}\n{tail(log_path)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    # DeepSpeed's deprecation warnings repeat every step; they say nothing about a failure.
    text = [line for line in text if "FutureWarning" not in line and "return func(*args" not in line]
    return "\n".join(text[-lines:])


def prepare_data(out: Path) -> dict[int, Path]:
    """A fake ImageNet, sharded once per resolution; returns {resolution: shard folder}."""
    src = out / "imagenet"
    run_cli(["fake-imagenet", str(src), "--classes", "4", "--train-per-class", "100", "--val-per-class", "2",
             "--size", "40"], out / "fake-imagenet.log")
    shards = {}
    for res in sorted({m.resolution for m in MODELS.values()}):
        run_dir = out / f"shard{res}"
        run_cli(["stage", "shard", CONFIG, f"run_dir={run_dir}", "stages=[shard]", f"data.imagenet_dir={src}",
                 f"data.resolution={res}"], out / f"shard{res}.log")
        shards[res] = run_dir / "shard"
    return shards


def estimate(model: Model, zero: int, micro: int) -> tuple[int, int, int]:
    """(parameters, model-state bytes per rank, activation bytes per rank) by pixelgen.models.memory."""
    from omegaconf import OmegaConf

    from pipeline.config import load_config
    from pixelgen.models.memory import estimate_memory

    cfg = load_config(REPO / CONFIG, ["stages=[train_trunk]", "data.shard_dir=unused", *model.overrides])
    # The engine trains in fp32 on the CPU (precision auto).
    est = estimate_memory(OmegaConf.to_object(cfg.model), cfg.data.resolution, batch_size=micro,
                          world_size=RANKS, zero_stage=zero, precision="fp32")
    return est.params_total, est.model_state_bytes, est.activation_bytes


def train_overrides(model: Model, zero: int, run_dir: Path, shard_dir: Path, batch: int, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", "stages=[train_trunk]", f"data.shard_dir={shard_dir}", "logging.wandb=disabled",
            f"launch.train_trunk.tasks={RANKS}", f"train_trunk.zero_stage={zero}", f"train_trunk.batch_size={batch}",
            f"train_trunk.steps={steps}", f"train_trunk.log_every={model.log_every}",
            f"train_trunk.ckpt_every={steps + 1}", *model.overrides]


def launch(cmd: list[str], run_dir: Path, timeout: float) -> list[int]:
    """Start the ranks, wait for all; a rank that fails leaves the others 30 s before they are stopped
    (they would wait forever in a collective). Returns the exit codes."""
    port = free_port()
    procs = []
    try:
        for rank in range(RANKS):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(RANKS), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "CUDA_VISIBLE_DEVICES": ""}
            with open(run_dir.with_name(f"{run_dir.name}.rank{rank}.log"), "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline, failed_at = time.time() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.time()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + 30):
                break
            time.sleep(0.5)
    finally:
        for p in procs:  # only the process groups started here
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    return [p.returncode for p in procs]


def measure(model: Model, zero: int, out: Path, shard_dir: Path, args) -> Result:
    params, states, acts = estimate(model, zero, args.batch // RANKS)
    result = Result(model.name, zero, params, states, acts)
    run_dir = out / f"{model.name}-zero{zero}"
    steps = model.log_every * (args.intervals + 1)
    cmd = pixelgen_cmd() + ["stage", "train_trunk", CONFIG,
                            *train_overrides(model, zero, run_dir, shard_dir, args.batch, steps)]
    t0 = time.time()
    codes = launch(cmd, run_dir, args.run_timeout)
    result.seconds = time.time() - t0
    metrics = run_dir / "train_trunk" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if any(codes) or len(records) < 2:
        result.error = f"exit codes {codes}" if any(codes) else f"{len(records)} log records"
        for rank in range(RANKS):
            path = run_dir.with_name(f"{run_dir.name}.rank{rank}.log")
            log(f"--- {path} (last lines)\n{tail(path)}")
        return result
    result.step_times = [r["step_time_s"] for r in records[1:]]  # the first interval is warm-up
    result.peak_gib = records[-1]["peak_mem_gib"]
    return result


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def table(results: list[Result]) -> str:
    baseline = {r.zero: r.peak_gib for r in results if r.model == "baseline"}
    rows = ["| model (params) | ZeRO | steps/s (vs ZeRO-0) | spread | peak RSS, rank 0 (vs ZeRO-0) | "
            "peak - baseline (vs ZeRO-0) | model states / rank, memory.py (vs ZeRO-0) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r.model for r in results):
        group = [r for r in results if r.model == name]
        ref = next((r for r in group if r.zero == 0), None)

        def above_baseline(r: Result) -> float | None:
            if r.peak_gib is None or baseline.get(r.zero) is None or name == "baseline":
                return None
            return (r.peak_gib - baseline[r.zero]) * GiB / MiB

        for r in group:
            model = f"{name} ({_params(r.params)})"
            states = f"{r.state_bytes / MiB:.1f} MiB ({_ratio(r.state_bytes, ref and ref.state_bytes)})"
            if r.error:
                rows.append(f"| {model} | {r.zero} | failed ({r.error}) | - | - | - | {states} |")
                continue
            base_sps = ref.steps_per_s if ref and not ref.error else None
            base_peak = ref.peak_gib if ref and not ref.error else None
            extra, base_extra = above_baseline(r), ref and above_baseline(ref)
            # A difference of a few MiB is within the run-to-run wobble of a ~1 GiB RSS: no ratio for it.
            extra_cell = "-" if extra is None else (
                f"{extra:.0f} MiB ({_ratio(extra, base_extra) if base_extra and base_extra >= 32 else '-'})")
            spread = "-" if r.spread is None else f"{r.spread:.0%}"
            rows.append(f"| {model} | {r.zero} | {r.steps_per_s:.2f} ({_ratio(r.steps_per_s, base_sps)}) | {spread} | "
                        f"{r.peak_gib:.2f} GiB ({_ratio(r.peak_gib, base_peak)}) | {extra_cell} | {states} |")
    return "\n".join(rows)


def section(results: list[Result], args, command: str, seconds: float) -> str:
    acts = ", ".join(f"{name} {r.activation_bytes / MiB:.1f} MiB" for name, r in
                     {r.model: r for r in results}.items())
    steps = ", ".join(f"{n} {MODELS[n].log_every * (args.intervals + 1)}" for n in args.models)
    versions = f"torch {metadata.version('torch')}, DeepSpeed {metadata.version('deepspeed')}"
    paragraphs = [
        f"`{command}`. Machine: {machine()}; {RANKS} ranks over gloo, one torch thread each; {versions}. Run "
        f"of {datetime.date.today().isoformat()}, commit {git_commit()}; {seconds / 60:.1f} min in all.",
        f"Each row is one run of `pixelgen stage train_trunk {CONFIG}` (fp32, global batch {args.batch} = "
        f"{args.batch // RANKS} images per rank; steps: {steps}), fresh run folder, shards written once. steps/s "
        f"is 1 / the median s/step of the {args.intervals} log intervals after the first (warm-up); spread is "
        f"(slowest - fastest interval) / median. Peak RSS is rank 0's process peak up to the last step; "
        f"*peak - baseline* subtracts the baseline model's (~8k parameters) peak at the same stage. "
        f"memory.py's model states: fp32 weights + gradients + Adam states + the fp32 EMA per rank; its "
        f"activation estimate per rank (every stage): {acts}.",
    ]
    wrap = [textwrap.fill(p, 110, break_long_words=False, break_on_hyphens=False) for p in paragraphs]
    return "\n\n".join([*wrap, table(results)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="models to run, in this order (default: all; 'peak - baseline' needs baseline)")
    parser.add_argument("--zero", nargs="+", type=int, choices=(0, 1, 2, 3), default=[0, 1, 2, 3],
                        help="ZeRO stages (default 0 1 2 3; ratios need 0)")
    parser.add_argument("--batch", type=int, default=8, help=f"global batch, divisible by {RANKS} (default 8)")
    parser.add_argument("--intervals", type=int, default=5,
                        help="timed log intervals per run, after the warm-up one (default 5)")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds before a run is stopped (900)")
    parser.add_argument("--out", default="/tmp/pixelgen-engine-zero", help="scratch folder (deleted first)")
    parser.add_argument("--write", action="store_true", help=f"replace the section in {DOC.relative_to(REPO)}")
    args = parser.parse_args()
    if args.batch % RANKS:
        parser.error(f"--batch must be divisible by {RANKS}")
    command = shlex.join([".venv/bin/python", "benchmarks/engine_zero.py", *sys.argv[1:]])

    t_start = time.time()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"fake ImageNet and shards in {out} ...")
    shards = prepare_data(out)
    runs = [(MODELS[m], z) for m in args.models for z in args.zero]
    results = []
    for i, (model, zero) in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {model.name} ZeRO-{zero} ...")
        r = measure(model, zero, out, shards[model.resolution], args)
        results.append(r)
        if r.error:
            log(f"[{i}/{len(runs)}] {model.name} ZeRO-{zero}: FAILED ({r.error}) after {r.seconds:.0f} s; "
                f"logs beside {out / f'{model.name}-zero{zero}'}")
        else:
            log(f"[{i}/{len(runs)}] {model.name} ZeRO-{zero}: {r.steps_per_s:.2f} steps/s (intervals "
                f"{min(r.step_times):.3f}-{max(r.step_times):.3f} s/step), peak RSS {r.peak_gib:.3f} GiB, "
                f"{r.seconds:.0f} s")
    seconds = time.time() - t_start
    body = section(results, args, command, seconds)
    print(body)
    if args.write:
        write_section(body, HEADING, "engine_zero")
    log(f"total {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
