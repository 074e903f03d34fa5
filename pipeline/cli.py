"""The `pixelgen` command."""

from __future__ import annotations

import argparse
import json
import linecache
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

import pixelgen
from pipeline.config import STAGES, ConfigError, _explain, load_config

# Long paths and messages stay on one line, copyable. Off a terminal (a log file, a pipe) rich would lay the
# tables out in COLUMNS or 80 columns, a width a file does not have, and fold every long cell over several
# lines; there they get 200.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

EPILOG = """examples:
  pixelgen fake-imagenet runs/fake-imagenet
  pixelgen run configs/demo.yaml
  pixelgen run configs/demo.yaml train_trunk.steps=500 run_dir=runs/longer
  pixelgen run configs/pixeldit_b.yaml --cluster mycluster     (slurm/mycluster.yaml)
  pixelgen status runs/demo
  pixelgen resume runs/demo
  pixelgen extend runs/demo train_trunk.steps=400 train_trunk.keep_every=100
  pixelgen eval runs/demo --steps 100,200 --weights ema,ema-0.999
  pixelgen sample runs/demo --classes 1,3 --per-class 8 --cfg 3.0
  pixelgen report runs/demo
  pixelgen stage train_trunk configs/demo.yaml
  pixelgen shards verify runs/demo/shard
"""


def _load(args):
    cfg = load_config(args.config, args.overrides)
    from pipeline import rundir

    rundir.resolve_paths(cfg)
    return cfg


def cmd_run(args) -> int:
    from pipeline import rundir

    if args.dry_run and not args.cluster:
        raise ConfigError("--dry-run writes SLURM job scripts: give it a cluster profile with --cluster NAME")
    if args.cluster and args.executor != "local":
        raise ConfigError(f"--executor {args.executor} runs on this machine and --cluster submits to SLURM: pick one")
    cfg = _load(args)
    profile = _load_cluster(args.cluster, cfg, args.dry_run) if args.cluster else None
    if not args.dry_run:  # a dry run writes scripts for paths the cluster's nodes see, maybe not this machine
        _check_inputs(cfg, Path(cfg.run_dir), profile)
    run_dir = rundir.prepare(cfg)
    if not args.dry_run:
        rundir.refuse_if_queued(run_dir)
    if profile:
        return _submit(cfg, run_dir, *profile, command="run", dry_run=args.dry_run)
    return _run_here(cfg, run_dir, args.executor)


def _check_inputs(cfg, run_dir: Path, profile=None) -> None:
    """Every input path of the unfinished stages exists here, before a folder is made or a job submitted; a
    cluster profile with check_paths: false skips this (paths only its compute nodes see)."""
    from pipeline import rundir

    if profile is not None and not profile[1].check_paths:
        console.print(f"not checking input paths on this machine (check_paths: false in {profile[0]})")
        return
    problems = rundir.missing_inputs(cfg, run_dir)
    if problems:
        hint = (f"\n(paths that only the compute nodes see: set check_paths: false in {profile[0]})"
                if profile is not None else "")
        raise ConfigError("the run cannot start, nothing was created or submitted:\n  " + "\n  ".join(problems)
                          + hint)


# What submitting needs on this machine: sbatch queues the jobs, and submitit will not start without srun.
SUBMIT_BINARIES = ("sbatch", "srun")


def _load_cluster(name: str, cfg, dry_run: bool = False):
    """The profile, checked on its own and against the experiment, before anything is submitted."""
    from pipeline import cluster

    path, profile = cluster.load_profile(name)
    missing = [b for b in SUBMIT_BINARIES if shutil.which(b) is None]
    if missing and not dry_run:
        raise ConfigError(f"--cluster {name} needs SLURM's {' and '.join(missing)} on PATH (not found): submit from "
                          f"a login node of the cluster, or install the client tools (Debian: apt-get install "
                          f"slurm-client) with the cluster's slurm.conf and munge key, or start a local test cluster "
                          f"(sudo slurm/local/up); --dry-run writes the job scripts without any of them")
    cluster.check_experiment(cfg, profile, f"{cfg.name} on cluster profile {path}")
    cluster.check_partitions(profile, path)
    cluster.check_image(profile)
    return path, profile


