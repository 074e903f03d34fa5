"""Per-stage wall time of a finished run, as a markdown table for docs/benchmarks.md.

    .venv/bin/python benchmarks/demo_stages.py runs/demo

Reads the stages' DONE.json markers (each records its own wall time) and reports each stage's share of the
run, so the numbers from one run can be compared with each other.
"""

import os
import platform
import sys
from pathlib import Path

from pipeline import rundir


def main(run_dir: str) -> None:
    cfg = rundir.load_run_config(run_dir)
    rows = [(s, rundir.marker(run_dir, s)) for s in cfg.stages]
    missing = [s for s, m in rows if m is None]
    if missing:
        sys.exit(f"stages {missing} of {run_dir} are not done; finish the run first")
    total = sum(m["seconds"] for _, m in rows)
    print(f"Run `{cfg.name}` ({Path(run_dir).resolve().name}), {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}, no GPU.\n")
    print("| stage | wall time (s) | share of the run | what it did |")
    print("|---|---:|---:|---|")
    for stage, m in rows:
        if stage == "shard":
            what = ", ".join(f"{k}: {v['count']} images" for k, v in m["splits"].items())
        elif stage.startswith("train"):
            what = f"{m['steps']} steps at batch {cfg[stage].batch_size}, ZeRO-{cfg[stage].zero_stage}"
        else:
            what = f"{cfg.fid.samples_per_class * cfg.model.num_classes} samples, {cfg.sampler.kind} {cfg.sampler.steps} steps"
        print(f"| {stage} | {m['seconds']:.0f} | {m['seconds'] / total:.0%} | {what} |")
    print(f"| **all** | **{total:.0f}** | 100% | |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
