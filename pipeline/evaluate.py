"""`pixelgen eval`: FID along a run, after the fact: milestones x EMA decays x sampler settings.

Each point is scored through the FID stage's own code (pipeline.stages.fid_scorer: the run's fid.* protocol,
the reference cached beside the shards), into RUN_DIR/eval/: its chunks under chunks/<name>/ while it is drawn,
its record points/<name>.json when it is done. A rerun, or a requeued array task, skips the points on record
and the chunks on disk. After each point, results.json (every point on record) and fid_vs_step.png (one line
per EMA x sampler setting) are written again from the records, under a lock, so the tasks of a SLURM array
(one per point) may finish in any order.
"""

from __future__ import annotations

import fcntl
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import ConfigError, sampler_entry

EVAL_DIR = "eval"
RESULTS = "results.json"
PLOT = "fid_vs_step.png"


@dataclass(frozen=True)
class EvalPoint:
    stage: str  # the training stage whose weights are scored
    step: int
    weights: str  # ema, ema-<decay> or model
    sampler: str  # sampler keys as in fid.sweep ("" = the run's sampler)
    path: str  # the weights file

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.sampler)
        return f"{self.stage}-step{self.step:08d}-{self.weights}" + (f"-{slug}" if slug else "")

    @property
    def label(self) -> str:
        return f"step {self.step}, {self.weights}" + (f", {self.sampler}" if self.sampler else "")


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_DIR


def available_steps(cfg, run_dir: Path, stage: str) -> dict[int, Path]:
    """{step: folder of exported weights} of a training stage: its milestones (keep_every) and its final export."""
    from pipeline import rundir
    from pixelgen.engine.export import PRIMARY_EMA, milestones, weights_metadata

    folder = rundir.stage_dir(run_dir, stage)
    found = milestones(folder)
    export = folder / "export"
    if rundir.marker(run_dir, stage) is not None and (export / PRIMARY_EMA).is_file():
        found.setdefault(int(weights_metadata(export / PRIMARY_EMA)["step"]), export)
    return dict(sorted(found.items()))


def plan_points(cfg, run_dir: Path, steps: list[int] | None = None, weights: list[str] | None = None,
                samplers: list[str] | None = None, stage: str | None = None) -> list[EvalPoint]:
    """The points steps x weights x samplers, each checked (the step has weights on disk, the EMA exists, the
    sampler keys are valid) before anything is drawn. Defaults: every step on disk, every EMA, the run's sampler."""
    from pixelgen.engine.export import MODEL_FILE, PRIMARY_EMA, ema_filename
    from pixelgen.eval.config import ema_decay
    from pixelgen.models.config import check_sampler

    trained = [s for s in ("train_trunk", "train_decoder") if s in cfg.stages]
    stage = stage or trained[-1]
    if stage not in trained:
        raise ConfigError(f"--stage {stage}: this run's training stages are {trained}")
    on_disk = available_steps(cfg, run_dir, stage)
    if not on_disk:
        raise ConfigError(f"{run_dir}: stage {stage} has no exported weights yet (no milestones/ and not done): set "
                          f"{stage}.keep_every (pixelgen extend {run_dir} {stage}.keep_every=N) or let it finish")
    steps = steps or list(on_disk)
    missing = [s for s in steps if s not in on_disk]
    if missing:
        raise ConfigError(f"--steps {','.join(map(str, missing))}: {stage} has weights at steps {list(on_disk)} "
                          f"only (milestones every {stage}.keep_every steps, and the final export)")
    decays = [float(d) for d in cfg[stage].ema_decays]
    weights = weights or ["ema" if i == 0 else f"ema-{d:g}" for i, d in enumerate(decays)]

    files = {}
    for name in weights:
        decay = ema_decay(name)
        if name not in ("ema", "model") and (decay is None or decay not in decays):
            raise ConfigError(f"--weights {name}: {stage} keeps the EMAs of decays {decays}: name ema (the first), "
                              f"ema-<decay> of one of them, or model")
        files[name] = (MODEL_FILE if name == "model" else PRIMARY_EMA if name == "ema"
                       else ema_filename(decays.index(decay), decay))
    points = []
    for entry in samplers or [""]:
        sampler, other = sampler_entry(cfg, entry, f"--sampler {entry!r}")
        if other:
            raise ConfigError(f"--sampler {entry!r}: name the weights with --weights, not weights=")

        def fail_entry(key, value, why, entry=entry):
            raise ConfigError(f"--sampler {entry!r}: {key} = {value!r}: {why}")

        check_sampler(sampler, fail_entry)
        points += [EvalPoint(stage, step, name, entry, str(on_disk[step] / files[name]))
                   for step in steps for name in weights]
    return points