def _run_here(cfg, run_dir: Path, executor: str) -> int:
    from pipeline import orchestrate

    console.print(f"[bold]pixelgen[/bold] run [cyan]{cfg.name}[/cyan] -> {run_dir}  (executor: {executor})")
    t0 = time.time()

    def on_done(stage, summary):
        note = "already done" if summary.get("skipped") else f"{summary.get('seconds', 0):.0f} s"
        console.print(f"[green]✓[/green] {stage} ({note})")

    try:
        echo = (lambda line: console.print(Text("  " + line, style="dim"), soft_wrap=True)) \
            if executor == "local" else None
        orchestrate.submit_chain(cfg, run_dir, executor, on_done=on_done, echo=echo)
    except orchestrate.StageFailed as err:
        console.print(f"[red]✗ {err}[/red]")
        console.print(f"Fix the cause and rerun the same command (or pixelgen resume {run_dir}): finished stages "
                      f"are skipped, '{err.stage}' resumes from its last checkpoint.")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the running stage was stopped; rerun the same command to resume "
                      "from its last checkpoint[/yellow]")
        return 130
    print_summary(run_dir, cfg, time.time() - t0)
    return 0


def _submit(cfg, run_dir: Path, profile_path: str, profile, command: str, dry_run: bool = False) -> int:
    from pipeline import cluster, orchestrate

    try:
        jobs = orchestrate.submit_slurm(cfg, run_dir, profile_path, profile, command=command, dry_run=dry_run)
    except orchestrate.SubmissionError as err:
        console.print(f"[red]✗ {err}[/red]")
        return 1
    if not jobs:
        console.print(f"every stage of {run_dir} is done; nothing to submit")
        return 0
    table = Table(title=f"pixelgen {command} {cfg.name} on {Path(profile_path).stem}"
                        + (" (dry run: nothing submitted)" if dry_run else ""))
    for col in ("stage", "job" if not dry_run else "job script", "ranks", "time limit"):
        table.add_column(col)
    for stage, job in jobs.items():
        ranks = cluster.world_size(profile, stage)
        what = job.get("script") or (job["job_id"] + (f" (array of {job['tasks']})" if job["tasks"] > 1 else ""))
        table.add_row(stage, what, str(ranks), f"{getattr(profile.time_min, stage)} min")
    console.print(table)
    if not dry_run:
        console.print(f"run record: {run_dir / cluster.RECORD}")
        console.print(f"follow it:  pixelgen status {run_dir} --watch    stop it: pixelgen cancel {run_dir}")
    return 0


def print_summary(run_dir: Path, cfg, wall: float) -> None:
    from pipeline import rundir

    table = Table(title=f"pixelgen run {cfg.name}", show_lines=False)
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("result")
    for stage in cfg.stages:
        m = rundir.marker(run_dir, stage) or {}
        if stage == "shard":
            splits = m.get("splits", {})
            result = ", ".join(f"{s}: {v['count']} images / {v['shards']} shards" for s, v in splits.items())
            if m.get("bad_files"):
                result += f", {m['bad_files']} bad files skipped"
        elif stage.startswith("train"):
            result = f"{m.get('steps')} steps, final loss {m.get('final_loss', float('nan')):.4f}"
        else:
            name = "proxy-FID" if m.get("proxy") else "FID"
            result = f"{name} = {m.get('fid', float('nan')):.3f}, IS = {m.get('isc_mean', float('nan')):.3f}"
            if m.get("best"):
                best = m["best"]
                weights = f" ({best['weights']})" if best.get("weights") not in (None, "ema") else ""
                result += f"; sweep best {best['fid']:.3f} with {best['sampler']}{weights}"
        table.add_row(stage, f"{m.get('seconds', 0):.0f} s", result)
    console.print(table)
    fid = rundir.marker(run_dir, "fid") if "fid" in cfg.stages else None
    console.print(f"run folder:  {run_dir}")
    if fid:
        if fid.get("proxy"):
            console.print("[yellow]The FID above is a proxy (random-init Inception features, no weights file): "
                          "it is not comparable to published numbers.[/yellow]")
        extra = [(label, fid[key]) for label, key in (("sFID", "sfid"), ("precision", "precision"),
                                                      ("recall", "recall")) if key in fid]
        if extra or fid.get("reference"):
            console.print("fid:         " + ", ".join(f"{label} {value:.3f}" for label, value in extra)
                          + (f" (against {fid['reference']})" if fid.get("reference") else ""))
        console.print(f"metrics:     {fid['metrics']}")
        console.print(f"sample grid: {fid['sample_grid']}")
    console.print(f"total wall time: {wall:.0f} s")


