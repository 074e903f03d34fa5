"""`pixelgen report`: the page of the tiny chain's run folder, loaded in a real headless browser (Debian's
chromium, installed here with apt-get when missing): every image decodes, the provenance and results are on it,
a screenshot is not blank; a run folder in progress renders with what it has; a folder that is no run fails.

Where chromium cannot be had (not root, no apt-get, the install failed) the browser tests skip with the reason;
with CI or PIXELGEN_REQUIRE_BROWSER set, that skip is a failure."""

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline import report
from tests.conftest import pixelgen

SCREENSHOT = Path("/tmp/report_screenshot.png")  # one screenshot of the chain's page, kept to look at

# Appended by the test only (the product page has no script): once every image has loaded or failed, the count
# of <img> elements and of those the browser decoded, written into the DOM that --dump-dom prints.
CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({images: images.length, decoded: decoded});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def browser() -> str:
    """Debian's chromium on PATH, installed with apt-get when missing and this runs as root."""
    exe, reason = shutil.which("chromium"), None
    if exe is None:
        if os.geteuid() != 0:
            reason = "chromium is not on PATH, and installing it (apt-get install chromium) needs root"
        elif shutil.which("apt-get") is None:
            reason = "chromium is not on PATH and there is no apt-get to install it"
        else:
            t0 = time.time()
            # One apt at a time: the other test worker may be installing Slurm or podman (slurm/local/up).
            proc = subprocess.run(["flock", "/run/lock/pixelgen-apt.lock", "bash", "-c",
                                   "apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                                   "apt-get install -y -qq chromium >/dev/null"],
                                  capture_output=True, text=True, timeout=900)
            print(f"apt-get install chromium: {time.time() - t0:.0f} s (exit {proc.returncode})")
            exe = shutil.which("chromium")
            if exe is None:
                reason = f"apt-get install chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    if reason:
        if os.environ.get("CI") or os.environ.get("PIXELGEN_REQUIRE_BROWSER"):
            pytest.fail(f"the browser tests are required, but: {reason}")
        pytest.skip(reason)
    return exe


def _chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # As root chromium refuses to start without --no-sandbox; a fresh profile keeps runs independent.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _rendered(browser: str, page: Path, tmp_path: Path) -> tuple[dict, str]:
    """({images, decoded}, the DOM) of `page` as chromium rendered it, from a copy with CHECK added."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = _chromium(browser, tmp_path, "--dump-dom", "--virtual-time-budget=10000", probe.as_uri()).stdout
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; the DOM ends with:\n{dom[-2000:]}"
    return json.loads(html.unescape(found.group(1))), dom


def _report(run_dir: Path, *args: str) -> Path:
    proc = pixelgen("report", str(run_dir), *args)
    out = Path(args[args.index("--out") + 1]) if "--out" in args else run_dir / "report.html"
    assert f"report: {out} (" in proc.stdout and "KiB)" in proc.stdout, proc.stdout
    return out


def _self_contained(text: str) -> None:
    assert "<script" not in text.lower(), "the page has a script"
    linked = re.findall(r'(?:src|href)\s*=\s*"(?!data:)([^"]*)"', text)
    assert not linked, f"the page links to other files or URLs: {linked[:5]}"


def test_chain_report_in_a_browser(chain, browser, tmp_path):
    run_dir, _ = chain
    page = _report(run_dir)
    text = page.read_text()
    _self_contained(text)

    grids = {s: sorted((run_dir / s / "samples").glob("step*.png")) for s in ("train_trunk", "train_decoder")}
    assert all(grids.values()), f"the chain saved no sample grid: {grids}"
    # One figure of curves and the first and newest sample grids per training stage; the FID stage's grid.
    expected = sum(1 + min(2, len(g)) for g in grids.values()) + 1
    check, dom = _rendered(browser, page, tmp_path)
    assert check == {"images": expected, "decoded": expected}, check

    run = json.loads((run_dir / "run.json").read_text())
    fid = json.loads((run_dir / "fid" / "metrics.json").read_text())
    for text_on_page in (run["git_revision"], run["config_hash"], f"{fid['fid']:.3f}", "proxy-FID",
                         "shard", "train_trunk", "train_decoder", "fid"):
        assert text_on_page in dom, f"{text_on_page!r} is not on the page"
    assert "not yet: no run_record.json" in dom  # a local run: no SLURM submissions

    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,3000", page.as_uri())
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 3000)
        extrema = im.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), "the screenshot is one colour"
    shutil.copyfile(shot, SCREENSHOT)


def _partial_run(chain_dir: Path, run_dir: Path) -> Path:
    """A run folder whose shard stage is done and whose trunk stage has logged two lines (one more half-written)."""
    run_dir.mkdir()
    for name in ("config.yaml", "run.json"):
        shutil.copyfile(chain_dir / name, run_dir / name)
    (run_dir / "shard").mkdir()
    shutil.copyfile(chain_dir / "shard" / "DONE.json", run_dir / "shard" / "DONE.json")
    (run_dir / "train_trunk").mkdir()
    lines = [{"step": s, "loss": 1.0 / s, "fm_loss": 0.9 / s, "lr": 1e-3 * s / 4, "grad_norm": 0.5, "img_per_s": 100.0,
              "step_time_s": 0.1, "data_wait": 0.05, "peak_mem_gib": 0.8, "skipped_steps": 1, "mfu": 0.31}
             for s in (2, 4)]
    (run_dir / "train_trunk" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines)
                                                           + '{"step": 6, "lo')
    return run_dir


def test_partial_run(chain, browser, tmp_path):
    run_dir = _partial_run(chain[0], tmp_path / "partial")
    page = _report(run_dir, "--out", str(tmp_path / "partial.html"))
    check, dom = _rendered(browser, page, tmp_path)
    assert check == {"images": 1, "decoded": 1}, check  # the trunk's curves; no grid, no FID yet
    assert "skipped steps (non-finite loss or gradient): 1" in dom and "step 4 of 6, 2 log lines" in dom
    for what in ("no sample grid saved", "no training metrics logged (no train_decoder/metrics.jsonl yet)",
                 "the fid stage has not written fid/metrics.json", "no eval/results.json points"):
        assert f"not yet: {what}" in dom, what
    assert dom.count('class="state s-done"') == 1 and dom.count('class="state s-started"') == 1


def test_eval_points(chain, browser, tmp_path):
    """eval/results.json (2 steps x 2 weights, given in no order): a table sorted by step, a plot drawn here, or
    the plot file `pixelgen eval` wrote when there is one; strings from the file are escaped."""
    run_dir = _partial_run(chain[0], tmp_path / "run")
    (run_dir / "eval").mkdir()
    points = [{"stage": "train_trunk", "step": step, "weights": weights, "sampler": sampler,
               "metric_name": "proxy-FID", "fid": fid, "isc_mean": 1.5, "sample_grid": "/gone/grid.png"}
              for step, weights, sampler, fid in ((200, "model", "cfg_scale=1.5<script>", 31.25),
                                                  (100, "ema", "", 50.5), (200, "ema", "", 30.125),
                                                  (100, "model", "cfg_scale=1.5<script>", 52.75))]
    results = {"points": points, "plot": str(run_dir / "eval" / "fid_vs_step.png")}
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    page = report.write_report(run_dir)  # in this process: the command itself is run on the other folders
    text = page.read_text()
    _self_contained(text)
    assert "cfg_scale=1.5&lt;script&gt;" in text
    check, dom = _rendered(browser, page, tmp_path)
    assert check == {"images": 2, "decoded": 2}, check  # the trunk's curves and the FID-vs-step plot drawn here
    section = dom[dom.index("Evaluations (pixelgen eval)"):]
    assert re.findall(r'<td class="num">(\d+\.\d{3})</td>', section)[::2] == ["50.500", "52.750", "30.125",
                                                                               "31.250"]
    assert "<th class=\"num\">proxy-FID</th>" in section and "(config)" in section

    buf = io.BytesIO()  # the plot file `pixelgen eval` wrote is shown as it is
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    (run_dir / "eval" / "fid_vs_step.png").write_bytes(buf.getvalue())
    assert base64.b64encode(buf.getvalue()).decode() in report.render(run_dir)


def test_slurm_provenance(chain, tmp_path, monkeypatch):
    """A submitted run: the run record's submission, the container and config history from run.json, and a
    requeued stage's number of runs (the job script's ledger); squeue knows none of the jobs any more."""
    from pipeline.cluster import status

    monkeypatch.setattr(status, "queue", lambda job_ids: {})
    run_dir = _partial_run(chain[0], tmp_path / "run")
    container = {"runtime": "enroot", "image": "/images/pixelgen.sqsh", "digest": "sha256:" + "ab" * 32,
                 "revision": "f00dfeed", "lock": "requirements.lock"}
    run = json.loads((run_dir / "run.json").read_text())
    history = [{"time": "2026-01-02T03:04:05", "command": "resume", "changes": {"train_trunk.steps": [6, 12]},
                "rerun": ["train_trunk"], "restarted": ["train_decoder"]}]
    (run_dir / "run.json").write_text(json.dumps({**run, "container": container, "history": history}))
    jobs = {"shard": {"job_id": "101", "tasks": 2}, "train_trunk": {"job_id": "102", "tasks": 1}}
    record = {"submissions": [{"time": "2026-01-02T03:00:00", "command": "run", "cluster": "slurm/local.yaml",
                               "profile": {"partition": "gpu<1>"}, "config_hash": run["config_hash"],
                               "git_revision": "c0ffee", "container": container, "jobs": jobs}],
              "cancelled": []}
    (run_dir / "run_record.json").write_text(json.dumps(record))
    (run_dir / "submitit").mkdir()
    (run_dir / "submitit" / "attempts-102.jsonl").write_text(
        "".join(json.dumps({"task": 0, "restart": r, "seconds": 60, "rc": 75 if r == 0 else 1}) + "\n"
                for r in (0, 1)))
    text = report.render(run_dir)
    for shown in (container["digest"], "f00dfeed", "c0ffee (not the run&#x27;s)", "shard 101 (array of 2)",
                  "<code>train_trunk.steps</code>", "continued: train_trunk; restarted: train_decoder",
                  "gpu&lt;1&gt;"):
        assert shown in text, shown
    trunk = re.search(r"<tr><td>train_trunk</td>.*?</tr>", text).group(0)
    assert 's-failed">failed<' in trunk and '<td>102</td>' in trunk, trunk
    assert '<td class="num">2</td>' in trunk and "total 2:00" in trunk, trunk  # two runs of a minute each


def test_not_a_run_folder(tmp_path, capsys):
    from pipeline import cli

    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().out == (f"error: '{tmp_path}' is not a pixelgen run folder (no config.yaml): pass "
                                       f"the folder a run writes into, the run_dir of its config (e.g. `pixelgen "
                                       f"report runs/demo`)\n")
    assert not (tmp_path / "report.html").exists()
