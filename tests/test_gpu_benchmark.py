"""benchmarks/gpu.py: its smoke mode runs every case through pixelgen's code on the CPU, with the packages the GPU
machine lacks made unimportable, and its helpers do what they say.

The smoke run is the real command, `.venv/bin/python benchmarks/gpu.py --smoke --out TMP/gpu.md`, without a GPU
(CUDA_VISIBLE_DEVICES=""), on 2 threads, with a sitecustomize that makes webdataset, scipy, submitit, wandb and
torch_fidelity unimportable, as on the GPU machine (where torch, deepspeed, omegaconf and pixelgen's other own
dependencies are installed, and the working tree travels). It takes ~25 s with a warm inductor cache, ~50 s
without (the one compiled case).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import warnings

import pytest
import torch

from tests.conftest import ROOT, load_benchmark

BLOCKER = '''
"""Makes the packages the GPU machine lacks unimportable, as they are there (tests/test_gpu_benchmark.py)."""
import importlib.abc
import importlib.util
import sys

BLOCKED = ("webdataset", "scipy", "submitit", "wandb", "torch_fidelity")


def _blocked(name):
    return name.split(".")[0] in BLOCKED


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: not on the GPU machine)", name=name)
        return None


_find_spec = importlib.util.find_spec


def find_spec(name, package=None):  # what a missing package gives
    return None if _blocked(name) else _find_spec(name, package)


importlib.util.find_spec = find_spec
sys.meta_path.insert(0, _Blocker())
'''


@pytest.fixture(scope="module")
def gpu():
    return load_benchmark("gpu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(tmp / "site")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp / "gpu.md"
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/gpu.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc, out.read_text()


def section(text: str, number: int) -> str:
    match = re.search(rf"^### {number}\. .*?(?=^### |\Z)", text, re.S | re.M)
    assert match, f"no section {number}:\n{text}"
    return match.group()


def table(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `text`, as {header: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table in:\n{text}"
    split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]  # noqa: E731
    headers = split(lines[0])
    return [dict(zip(headers, split(line))) for line in lines[2:]]


def number(cell: str) -> float:
    match = re.match(r"-?\d+(\.\d+)?(e-?\d+)?", cell)
    assert match, f"not a number: {cell!r}"
    return float(match.group())


def column(rows: list[dict], start: str) -> str:
    """The one header that starts with `start`."""
    names = [h for h in rows[0] if h.startswith(start)]
    assert len(names) == 1, f"header {start!r} in {list(rows[0])}"
    return names[0]


def test_smoke_run_reports_every_case(smoke):
    proc, md = smoke
    assert md.strip() == proc.stdout.strip(), "--out must hold what stdout shows, and stdout only the markdown"
    head = " ".join(md.split("### ", 1)[0].split())  # the paragraphs are wrapped
    assert "Device: **CPU**" in head and f"torch {torch.__version__}" in head and "DeepSpeed" in head
    assert "mean nothing" in head  # the smoke output says its numbers are not the GPU's
    assert "failed" not in md and "OOM" not in md, md

    trunk = table(section(md, 1))
    assert {(r["act. ckpt"], r["compile"]) for r in trunk} == {("off", "off"), ("on", "off"), ("off", "on")}
    for r in trunk:
        assert number(r["images/s"]) > 0 and number(r["warm-up s"]) > 0
        assert r[column(trunk, "peak GiB")] == "n/a (CPU)" and number(r[column(trunk, "estimate GiB")]) > 0
        assert number(r[column(trunk, "GFLOPs/image")]) > 0 and r["MFU"] == "n/a"
    # Checkpointing recomputes the forward: more FLOPs per training step.
    flops = {r["act. ckpt"]: number(r[column(trunk, "GFLOPs/image")]) for r in trunk if r["compile"] == "off"}
    assert flops["on"] > flops["off"]

    decoder = table(section(md, 2))
    assert {r["model"] for r in decoder} == {"tiny, attention pixel", "tiny, attention compact"}
    assert all(r["stage"] == "train_decoder" and number(r["images/s"]) > 0 for r in decoder)
    assert "fits at batch 4 without activation checkpointing" in " ".join(section(md, 2).split())

    sync = table(section(md, 3))
    norm = [r for r in sync if "is_invalid_grad_norm" in r["call site"]]
    assert norm and number(norm[0]["host reads / step"]) == 1, sync  # DeepSpeed's one read per step
    assert sync[-1]["call site"] == "**all sites**"

    sdpa = table(section(md, 4))
    odd = [r for r in sdpa if int(r["head dim"]) % 8]
    assert odd, "the zoo's pixel attention of width 16 with 4 heads has heads of 4"
    for r in odd:
        assert r["predicted (bf16)"] == "math"
        assert int(r["pixelgen pads to"]) == math.ceil(int(r["head dim"]) / 8) * 8
        assert r["predicted padded"] == "flash" and r["CUDA backends accepting"] == "n/a (CPU)"
    assert {r["predicted (bf16)"] for r in sdpa} >= {"flash", "efficient", "math"}
    assert any(r["model"] == "size XL" and r["head dim"] == "72" for r in sdpa)

    sampling = table(section(md, 5))
    assert {r["precision"] for r in sampling} == {"bf16", "fp32"}
    for r in sampling:
        assert number(r["images/s"]) > 0 and number(r[column(sampling, "hours for")]) > 0 and r["steps"] == "50"

    ar = table(section(md, 6))
    assert {r["KV cache"] for r in ar} == {"cached", "uncached"}
    assert all(number(r["s / image"]) > 0 for r in ar)
    assert "### 7." not in md  # --peer-jit not given


def test_block_replacement_keeps_the_rest(gpu):
    from report import replace_section  # benchmarks/report.py, on sys.path once gpu.py is loaded

    doc = "# Benchmarks\n\nintro\n\n## GPU\n\n<!-- gpu:start -->\nold numbers\n<!-- gpu:end -->\n\nnotes after\n"
    new = replace_section(doc, "new numbers\n", "## GPU", "gpu")
    assert new == doc.replace("old numbers", "new numbers")
    assert replace_section(new, "new numbers", "## GPU", "gpu") == new  # idempotent
    # Another section's markers are left alone.
    other = "<!-- ar_sampling:start -->\nx\n<!-- ar_sampling:end -->\n"
    assert replace_section(other + doc, "y", "## GPU", "gpu").startswith(other)
    # No markers (or only a start marker): the heading and a marked block are appended.
    appended = replace_section("# Benchmarks\n\ntext\n", "body", gpu.HEADING, "gpu")
    assert appended == f"# Benchmarks\n\ntext\n\n{gpu.HEADING}\n\n<!-- gpu:start -->\nbody\n<!-- gpu:end -->\n"
    assert replace_section("a <!-- gpu:start --> b", "c", "## H", "gpu").endswith("<!-- gpu:end -->\n")


def test_write_docs_is_refused_with_smoke(gpu, capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--smoke", "--write-docs"])
    assert "--write-docs" in capsys.readouterr().err


def test_peer_jit_is_reported_as_not_implemented(gpu):
    assert gpu.parse_args(["--smoke", "--peer-jit", "x.so"]).peer_jit == "x.so"
    text = gpu.peer_jit_section("x.so")
    assert "not implemented yet" in text and "x.so" in text and not re.search(r"\d+\.\d", text)
    assert gpu.peer_jit_section(None) == ""


def test_configs_go_through_the_pipelines_loader_and_checks(gpu):
    from pipeline.config import ConfigError

    xl = gpu.load_config(gpu.PIXELDIT, ["model.trunk.size=XL", "train_trunk.batch_size=32"])
    assert (xl.model.trunk.size, xl.train_trunk.batch_size, list(xl.stages)) == ("XL", 32, ["train_trunk",
                                                                                      "train_decoder"])
    # The dual AR's teacher weights are not on the GPU machine: random initialisation, allowed explicitly.
    ar = gpu.load_config(gpu.DUAL_AR)
    assert ar.model.trunk.ar.teacher.weights is None and ar.model.trunk.ar.teacher.allow_random_init
    with pytest.raises(ConfigError, match="model.decoder.heads"):
        gpu.load_config(gpu.PIXELDIT, ["data.resolution=16", "model.trunk.patch_size=4", *gpu.spelled_size("tiny"),
                                       "model.decoder.heads=3"])
    with pytest.raises(ConfigError, match="no_such_key"):
        gpu.load_config(gpu.PIXELDIT, ["model.no_such_key=1"])


def fake_sync():
    warnings.warn("called a synchronizing CUDA operation")


def test_sync_warnings_and_host_reads_are_counted_per_site(gpu):
    with gpu.SyncWarnings(torch.device("cpu")) as seen:
        fake_sync()
        fake_sync()
        warnings.warn("something else", FutureWarning)
    (site, count), = seen.sites.items()
    assert count == 2 and site.startswith("test_gpu_benchmark.py:fake_sync < test_gpu_benchmark.py:test_"), site
    assert seen.other == 1

    x = torch.ones(3)
    with gpu.HostReads() as reads:
        x.sum().item()
        bool(x.any())
        x.sum()  # no read
    assert sum(reads.sites.values()) == 2
    assert all(s.startswith("test_gpu_benchmark.py:test_sync") for s in reads.sites), reads.sites


def test_sdpa_probe_and_prediction(gpu):
    shape = gpu.AttentionShape("toy", ["attn"], heads=2, head_dim=4, length=16, sequences=1)
    gpu.probe_sdpa(shape, torch.device("cpu"), dtype=torch.float32)
    assert shape.accepts["MATH"] == "yes" and shape.accepts["CUDNN_ATTENTION"] == "no"  # a CPU has no cuDNN
    assert shape.default.startswith(("flash (CPU)", "math")) and shape.padded == shape.default
    assert gpu.backend_of(["aten::_scaled_dot_product_efficient_attention", "aten::empty"]) == "efficient"
    assert gpu.backend_of(["aten::mm"]) == "?"
    # The shapes come from a meta-device forward: XL's trunk at 256 px, and pixel attention's sequences per patch.
    xl = gpu.attention_shapes("XL", gpu.zoo_models()[4][1])
    assert {(s.heads, s.head_dim, s.length, s.sequences) for s in xl} == {(16, 72, 256, 1)}
    assert sum(len(s.modules) for s in xl) == 26 + 4  # trunk blocks + decoder blocks
