"""`pixelgen report RUN_DIR`: one self-contained HTML page of a run (provenance, stages, training curves, sample
grids, FID), to read, mail or attach. Every image is a data URI and the style is inline: the page needs no
JavaScript, no network and no other file. A section whose data is absent (a run in progress, a run without that
stage) says so in one line instead."""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import statistics
from pathlib import Path

from pipeline.config import STAGES

DEFAULT_NAME = "report.html"

# What the engine logs about every step (pixelgen.engine.train._log_interval); every other number in a
# metrics.jsonl record is a loss term of the model family (loss, fm_loss, repa_loss, ...).
ENGINE_KEYS = {"step", "lr", "grad_norm", "img_per_s", "step_time_s", "data_wait", "peak_mem_gib", "skipped_steps",
               "mfu"}
# The training panels after the losses, each where it was logged: (key, title, factor of the values shown).
PANELS = (("lr", "learning rate", 1), ("grad_norm", "gradient norm", 1), ("img_per_s", "throughput (img/s)", 1),
          ("mfu", "MFU (%)", 100), ("peak_mem_gib", "peak memory (GiB)", 1),
          ("data_wait", "waiting for data (% of step time)", 100))
# The metrics of an FID result or an eval point, in the order the tables show them.
METRICS = (("fid", "FID"), ("isc_mean", "IS"), ("isc_std", "IS std"), ("sfid", "sFID"), ("precision", "precision"),
           ("recall", "recall"))

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 20px 0 8px; }
.meta { color: #59636e; margin: 0; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 12px; overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border-bottom: 1px solid #e5e8eb; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.path { word-break: break-all; }
table.kv th { background: none; font-weight: 500; color: #59636e; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.cards > div { flex: 0 1 auto; min-width: 260px; max-width: 100%; }
.summaries > div { flex: 1 1 260px; max-width: 480px; min-width: 0; }
.summaries table { width: 100%; }
img { max-width: 100%; height: auto; }
img.grid { width: 320px; image-rendering: pixelated; border: 1px solid #d0d7de; }
figure { margin: 8px 0; }
figcaption { color: #59636e; font-size: 12.5px; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #0969da; }
.notyet { color: #59636e; font-style: italic; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 6px 10px; }
.state { font-weight: 600; }
.s-done { color: #1a7f37; } .s-running { color: #0969da; } .s-requeued, .s-started { color: #9a6700; }
.s-failed, .s-cancelled { color: #cf222e; } .s-pending, .s-not-run, .s-not-submitted { color: #59636e; }
"""


# ------------------------------------------------------------------------------------------------- command
def add_parser(sub, formatter_class) -> None:
    p = sub.add_parser("report", formatter_class=formatter_class,
                       help="write a run's results as one self-contained HTML page",
                       description="Write one HTML page of a run folder: provenance and config, each stage's "
                                   "state and summary, the training curves and sample grids, the FID results and "
                                   "`pixelgen eval`'s points. Images are embedded and the style inline: the file "
                                   "opens anywhere, offline. Works on a run in progress (what is missing says so).",
                       epilog="examples:\n  pixelgen report runs/demo\n"
                              "  pixelgen report runs/demo --out /tmp/demo.html")
    p.add_argument("run_dir", help="the run folder (run_dir of the config)")
    p.add_argument("--out", metavar="FILE", help=f"where to write the page (default RUN_DIR/{DEFAULT_NAME})")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from pipeline.cli import console

    out = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"report: {out} ({_size(out.stat().st_size)})")
    return 0


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render the page of `run_dir` and write it (atomically) to `out`, default RUN_DIR/report.html."""
    from pixelgen.io import atomic_write_text

    out = out or run_dir / DEFAULT_NAME
    if out.is_dir():
        out = out / DEFAULT_NAME
    return atomic_write_text(out, render(run_dir))


def render(run_dir: Path) -> str:
    """The page's HTML."""
    from pipeline import rundir

    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a pixelgen run folder (no config.yaml): pass the folder a run "
                                f"writes into, the run_dir of its config (e.g. `pixelgen report runs/demo`)")
    cfg = rundir.load_run_config(run_dir)
    body = [_title(run_dir, cfg), _provenance(run_dir), _stages(run_dir, cfg)]
    body += [_training(run_dir, cfg, stage) for stage in cfg.stages if stage.startswith("train")]
    body += [_fid(run_dir, cfg), _eval(run_dir)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(cfg.name)}: pixelgen report</title><style>{STYLE}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


# ------------------------------------------------------------------------------------------------ sections
def _title(run_dir: Path, cfg) -> str:
    import pixelgen

    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    return (f"<h1>{_e(cfg.name)}</h1><p class=\"meta\">run folder <code>{_e(run_dir.resolve())}</code></p>"
            f"<p class=\"meta\">report generated {_e(now)} by pixelgen {_e(pixelgen.__version__)}</p>")


def _provenance(run_dir: Path) -> str:
    run = _json(run_dir / "run.json", "run.json")
    parts = ["<h2>Config and provenance</h2>"]
    if run is None:
        parts.append(_not_yet("no run.json in the run folder"))
    else:
        keys = ("pixelgen_version", "git_revision", "config_hash", "created")
        rest = {k: v for k, v in run.items() if k not in (*keys, "container", "history")}
        parts.append(_kv({k: run.get(k) for k in keys} | rest, mono=True))
        if run.get("container"):
            parts.append("<h3>Container</h3>" + _kv(run["container"], mono=True))
        if run.get("history"):
            parts.append("<h3>Accepted config changes</h3>" + _history(run["history"]))
    parts.append(_record(run_dir, run or {}))
    config = (run_dir / "config.yaml").read_text()
    parts.append(f"<details><summary>resolved config (config.yaml)</summary><pre>{_e(config)}</pre></details>")
    return "\n".join(parts)


def _history(history: list) -> str:
    """run.json's accepted config changes (pipeline.changes.apply): one row per key, what each change set aside
    on its first row."""
    rows = []
    for entry in history:
        aside = "; ".join(f"{label}: {', '.join(entry[key])}" for key, label in (("rerun", "continued"),
                                                                                ("restarted", "restarted"))
                          if entry.get(key))
        for i, (key, change) in enumerate(sorted((entry.get("changes") or {}).items())):
            old, new = change if isinstance(change, (list, tuple)) and len(change) == 2 else (None, change)
            first = i == 0
            rows.append([entry.get("time", "") if first else "", entry.get("command", "") if first else "",
                         _Html(f"<code>{_e(key)}</code>"), _show(old), _show(new), aside if first else ""])
    return _table(("time", "command", "key", "old", "new", "stages set aside"), rows)


def _record(run_dir: Path, run: dict) -> str:
    """The SLURM submissions of the run record, when the run was submitted."""
    from pipeline.cluster import RECORD, read_record

    record = read_record(run_dir)
    if not record:
        return "<h3>SLURM submissions</h3>" + _not_yet(f"no {RECORD}: the run was not submitted to SLURM")
    rows = []
    for sub in record.get("submissions", []):
        jobs = ", ".join(f"{stage} {job.get('job_id')}" + (f" (array of {job['tasks']})" if job.get("tasks", 1) > 1
                                                           else "")
                         for stage, job in sub.get("jobs", {}).items())
        rev = sub.get("git_revision", "")
        if run.get("git_revision") and rev and rev != run["git_revision"]:
            rev += " (not the run's)"
        rows.append([sub.get("time", ""), sub.get("command", ""), _Html(f"<code>{_e(sub.get('cluster', ''))}</code>"),
                     _Html(f"<code>{_e(rev)}</code>"), _Html(f"<code>{_e(sub.get('config_hash', ''))}</code>"),
                     ((sub.get("container") or {}).get("digest") or "-"), jobs])
    headers = ("time", "command", "cluster profile", "git revision", "config hash", "image digest", "jobs")
    parts = ["<h3>SLURM submissions</h3>", _table(headers, rows)]
    if record.get("cancelled"):
        parts.append(f"<p>cancelled jobs: {_e(', '.join(map(str, record['cancelled'])))}</p>")
    if record.get("submissions"):
        profile = json.dumps(record["submissions"][-1].get("profile"), indent=2, default=str)
        parts.append(f"<details><summary>cluster profile of the newest submission</summary><pre>{_e(profile)}</pre>"
                     "</details>")
    return "\n".join(parts)


def _stages(run_dir: Path, cfg) -> str:
    """What `pixelgen status` shows, one row per stage, with the number of runs of a requeued job; then each
    finished stage's DONE.json."""
    from pipeline import cluster

    rows, summaries = [], []
    for row in cluster.stage_states(run_dir, cfg):
        stage, m = row["stage"], row["marker"]
        state = _Html(f"<span class=\"state s-{row['state'].replace(' ', '-')}\">{_e(row['state'])}</span>")
        rows.append([stage, state, row["job_id"] or "-", row["nodes"] or "-", row["elapsed"] or "-", row["runs"] or "-",
                     row["restarts"] or "-", _checkpoint(run_dir, stage), _result(stage, m) or row["detail"]])
        if m is not None:
            shown = {k: _Num(_metric(v)) if k in dict(METRICS) and _is_num(v) else _inside(run_dir, cfg, v)
                     for k, v in _flat(m).items()}
            summaries.append(f"<div><h3>{_e(stage)}</h3>{_kv(shown, mono=True, skip=('stage',))}</div>")
    parts = ["<h2>Stages</h2>",
             _table(("stage", "state", "job", "nodes", "elapsed", "runs", "requeues", "checkpoint", "result / detail"),
                    rows)]
    if summaries:
        parts.append("<details open><summary>each finished stage's DONE.json</summary><div class=\"cards summaries\">"
                     + "".join(summaries) + "</div></details>")
    return "\n".join(parts)


def _checkpoint(run_dir: Path, stage: str) -> str:
    from pipeline import rundir

    folder = rundir.stage_dir(run_dir, stage) / "checkpoints"
    if not folder.is_dir():
        return "-"
    from pixelgen.engine.checkpoint import CheckpointManager

    latest = CheckpointManager(folder, 1, False).latest_complete()
    return f"step {latest[0]}" if latest else "-"


def _result(stage: str, m: dict | None) -> str:
    if not m:
        return ""
    if stage == "shard":
        return ", ".join(f"{s}: {v.get('count')} images / {v.get('shards')} shards"
                         for s, v in (m.get("splits") or {}).items())
    if stage.startswith("train"):
        return f"{m.get('steps')} steps, final loss {_fmt(m.get('final_loss'))}"
    if stage == "fid":
        return f"{'proxy-FID' if m.get('proxy') else 'FID'} {_metric(m.get('fid'))}"
    return ""


def _training(run_dir: Path, cfg, stage: str) -> str:
    from pipeline import rundir

    folder = rundir.stage_dir(run_dir, stage)
    records = _metrics(folder / "metrics.jsonl")
    parts = [f"<h2>Training: {_e(stage)}</h2>"]
    if not records:
        parts.append(_not_yet(f"no training metrics logged (no {stage}/metrics.jsonl yet)"))
    else:
        parts.append(f"<p>{_e(_train_line(records, int(getattr(cfg, stage).steps)))}</p>")
        parts.append(_figure(_plot_training(records, f"{cfg.name} / {stage}"), f"{stage}: training curves"))
    grids = sorted((folder / "samples").glob("step*.png"))
    if not grids:
        parts.append(_not_yet("no sample grid saved"))
    else:
        shown = [(grids[0], "first"), (grids[-1], "newest")] if len(grids) > 1 else [(grids[-1], "newest")]
        cards = [_figure(path.read_bytes(), f"samples at step {_step_of(path)} ({what})", cls="grid")
                 for path, what in shown]
        parts.append("<div class=\"cards\">" + "".join(f"<div>{c}</div>" for c in cards) + "</div>")
    return "\n".join(parts)


def _train_line(records: list[dict], total: int) -> str:
    last = records[-1]
    text = [f"step {last['step']} of {total}, {len(records)} log lines"]
    if _is_num(last.get("loss")):
        text.append(f"last loss {_fmt(last['loss'])}")
    speeds = _values(records, "img_per_s")
    if speeds:
        text.append(f"median {_fmt(statistics.median(speeds))} img/s")
    mem = _values(records, "peak_mem_gib")
    if mem:
        text.append(f"peak memory {_fmt(max(mem))} GiB")
    text.append(f"skipped steps (non-finite loss or gradient): {int(last.get('skipped_steps', 0) or 0)}")
    return "; ".join(text)


def _fid(run_dir: Path, cfg) -> str:
    from pipeline import rundir

    folder = rundir.stage_dir(run_dir, "fid")
    result = _json(folder / "metrics.json", "FID metrics")
    parts = ["<h2>FID</h2>"]
    if result is None:
        why = "the fid stage has not written fid/metrics.json" if "fid" in cfg.stages else "this run has no fid stage"
        return "\n".join([*parts, _not_yet(why)])
    if result.get("proxy"):
        parts.append("<p class=\"warn\">A proxy FID (random-init Inception features, no weights file): not "
                     "comparable to published numbers.</p>")
    parts.append(_points_table([result], ()))
    proto = result.get("protocol") or {}
    parts.append(_kv({"metric": result.get("metric_name"),
                      "generated / reference images": f"{proto.get('num_gen', '?')} / {proto.get('num_ref', '?')}",
                      "reference": proto.get("reference"), "generator weights": result.get("generator_weights"),
                      "generator step": str(result.get("generator_step")),
                      "sampling precision": result.get("sampling_precision")}))
    parts.append(f"<details><summary>sampler</summary><pre>{_e(json.dumps(result.get('sampler'), indent=2))}</pre>"
                 f"</details><details><summary>protocol</summary>{_kv(_flat(proto), mono=True)}</details>")
    if result.get("sweep"):
        parts.append("<h3>Sampler sweep</h3>" + _points_table(result["sweep"], ("sampler", "weights")))
    grid = _existing(result.get("sample_grid"), folder / "samples.png")
    parts.append(_figure(grid.read_bytes(), "FID samples (one row per class)", cls="grid") if grid
                 else _not_yet("no fid/samples.png"))
    return "\n".join(parts)


def _eval(run_dir: Path) -> str:
    """`pixelgen eval`'s points (eval/results.json): a table sorted by step and FID against the step."""
    from pipeline import evaluate

    results = _json(run_dir / "eval" / "results.json", "eval results")
    parts = ["<h2>Evaluations (pixelgen eval)</h2>"]
    points = (results or {}).get("points") or []
    if not points:
        return "\n".join([*parts, _not_yet("no eval/results.json points: `pixelgen eval` has not run on this "
                                           "run folder")])
    order = {s: i for i, s in enumerate(STAGES)}
    points = sorted(points, key=lambda p: (order.get(p.get("stage"), 99), p.get("step", 0), str(p.get("weights")),
                                           str(p.get("sampler"))))
    parts.append(_points_table(points, ("stage", "step", "weights", "sampler")))
    plot = _existing(results.get("plot"), run_dir / "eval" / "fid_vs_step.png")
    data = plot.read_bytes() if plot else _png(evaluate.fid_vs_step_figure(points))
    parts.append(_figure(data, "FID against the training step"))
    return "\n".join(parts)


def _points_table(points: list[dict], keys: tuple[str, ...]) -> str:
    metrics = [(k, label) for k, label in METRICS if any(p.get(k) is not None for p in points)]
    names = {p.get("metric_name") for p in points if p.get("metric_name")}
    headers = [*keys, *(label if k != "fid" or len(names) != 1 else next(iter(names)).split(" ")[0]
                        for k, label in metrics)]
    rows = []
    for p in points:
        cells = [(p.get(k) or "(config)") if k == "sampler" else p.get(k) for k in keys]
        rows.append(cells + [_Num(_metric(p[k])) if p.get(k) is not None else "-" for k, _ in metrics])
    return _table(headers, rows)


# ---------------------------------------------------------------------------------------------------- plots
def _plot_training(records: list[dict], title: str) -> bytes:
    """One panel for the loss terms (log y) and one per engine metric logged (PANELS), three to a row."""
    from matplotlib.figure import Figure

    losses = sorted({k for r in records for k, v in r.items() if k not in ENGINE_KEYS and _is_num(v)},
                    key=lambda k: (k != "loss", k))
    panels = [p for p in PANELS if any(_is_num(r.get(p[0])) for r in records)]
    cols = 3
    rows = math.ceil((1 + len(panels)) / cols)
    fig = Figure(figsize=(4.1 * cols, 2.9 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for key in losses:
        _line(axes[0], records, key, 1, label=key)
    axes[0].set_title("loss" + (" terms" if len(losses) > 1 else ""))
    if len(losses) > 1:
        axes[0].legend(fontsize=8)
    if all(v > 0 for k in losses for v in _values(records, k)):
        _log_y(axes[0])
    for ax, (key, name, scale) in zip(axes[1:], panels):
        _line(ax, records, key, scale)
        ax.set_title(name)
    for ax in axes[1 + len(panels):]:
        ax.set_visible(False)
    for ax in axes[:1 + len(panels)]:
        _step_axis(ax)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _line(ax, records: list[dict], key: str, scale: float, label: str | None = None) -> None:
    points = [(r["step"], r[key] * scale) for r in records if _is_num(r.get(key))]
    ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None, label=label)


def _step_axis(ax, label: str = "step") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def _log_y(ax) -> None:
    """A log axis labelled in plain numbers: over less than a decade matplotlib would write 1.19x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    if hi / lo < 10:  # minor ticks are all there is: label a few of them
        ax.yaxis.set_minor_locator(LogLocator(subs="auto", numticks=6))
        ax.yaxis.set_minor_formatter(plain)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------- helpers
class _Html(str):
    """Markup built here, from escaped parts: a table cell that is not escaped again."""


class _Num(str):
    """A number already formatted: a right-aligned table cell."""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _values(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if _is_num(r.get(key)) and math.isfinite(r[key])]


def _fmt(v) -> str:
    """A number as the page shows it: ints with thousands separators, floats to 4 significant digits."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0:
            return str(v) if v else "0"
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    return "-" if v is None else str(v)


def _metric(v) -> str:
    """FID, IS, sFID, precision and recall: three decimals, as `pixelgen run` and `status` print them."""
    return f"{v:.3f}" if _is_num(v) else _fmt(v)


def _show(v) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else _fmt(v)


def _is_cell_num(v) -> bool:
    return isinstance(v, _Num) or _is_num(v)


def _cell(v, mono: bool = False, right: bool = False) -> str:
    """A table cell: numbers right-aligned (`right`: whatever it holds), a path broken anywhere rather than
    widening the table."""
    if isinstance(v, _Html):
        return f"<td>{v}</td>"
    if _is_cell_num(v) or right:
        return f"<td class=\"num\">{_e(v if isinstance(v, str) else _fmt(v))}</td>"
    text = _show(v)
    cls = " ".join(c for c, on in (("mono", mono), ("path", "/" in text and " " not in text)) if on)
    return f"<td class=\"{cls}\">{_e(text)}</td>" if cls else f"<td>{_e(text)}</td>"


def _table(headers, rows) -> str:
    """A column of numbers (and "-" where there is none) is right-aligned, its header with it."""
    right = [all(_is_cell_num(r[i]) or r[i] == "-" for r in rows) and any(_is_cell_num(r[i]) for r in rows)
             for i in range(len(headers))]
    head = "".join(f"<th class=\"num\">{_e(h)}</th>" if r else f"<th>{_e(h)}</th>" for h, r in zip(headers, right))
    body = "".join("<tr>" + "".join(_cell(v, right=r) for v, r in zip(row, right)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(d: dict, mono: bool = False, skip: tuple[str, ...] = ()) -> str:
    """A two-column table of key and value."""
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        rows.append(f"<tr><th>{_e(k)}</th>{_cell(v, mono)}</tr>")
    return f"<table class=\"kv\"><tbody>{''.join(rows)}</tbody></table>"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _figure(png: bytes, caption: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    attr = f" class=\"{cls}\"" if cls else ""
    return (f"<figure><img{attr} src=\"data:image/png;base64,{data}\" alt=\"{_e(caption)}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _not_yet(what: str) -> str:
    return f"<p class=\"notyet\">not yet: {_e(what)}</p>"


def _json(path: Path, what: str):
    from pixelgen.io import read_json

    return read_json(path, what) if path.is_file() else None


def _metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (the stage is writing it) is left out."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and _is_num(rec.get("step")):
            records.append(rec)
    return records


def _existing(recorded, fallback: Path) -> Path | None:
    """A file a result names (an absolute path: stale once the run folder moved), else where it is by default."""
    for path in (Path(recorded) if recorded else None, fallback):
        if path is not None and path.is_file():
            return path
    return None


def _inside(run_dir: Path, cfg, value):
    """A path in the run folder relative to it (the title names the folder); anything else as it is."""
    if isinstance(value, str):
        for root in {str(run_dir.resolve()), str(cfg.run_dir)}:
            if root and value.startswith(root.rstrip("/") + "/"):
                return value[len(root.rstrip("/")) + 1:]
    return value


def _step_of(path: Path) -> str:
    digits = path.stem.removeprefix("step")
    return str(int(digits)) if digits.isdigit() else path.stem


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