def run_points(cfg, run_dir: Path, points: list[EvalPoint]) -> list[dict]:
    """Score `points` here (every rank of this process group together); returns their records (main rank)."""
    from pipeline.config import SweepPoint
    from pipeline.stages import _is_main, fid_scorer
    from pixelgen.engine import faults
    from pixelgen.progress import console

    out = eval_dir(run_dir)
    scorer, _, _ = fid_scorer(cfg, run_dir, out)
    records = []
    for k, point in enumerate(points):
        sampler, _ = sampler_entry(cfg, point.sampler, f"--sampler {point.sampler!r}")
        done = (out / "points" / f"{point.name}.json").is_file()
        extra = {**asdict(point), "metric_name": scorer.proto["metric_name"], "proxy": scorer.proto["proxy"]}
        record = scorer.score(point.name, SweepPoint(point.sampler, sampler, point.path),
                              f"{point.label}; point {k + 1}/{len(points)}", extra=extra)
        if _is_main():
            if done:
                console.print(f"[dim]eval point {point.label}: on record[/dim]")
            records.append(record)
            write_results(cfg, run_dir)
        faults.point("eval_point", k)
    return records


class _Lock:
    """An exclusive lock on a file of eval/ while results are rebuilt (array tasks finish at the same time)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def results(run_dir: Path) -> list[dict]:
    """Every point on record in eval/, by stage, step, weights and sampler."""
    rows = []
    for path in sorted((eval_dir(run_dir) / "points").glob("*.json")):
        record = json.loads(path.read_text())
        if "step" in record:  # written by eval (the FID stage's own points live in fid/)
            rows.append({k: v for k, v in record.items() if k != "plan"})
    return sorted(rows, key=lambda r: (r["stage"], r["step"], r["weights"], r["sampler"]))


def write_results(cfg, run_dir: Path) -> Path:
    from pixelgen.io import atomic_write_json

    out = eval_dir(run_dir)
    with _Lock(out / ".results.lock"):
        rows = results(run_dir)
        plot = plot_fid_vs_step(rows, out / PLOT, f"{cfg.name}: FID along training")
        return atomic_write_json(out / RESULTS, {"points": rows, "plot": str(plot)})


def plot_fid_vs_step(rows: list[dict], path: Path, title: str) -> Path:
    from pixelgen.io import atomic_write

    fig = fid_vs_step_figure(rows, title)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def fid_vs_step_figure(rows: list[dict], title: str | None = None):
    """FID against the training step, one line per (stage, EMA, sampler setting); the stage is named when the
    points span several. Also what `pixelgen report` draws when it finds no plot file."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick
    from matplotlib.ticker import MaxNLocator

    lines: dict[tuple, list] = {}
    for r in rows:
        if isinstance(r.get("fid"), (int, float)):
            key = (r.get("stage"), r.get("weights"), r.get("sampler") or "")
            lines.setdefault(key, []).append((r.get("step", 0), r["fid"]))
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    stages = {key[0] for key in lines}
    for (stage, weights, sampler), pts in sorted(lines.items(), key=lambda kv: tuple(map(str, kv[0]))):
        pts.sort()
        label = " ".join(str(x) for x in (stage if len(stages) > 1 else "", weights, sampler or "(run's sampler)")
                         if x)
        ax.plot([s for s, _ in pts], [f for _, f in pts], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("proxy-FID (random-init Inception)" if any(r.get("proxy") for r in rows) else "FID")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------ CLI
def _csv(text: str | None, kind=str) -> list | None:
    if not text:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: expected a comma-separated list of {kind.__name__}s") from None


def cmd_eval(args) -> int:
    from pipeline import rundir
    from pipeline.cli import _load_cluster, console

    run_dir = Path(args.run_dir)
    cfg = rundir.load_run_config(run_dir)
    points = plan_points(cfg, run_dir, _csv(args.steps, int), _csv(args.weights), args.sampler, args.stage)
    on_record = [p for p in points if (eval_dir(run_dir) / "points" / f"{p.name}.json").is_file()]
    console.print(f"eval {run_dir}: {len(points)} points ({len(on_record)} on record already) under "
                  f"{cfg.fid.samples_per_class} samples per class")
    if args.cluster:
        from pipeline import orchestrate

        profile_path, profile = _load_cluster(args.cluster, cfg)
        job = orchestrate.submit_eval(cfg, run_dir, profile_path, profile, [asdict(p) for p in points])
        console.print(f"submitted job array {job} ({len(points)} tasks, one per point); results: "
                      f"{eval_dir(run_dir) / RESULTS}")
        return 0
    records = run_points(cfg, run_dir, points)
    _print_table(records, console)
    console.print(f"results: {eval_dir(run_dir) / RESULTS}   plot: {eval_dir(run_dir) / PLOT}")
    return 0


def _print_table(records: list[dict], console) -> None:
    from rich.table import Table

    name = "proxy-FID" if records and records[0]["proxy"] else "FID"
    table = Table(title=f"{name} ({records[0]['plan']['per_class'] if records else 0} samples per class)")
    for col in ("stage", "step", "weights", "sampler", name, "IS"):
        table.add_column(col, justify="right" if col in ("step", name, "IS") else "left")
    for r in records:
        table.add_row(r["stage"], str(r["step"]), r["weights"], r["sampler"] or "(run's)", f"{r['fid']:.3f}",
                      f"{r['isc_mean']:.3f}" if r.get("isc_mean") is not None else "-")
    console.print(table)


def add_parser(sub, formatter_class) -> None:
    p = sub.add_parser(
        "eval", formatter_class=formatter_class, help="FID of a run's milestones x EMAs x sampler settings",
        description="Score the FID (the run's fid.* protocol, through the FID stage's code) of every point of "
                    "steps x weights x samplers, into RUN_DIR/eval/: each point kept as it finishes, so a rerun "
                    "skips what is on record; results.json and fid_vs_step.png are rewritten after each. Steps are "
                    "the training stage's milestones (keep_every) and its final export. With --cluster: one SLURM "
                    "job array, a task per point, requeued on preemption.",
        epilog="examples:\n  pixelgen eval runs/pixeldit_b --steps 100000,200000 --weights ema,ema-0.9999\n"
               "  pixelgen eval runs/pixeldit_b --sampler 'cfg_scale=2.0' --sampler 'cfg_scale=3.0 steps=100'\n"
               "  pixelgen eval runs/pixeldit_b --cluster mycluster")
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--steps", metavar="N,N", help="training steps with weights on disk (default: all of them)")
    p.add_argument("--weights", metavar="W,W",
                   help="ema, ema-<decay>, model (default: every EMA of the stage)")
    p.add_argument("--sampler", action="append", metavar="'KEY=V ...'",
                   help="sampler keys as in fid.sweep, one setting per flag (default: the run's sampler)")
    p.add_argument("--stage", choices=("train_trunk", "train_decoder"),
                   help="whose weights (default: the run's last training stage)")
    p.add_argument("--cluster", metavar="NAME", help="submit as a SLURM job array (cluster profile slurm/NAME.yaml)")
    p.set_defaults(func=cmd_eval)
