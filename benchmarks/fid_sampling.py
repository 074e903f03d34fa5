"""The FID stage's sampling at scale on the CPU, side by side in one run: images/s with 1 and 2 ranks, and peak
memory against the sample count.

    .venv/bin/python benchmarks/fid_sampling.py [--per-class 16] [--repeats 2] [--write-docs]

Ranks: the real `pixelgen run configs/tiny.yaml stages=[fid]` through submitit's local executor, with
launch.fid.tasks = 1 and 2 in rotation, on a tiny random-init generator (16 px, Euler 4 steps, CFG) and a
random-init InceptionV3, `--per-class` x 4 classes images per run; the reference statistics are computed
once before timing (they are cached beside the shards), so each run is sampling, features, scoring and
samples.npz. Images/s is the stage's own wall time (DONE.json), which leaves out the process start-up. On a
2-core machine two ranks share the cores that one rank's intra-op threads already use, so the ratio shows
the overhead of sharing the work (rendezvous, broadcasts, the barrier), not the speed-up of a node of GPUs.

Memory: tests/fid_memory_worker.py (the sampling path with a stand-in generator of 512 px images: draw,
featurise, write chunks, score from them, assemble samples.npz) for 16, 32 and 64 images, each in a fresh
forked child; the peak resident memory (VmHWM) against what the images alone would take.

Prints progress to stderr and a markdown section to stdout; --write-docs replaces the block between
<!-- fid_sampling:start --> and <!-- fid_sampling:end --> in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from report import git_commit, log, machine, write_section  # noqa: E402

PIXELGEN = str(Path(sys.executable).parent / "pixelgen")
TINY = ROOT / "configs" / "tiny.yaml"


def _run(*args: str) -> None:
    proc = subprocess.run([PIXELGEN, *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pixelgen {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def ranks_side_by_side(work: Path, per_class: int, repeats: int) -> dict[int, list[float]]:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from pipeline.config import load_config
    from pixelgen import families
    from pixelgen.data.fake_imagenet import generate

    generate(work / "imagenet", num_classes=4, train_per_class=12, val_per_class=4, size=24, seed=0, progress=False)
    _run("stage", "shard", str(TINY), f"run_dir={work / 'shards'}", f"data.imagenet_dir={work / 'imagenet'}")
    shards = work / "shards" / "shard"
    cfg = load_config(TINY, ["data.imagenet_dir=x"])
    torch.manual_seed(0)
    model = families.build_generator(OmegaConf.to_object(cfg.model), cfg.data.resolution)
    weights = work / "ema.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    def stage(run: Path, tasks: int) -> float:
        _run("run", str(TINY), f"run_dir={run}", f"data.shard_dir={shards}", "stages=[fid]", f"fid.weights={weights}",
             f"fid.samples_per_class={per_class}", "fid.chunk_size=8", "fid.batch_size=8", f"launch.fid.tasks={tasks}",
             "--executor", "local")
        return json.loads((run / "fid" / "DONE.json").read_text())["seconds"]

    stage(work / "warm", 1)  # the reference statistics, cached beside the shards for every later run
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for r in range(repeats):
        for tasks in (1, 2):
            seconds[tasks].append(stage(work / f"r{r}-t{tasks}", tasks))
            log(f"[{r + 1}/{repeats}] {tasks} rank(s): {seconds[tasks][-1]:.1f} s for {4 * per_class} images")
    return seconds


def memory_side_by_side(work: Path) -> list[dict]:
    from pixelgen.eval import fid
    from pixelgen.eval.config import FIDConfig

    weights, _ = fid.resolve_inception_weights(FIDConfig(allow_random_features=True), str(work))
    spec = {"folder": str(work / "memory"), "weights": weights, "resolution": 512, "chunk_size": 8,
            "batch_size": 8, "counts": [4, 8, 16], "num_classes": 4}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    log("memory: 16, 32 and 64 images of 512 px")
    proc = subprocess.run([sys.executable, "-m", "tests.fid_memory_worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{**r, "images": 4 * c} for r, c in zip(results, spec["counts"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=16, help="images per class (4 classes) in the rank runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fid-sampling-") as tmp:
        work = Path(tmp)
        seconds = ranks_side_by_side(work, args.per_class, args.repeats)
        memory = memory_side_by_side(work)
    n = 4 * args.per_class
    one = statistics.median(seconds[1])
    rows = ["| ranks | stage seconds (median) | images/s | vs 1 rank |", "|---:|---:|---:|---:|"]
    for tasks, values in seconds.items():
        med = statistics.median(values)
        rows.append(f"| {tasks} | {med:.1f} | {n / med:.2f} | {one / med:.2f}x |")
    mib = 2 ** 20
    base = memory[0]["peak"]
    mem_rows = ["| images (512 px) | image bytes | peak resident | vs the smallest |", "|---:|---:|---:|---:|"]
    for m in memory:
        mem_rows.append(f"| {m['images']} | {m['image_bytes'] / mib:.0f} MiB | {m['peak'] / mib:.0f} MiB | "
                        f"{m['peak'] / base:.3f}x |")
    body = "\n".join([
        f"`.venv/bin/python benchmarks/fid_sampling.py --per-class {args.per_class} --repeats {args.repeats}`: "
        f"{machine()}, torch {torch.__version__}, commit {git_commit()}, {datetime.date.today().isoformat()}.",
        "",
        f"The FID stage on {n} images (tiny generator, 16 px, random-init Inception), 1 and 2 ranks in rotation:",
        "",
        *rows,
        "",
        "Peak memory of the sampling path against the sample count (stand-in generator, real Inception):",
        "",
        *mem_rows,
    ])
    print(body)
    if args.write_docs:
        write_section(body, "## FID stage: ranks and memory (CPU)", "fid_sampling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
