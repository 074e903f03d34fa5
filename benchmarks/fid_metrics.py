"""What sFID and precision/recall add to the FID stage's scoring, side by side in one run (CPU).

    .venv/bin/python benchmarks/fid_metrics.py [--images 5000] [--repeats 3] [--write-docs]

pixelgen.eval.fid.compute_metrics on stand-in features of the real sizes (pool3 2048-d, spatial 17 x 17 x 7 =
2023-d, logits 1008-d; random, which costs what real features cost) for N generated against N reference images,
with each metric set of the FID stage: fid alone, then each added metric, then all of them (the default
fid.metrics). The Inception forward passes are not part of it: they cost the same whatever is computed from
their features. Each set runs `repeats` times in rotation; the table has the median seconds and the ratio to
fid alone. FID and sFID cost one matrix square root each (torch-fidelity's, independent of N beyond the
covariance); precision/recall costs distance matrices, N_gen^2 + N_ref^2 + 2 N_gen N_ref distances in 10k
blocks (torch-fidelity's save_cpu_ram path), so at ADM's 50k generated x 10k reference it grows to about 36x
its cost at 5k x 5k.

Prints progress to stderr and a markdown section to stdout; --write-docs replaces the block between
<!-- fid_metrics:start --> and <!-- fid_metrics:end --> in docs/benchmarks.md (appending the section
"## FID stage: what each metric costs (CPU)" when it is missing). The defaults take about two minutes.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from report import git_commit, log, machine, write_section  # noqa: E402
from pixelgen.eval.fid import FEATURE_FID, FEATURE_ISC, FEATURE_SFID, compute_metrics, reference_from_features  # noqa: E402

SETS = (["fid"], ["fid", "is"], ["fid", "sfid"], ["fid", "precision_recall"], ["fid", "is", "sfid", "precision_recall"])


def features(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {FEATURE_FID: torch.rand(n, 2048, generator=g, dtype=torch.float64),
            FEATURE_SFID: torch.rand(n, 2023, generator=g, dtype=torch.float64),
            FEATURE_ISC: torch.randn(n, 1008, generator=g, dtype=torch.float64)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="generated and reference images each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)

    reference = reference_from_features(features(args.images, 0), args.images)
    generated = features(args.images, 1)
    times: dict[str, list[float]] = {"+".join(s): [] for s in SETS}
    for r in range(args.repeats):
        for metrics in SETS:
            t0 = time.perf_counter()
            compute_metrics(generated, reference, metrics)
            times["+".join(metrics)].append(time.perf_counter() - t0)
            log(f"[{r + 1}/{args.repeats}] {'+'.join(metrics)}: {times['+'.join(metrics)][-1]:.1f} s")
    base = statistics.median(times["fid"])
    rows = ["| fid.metrics | seconds (median) | vs fid alone |", "|---|---:|---:|"]
    for name, values in times.items():
        rows.append(f"| {name.replace('+', ', ')} | {statistics.median(values):.1f} | "
                    f"{statistics.median(values) / base:.2f}x |")
    body = "\n".join([
        f"`.venv/bin/python benchmarks/fid_metrics.py --images {args.images} --repeats {args.repeats}`: "
        f"{args.images} generated against {args.images} reference feature sets, {machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, commit {git_commit()}, "
        f"{datetime.date.today().isoformat()}.",
        "",
        *rows,
    ])
    print(body)
    if args.write_docs:
        write_section(body, "## FID stage: what each metric costs (CPU)", "fid_metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