def cmd_stage(args) -> int:
    from pipeline import rundir
    from pipeline.stages import StagePreempted, run_stage

    cfg = _load(args)
    if args.name not in cfg.stages:
        raise ConfigError(f"stage '{args.name}' is not in this config's key 'stages' {list(cfg.stages)}")
    run_dir = rundir.prepare(cfg)
    task = array_task(cfg.shard.array_tasks) if args.name == "shard" else None
    try:
        summary = run_stage(args.name, cfg, run_dir, task=task)
    except StagePreempted as err:
        from pipeline.cluster import EXIT_PREEMPTED

        console.print(f"[yellow]{err}[/yellow]")
        return EXIT_PREEMPTED
    console.print_json(json.dumps(summary, default=str))
    return 0


def array_task(tasks: int) -> int | None:
    """This process's index in a SLURM job array (0-based), when the work is split into `tasks` > 1 parts."""
    import os

    if tasks <= 1 or "SLURM_ARRAY_TASK_ID" not in os.environ:
        return None
    task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", tasks))
    if count != tasks:
        raise ConfigError(f"this SLURM array has {count} tasks but shard.array_tasks = {tasks}: submit it with "
                          f"--array=0-{tasks - 1}, or set shard.array_tasks={count}")
    return task


def cmd_shards_write(args) -> int:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pixelgen.data.config import ShardConfig
    from pixelgen.data.shards import BAD_FILES, write_shards

    overrides = OmegaConf.from_dotlist(args.overrides)
    resolution = overrides.pop("resolution", 256)
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ConfigError(f"command line: key 'resolution' = {resolution!r}: must be an integer (the center crop "
                          "size in pixels)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ShardConfig), overrides)
    except OmegaConfBaseException as err:  # names the key and the expected type
        raise _explain(err, "command line", unknown="see `pixelgen shards write -h` for the settings") from None
    cfg = OmegaConf.to_object(cfg)
    task = array_task(cfg.array_tasks)
    manifest = write_shards(args.src, args.out, cfg, resolution, progress=True, task=task)
    if manifest is None:
        console.print(f"array task {task} of {cfg.array_tasks} done; the last task to finish writes the manifest")
        return 0
    for split, info in manifest["splits"].items():
        console.print(f"{split}: {info['totals']['count']} images in {len(info['shards'])} shards "
                      f"({info['totals']['bytes'] / 1e9:.2f} GB, {info['samples_per_shard']} per shard), "
                      f"layout {manifest['source']['splits'][split]['layout']}")
    if manifest["bad_files"]:
        console.print(f"[yellow]skipped {len(manifest['bad_files'])} unreadable files, listed in "
                      f"{Path(args.out) / BAD_FILES}[/yellow]")
    console.print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def cmd_shards_verify(args) -> int:
    from pixelgen.data.shards import read_manifest, verify_shards

    problems = verify_shards(args.shard_dir, workers=args.workers)
    for problem in problems:
        console.print(f"[red]✗[/red] {problem}")
    shards = sum(len(s["shards"]) for s in read_manifest(args.shard_dir)["splits"].values())
    if problems:
        console.print(f"[red]{len(problems)} of {shards} shards do not match the manifest[/red]: rerun the shard "
                      f"stage (or `pixelgen shards write` with the same settings) to rewrite them")
        return 1
    console.print(f"[green]✓[/green] all {shards} shards match {Path(args.shard_dir) / 'manifest.json'}")
    return 0


_STATE_STYLE = {"done": "green", "running": "cyan", "pending": "white", "requeued": "yellow",
                "failed": "red", "cancelled": "red", "not run": "dim", "started": "yellow", "not submitted": "dim"}


_FINAL = {"done", "failed", "cancelled", "not run", "not submitted"}  # states a stage leaves only by a resume


def _over(rows) -> bool:
    return all(r["state"] in _FINAL for r in rows)


def _status_view(run_dir: Path, cfg):
    """The status table, the lines below it, and the rows they came from."""
    from pipeline import cluster, rundir
    from pixelgen.engine.checkpoint import CheckpointManager

    rows = cluster.stage_states(run_dir, cfg)
    table = Table(title=f"{cfg.name}: {run_dir}")
    for col in ("stage", "state", "job", "nodes", "elapsed", "checkpoint"):
        table.add_column(col, no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in rows:
        stage, m = row["stage"], row["marker"]
        ckpt = CheckpointManager(rundir.stage_dir(run_dir, stage) / "checkpoints", 1, False).latest_complete()
        detail = row["detail"]
        if m and stage == "fid":
            detail = f"{'proxy-FID' if m.get('proxy') else 'FID'} {m.get('fid', float('nan')):.3f}"
        elif m and stage.startswith("train"):
            detail = f"loss {m.get('final_loss', float('nan')):.4f}"
        style = _STATE_STYLE.get(row["state"], "white")
        cells = [stage, f"[{style}]{row['state']}[/{style}]", row["job_id"] or "-", row["nodes"] or "-",
                 row["elapsed"], str(ckpt[0]) if ckpt else "-", detail]
        table.add_row(*cells)
    lines = []
    for row in rows:  # full paths below the table, to copy
        if row["log"] and row["state"] != "done" and Path(row["log"]).exists():
            lines.append(f"log of {row['stage']} ({row['state']}): {row['log']}")
    states = {r["state"] for r in rows}
    if "failed" in states:
        lines.append(f"fix the cause, then `pixelgen resume {run_dir}`: finished stages are not run again")
    elif "cancelled" in states:
        lines.append(f"`pixelgen resume {run_dir}` continues the run: finished stages are not run again")
    return table, lines, rows


def _print_status(table, lines) -> None:
    console.print(table)
    for line in lines:
        console.print(line)


def cmd_status(args) -> int:
    from pipeline import rundir

    run_dir = Path(args.run_dir)
    cfg = rundir.load_run_config(run_dir)
    table, lines, rows = _status_view(run_dir, cfg)
    if not args.watch or _over(rows):
        _print_status(table, lines)
        return 0
    # Until every stage is done, failed, cancelled or not run (a dead local run never gets there: Ctrl-C). On a
    # terminal the table is redrawn in place; into a file or pipe, a new one is printed when a stage's state changes.
    from rich.console import Group
    from rich.live import Live

    def live_view():  # long paths fold onto the next line rather than being cut at the terminal's edge
        return Group(table, *(Text(x, overflow="fold", no_wrap=False) for x in lines))

    try:
        if console.is_terminal:
            with Live(live_view(), console=console, auto_refresh=False) as live:
                while not _over(rows):
                    time.sleep(args.every)
                    table, lines, rows = _status_view(run_dir, cfg)
                    live.update(live_view(), refresh=True)
            return 0
        shown = None
        while True:
            states = [(r["stage"], r["state"]) for r in rows]
            if states != shown:
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim]")
                _print_status(table, lines)
                shown = states
            if _over(rows):
                return 0
            time.sleep(args.every)
            table, lines, rows = _status_view(run_dir, cfg)
    except KeyboardInterrupt:
        return 0


def cmd_cancel(args) -> int:
    from pipeline import cluster

    run_dir = Path(args.run_dir)
    if cluster.read_record(run_dir) is None:
        raise ConfigError(f"{run_dir} has no run record ({cluster.RECORD}): it was not submitted to SLURM, so there "
                          f"is nothing to cancel (stop a local run with Ctrl-C)")
    ids = cluster.cancel(run_dir)
    if ids:
        console.print(f"cancelled jobs {', '.join(ids)}; `pixelgen resume {run_dir}` picks the run up again")
    else:
        console.print(f"no job of {run_dir} is queued or running")
    return 0


def cmd_resume(args) -> int:
    from pipeline import rundir

    run_dir = Path(args.run_dir)
    rundir.refuse_if_queued(run_dir)
    return _continue(rundir.load_run_config(run_dir), run_dir, args.cluster, args.executor)


def _continue(cfg, run_dir: Path, cluster_name: str | None, executor: str, command: str = "resume") -> int:
    """Run the unfinished stages here, or submit them to `cluster_name` (default: the run record's last)."""
    from pipeline import cluster

    record = cluster.read_record(run_dir)
    name = cluster_name or (record["submissions"][-1]["cluster"] if record else None)
    if name is None:
        console.print(f"{run_dir} ran on this machine: running it here (--cluster NAME submits it to SLURM)")
        _check_inputs(cfg, run_dir)
        return _run_here(cfg, run_dir, executor)
    path, profile = _load_cluster(name, cfg)
    _check_inputs(cfg, run_dir, (path, profile))
    return _submit(cfg, run_dir, path, profile, command=command)


def cmd_extend(args) -> int:
    from pipeline import rundir
    from pipeline.config import with_overrides

    run_dir = Path(args.run_dir)
    if not args.overrides:
        raise ConfigError("pixelgen extend needs the keys to change, e.g. train_trunk.steps=200 "
                          "train_trunk.keep_every=100")
    cfg = with_overrides(rundir.load_run_config(run_dir), args.overrides, str(run_dir / "config.yaml"))
    rundir.resolve_paths(cfg)
    rundir.refuse_if_queued(run_dir)
    rundir.prepare(cfg, command="extend")  # refuses a key that would change what was trained, naming it
    console.print(f"{run_dir}: took {' '.join(args.overrides)} (recorded in {run_dir / 'run.json'})")
    if args.no_run:
        console.print(f"run it with `pixelgen resume {run_dir}`")
        return 0
    return _continue(cfg, run_dir, args.cluster, args.executor, command="extend")


def cmd_fake_imagenet(args) -> int:
    from pixelgen.data.fake_imagenet import generate

    summary = generate(args.out_dir, num_classes=args.classes, train_per_class=args.train_per_class,
                       val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    console.print(f"{summary['train_images']} train and {summary['val_images']} val images of "
                  f"{len(summary['wnids'])} classes in {summary['path']}")
    return 0


_FMT = argparse.RawDescriptionHelpFormatter  # descriptions and epilogs keep their line breaks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelgen", formatter_class=_FMT, epilog=EPILOG,
        description="Train pixel-space image generators: shard ImageNet -> train the semantic trunk -> "
                    "train the pixel decoder -> FID, locally or on SLURM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_chain_commands(sub)
    _add_run_dir_commands(sub)
    _add_loop_commands(sub)
    _add_data_commands(sub)
    from pipeline import importer  # import: published checkpoints as pixelgen weights

    importer.add_parser(sub, _FMT)
    return parser


def parse_after_positionals(args: argparse.Namespace, prog: str, add_options, description: str | None = None):
    """`args` with what followed a command's positionals (args.overrides, gathered unparsed by REMAINDER) parsed,
    options and key=value settings intermixed: before Python 3.12 argparse gives a `*` positional nothing once an
    option came between it and the first positional. `add_options(parser, defaults=False)` declares the options
    without defaults, so that what came before the positionals stays."""
    later = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    add_options(later, defaults=False)
    later.add_argument("overrides", nargs="*", default=[])
    return argparse.Namespace(**{**vars(args), **vars(later.parse_intermixed_args(args.overrides))})


def _executor_arg(p) -> None:
    p.add_argument("--executor", choices=("local", "debug"), default="local",
                   help="without --cluster: local = subprocesses on this machine (default); debug = in this "
                        "process")


def _config_args(p) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train_trunk.steps=100 run_dir=runs/try2")


def _add_chain_commands(sub) -> None:
    """run (the whole chain) and stage (one stage in this process)."""
    p = sub.add_parser("run", formatter_class=_FMT, help="validate the config, then run or submit the whole chain",
                       description="Validate the config, then hand every unfinished stage to submitit, each "
                                   "depending on the one before. Rerunning the same command on the same run "
                                   "folder skips finished stages and resumes an unfinished one.")
    _config_args(p)
    _executor_arg(p)
    p.add_argument("--cluster", metavar="NAME",
                   help="submit to SLURM with the cluster profile slurm/NAME.yaml (or a YAML path): every stage "
                        "at once, each afterok on the one before; e.g. --cluster local (slurm/local/up)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --cluster: write the job scripts under RUN_DIR/submitit/dry-run/ and submit nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", formatter_class=_FMT, help="run one stage in this process",
                       description="Run one stage in this process, under the same contract as `run`: a finished "
                                   "stage is a no-op, an interrupted one resumes. Earlier stages must be done.")
    p.add_argument("name", choices=STAGES, help="the stage")
    _config_args(p)
    p.set_defaults(func=cmd_stage)


def _add_run_dir_commands(sub) -> None:
    """status, cancel and resume: what to do with a run folder."""
    p = sub.add_parser("status", help="show the state of each stage of a run folder",
                       description="Show each stage's state (done, running, pending, requeued, failed, cancelled, "
                                   "not run), SLURM job id, the nodes it ran on, elapsed time (this run, and the total "
                                   "over its runs once requeued), latest complete checkpoint, training "
                                   "progress (step, loss, ETA) or result, and log, from the run record, squeue and "
                                   "the run folder (no sacct needed).")
    p.add_argument("run_dir", help="the run folder (run_dir of the config)")
    p.add_argument("--watch", action="store_true",
                   help="redraw the table until every stage is done, failed, cancelled or not run (into a file or "
                        "pipe: a new table per change of state)")
    p.add_argument("--every", type=float, default=10.0, metavar="SECONDS",
                   help="with --watch: seconds between looks (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a run's SLURM jobs that are still queued or running",
                       description="scancel every job of the run that is still queued or running. Finished stages "
                                   "and checkpoints stay; `pixelgen resume` continues from them.")
    p.add_argument("run_dir", help="the run folder")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", formatter_class=_FMT, help="run or submit a run's unfinished stages again",
                       description="Resubmit only the stages of RUN_DIR without a DONE marker, with the saved "
                                   "config; an interrupted training stage continues from its latest complete "
                                   "checkpoint. A SLURM run goes back to the cluster profile in its run record "
                                   "(re-read, so a fixed profile applies); a local run runs here.")
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("--cluster", metavar="NAME", help="submit to this cluster profile instead of the recorded one")
    _executor_arg(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("extend", formatter_class=_FMT, help="change a run's steps, cadences or FID settings and go on",
                       description="Take config changes that leave what has been trained as it is: more steps "
                                   "under a constant LR (a finished stage continues from its last checkpoint, "
                                   "and the stages made from its old end run again), log/sample/checkpoint/"
                                   "milestone cadences, logging, sampler and FID keys; recorded in run.json's "
                                   "history. A key that would make the checkpoints mean something else (model, "
                                   "objective, data, batch, a cosine schedule's length) is refused, named. Then "
                                   "the unfinished stages run as with `resume`.",
                       epilog="examples:\n  pixelgen extend runs/pixeldit_b train_trunk.steps=800000 "
                              "train_trunk.keep_every=100000\n  pixelgen extend runs/demo fid.samples_per_class=50 "
                              "--no-run")
    p.add_argument("run_dir", help="the run folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the keys to change")
    p.add_argument("--cluster", metavar="NAME", help="submit to this cluster profile instead of the recorded one")
    p.add_argument("--no-run", action="store_true", help="record the change only; `pixelgen resume` runs it")
    _executor_arg(p)
    p.set_defaults(func=cmd_extend)


def _add_loop_commands(sub) -> None:
    """What people do with a run after launching it: sample, eval and report (each its own module)."""
    from pipeline import evaluate, report, sample

    for module in (sample, evaluate, report):
        module.add_parser(sub, _FMT)


def _add_data_commands(sub) -> None:
    """shards (write, verify) and fake-imagenet: data outside a run."""
    p = sub.add_parser("shards", formatter_class=_FMT, help="write or verify WebDataset shards outside a run",
                       description="Shard an ImageNet folder once, to point many runs at it (data.shard_dir), or "
                                   "check shards against their manifest.")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    q = shards_sub.add_parser(
        "write", formatter_class=_FMT, help="shard an ImageNet folder",
        description="Shard an ImageNet folder (train/<wnid>/*.JPEG; val as <wnid>/ folders, or flat with "
                    "LOC_val_solution.csv or the devkit's labels; or the Kaggle release root). Resumable: rerun "
                    "the same command after an interruption. Inside a SLURM job array with shard.array_tasks=N "
                    "(sbatch --array=0-<N-1>) each task writes its own range of shards.",
        epilog="examples:\n  pixelgen shards write /data/imagenet /data/imagenet-256-png workers=16\n"
               "  pixelgen shards write /data/imagenet /data/in512 resolution=512 image_format=webp\n"
               "  sbatch --array=0-31 slurm/shard_array.sbatch /data/imagenet /data/imagenet-256-png 256")
    q.add_argument("src", help="ImageNet folder")
    q.add_argument("out", help="shard folder to write")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="resolution=256 (the center crop size) and the shard settings: "
                        "image_format=png|webp|jpg|original, max_count=, max_bytes=, workers=, splits=[train,val], "
                        "seed=, array_tasks=, val_labels=, jpeg_quality=")
    q.set_defaults(func=cmd_shards_write)
    q = shards_sub.add_parser("verify", help="check every shard's size and sha256 against the manifest",
                              description="Check every shard of DIR against DIR/manifest.json; exit 1 naming each "
                                          "shard that is missing or differs.")
    q.add_argument("shard_dir", help="folder with manifest.json")
    q.add_argument("--workers", type=int, default=4, help="shards hashed in parallel (default 4)")
    q.set_defaults(func=cmd_shards_verify)

    p = sub.add_parser("fake-imagenet", formatter_class=_FMT, help="generate a small ImageNet-layout dataset",
                       description="Write a small synthetic dataset in ImageNet's layout "
                                   "(train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_<n>.JPEG) whose "
                                   "classes differ in shape, colour and texture. Used by the demo and the tests.")
    p.add_argument("out_dir", help="folder to write")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--train-per-class", type=int, default=100, help="training images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class (default 20)")
    p.add_argument("--size", type=int, default=64, help="shorter image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fake_imagenet)


# Where pixelgen's and the pipeline's own checks live: their `raise` statements report bad input.
_OWN_CODE = (Path(pixelgen.__file__).resolve().parent, Path(__file__).resolve().parent)


def _raised_by_a_check(err: BaseException) -> bool:
    """Whether `err` was raised by a `raise` statement of pixelgen or the pipeline. Both report bad input (a value,
    a file's contents, a corrupt shard) as a ValueError whose message names the file, key or value and says what
    to do; a ValueError raised anywhere else (an unpacking error, int() of a bad string, a library's shape
    check) is a bug, and its traceback is what finds it."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not any(root in path.parents for root in _OWN_CODE):
        return False
    return linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise ")


def main(argv: list[str] | None = None) -> int:
    """User errors (a config key, a path, a file's contents, a busy run folder) are one line and exit 2; anything
    else propagates with its traceback."""
    from pipeline.rundir import StageBusy

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, PermissionError, StageBusy, ValueError) as err:
        if isinstance(err, ValueError) and not isinstance(err, ConfigError) and not _raised_by_a_check(err):
            raise  # a bug, not bad input: Python prints the traceback
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
