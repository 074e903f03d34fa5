"""The training engine on a real DeepSpeed engine (gloo), with one and two ranks as real processes.

The model is a small stand-in (tests/engine_worker.py) so that many full runs fit in the test budget; the
stages' own tests run the real generators through the same engine.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pixelgen.engine.config import TrainConfig
from pixelgen.engine.ema import EMA
from pixelgen.engine.train import lr_at
from tests.conftest import ROOT

BASE = {"steps": 10, "batch_size": 8, "grad_accum": 2, "lr": 0.01, "zero_stage": 2, "ckpt_every": 3,
        "log_every": 1, "keep_ckpts": 2, "ema_decays": [0.9, 0.5], "warmup_steps": 3, "lr_schedule": "cosine"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`world` ranks of tests/engine_worker.py started together, as torchrun would."""

    def __init__(self, out: Path, spec: dict, world: int = 1, env: dict | None = None,
                 worker: str = "tests.engine_worker"):
        port = str(_free_port())
        self.procs = []
        for rank in range(world):
            e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PIXELGEN_FAULT"))}
            e.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, OMP_NUM_THREADS="1", **(env or {}))
            cmd = [sys.executable, "-m", worker, str(out), json.dumps(spec)]
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))

    def wait(self, timeout: float = 300) -> list[tuple[int, str]]:
        """Return codes and outputs. When one rank dies, the others are killed after a grace period, as a
        launcher (srun, torchrun) would do."""
        deadline = time.time() + timeout
        while any(p.poll() is None for p in self.procs):
            dead = [p for p in self.procs if p.poll() not in (None, 0)]
            if dead or time.time() > deadline:
                grace = time.time() + 20
                while any(p.poll() is None for p in self.procs) and time.time() < grace:
                    time.sleep(0.1)
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
        return [(p.wait(), p.stdout.read()) for p in self.procs]


def _files(out: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} if out.exists() else {}


def _port_taken(results: list[tuple[int, str]]) -> bool:
    """Rank 0 could not listen on MASTER_PORT: `_free_port` only finds a port that is free now, and the ranks
    bind it seconds later (after importing torch and DeepSpeed), so another process on the machine (an
    outgoing connection, another test's job) can take it in between."""
    return any(code != 0 and "EADDRINUSE" in out for code, out in results)


def run(out: Path, world: int = 1, fault: str | None = None, **overrides) -> list[tuple[int, str]]:
    env = {"PIXELGEN_FAULT": fault} if fault else None
    for _ in range(3):
        before = _files(out)
        results = Job(out, {**BASE, **overrides}, world, env).wait()
        # The rendezvous is the first thing a rank does: a job that lost its port wrote nothing, so it is
        # started again on another port; anything else is the result.
        if not (_port_taken(results) and _files(out) == before):
            break
    return results


def ok(results):
    for code, out in results:
        assert code == 0, out[-4000:]
    return results


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def exported(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((out / "export").glob("*.safetensors"))}


def assert_same_weights(a: dict, b: dict, exact: bool = True, rtol: float = 0.0, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for k in a[name]:
            if exact:
                assert torch.equal(a[name][k], b[name][k]), f"{name}:{k} differs"
            else:
                torch.testing.assert_close(a[name][k], b[name][k], rtol=rtol, atol=atol, msg=f"{name}:{k}")


# ------------------------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per rank count."""
    refs = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"ref{world}")
        ok(run(out, world))
        refs[world] = out
    return refs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("fault", ["step@5", "checkpoint@6", "export"])
def test_killed_anywhere_resumes_bit_identical(reference, tmp_path, world, fault):
    _killed_and_resumed(reference[world], tmp_path, world, fault)


def _rank_files(tag_dir: Path, world: int) -> list[dict]:
    return [torch.load(tag_dir / f"rank{r:05d}.pt", weights_only=True)["ema"] for r in range(world)]


def test_killed_zero3_run_resumes_bit_identical_with_sharded_emas(tmp_path):
    ref = tmp_path / "ref"
    ok(run(ref, 2, zero_stage=3))
    # Each rank keeps its own shard of every EMA (its ZeRO-3 partition, padded), in its own file.
    shards = _rank_files(ref / "checkpoints" / "step00000010", 2)
    assert all(s["sharded"] and s["world_size"] == 2 for s in shards)
    full = load_file(ref / "export" / "ema.safetensors")
    for name, shard in shards[0]["shadows"][0].items():
        assert shard.numel() == -(-full[name].numel() // 2)  # half of the parameter, rounded up
    _killed_and_resumed(ref, tmp_path / "run", 2, "checkpoint@6", zero_stage=3)


def test_zero2_emas_are_fragments_of_the_masters_and_old_whole_emas_still_resume(reference, tmp_path):
    """Under ZeRO-2 each rank averages only its fragment of the flat fp32 partition; the fragments cover each
    parameter exactly once. A checkpoint from before (one whole EMA in rank 0's client state, no rank files)
    resumes bit-identically: each rank cuts its fragments from the whole."""
    from pixelgen.engine.ema import whole_state

    ref = reference[2]  # BASE: ZeRO-2, two ranks
    tag = ref / "checkpoints" / "step00000010"
    shards = _rank_files(tag, 2)
    whole = whole_state(shards)
    export = {1: load_file(ref / "export" / "ema-0.5.safetensors"), 0: load_file(ref / "export" / "ema.safetensors")}
    for name, (_, _, shape) in shards[0]["layout"].items():
        sizes = [s["layout"][name][1] for s in shards]
        assert sum(sizes) == math.prod(shape), name  # disjoint fragments that cover the parameter
        for i in (0, 1):
            assert torch.equal(whole["shadows"][i][name], export[i][name]), name
    assert any(0 < s["layout"][n][1] < math.prod(s["layout"][n][2]) for s in shards for n in s["layout"])

    first = run(tmp_path, 2, fault="step@5")
    assert any(code == -signal.SIGKILL for code, _ in first)
    old = tmp_path / "checkpoints" / "step00000003"
    states = old / "mp_rank_00_model_states.pt"
    client = torch.load(states, weights_only=False)
    client["ema"] = whole_state(_rank_files(old, 2))  # the layout an older pixelgen wrote
    torch.save(client, states)
    for r in (0, 1):
        (old / f"rank{r:05d}.pt").unlink()
    (tmp_path / "wandb_id.txt").unlink()
    second = ok(run(tmp_path, 2))
    assert "from checkpoint step 3" in second[0][1]
    assert_same_weights(exported(tmp_path), exported(ref))


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_emas_average_the_fp32_masters_not_the_bf16_weights(tmp_path, zero):
    """Two ranks in bf16: after every step the EMA of decay 0 equals DeepSpeed's fp32 masters exactly (read
    through DeepSpeed's own API, tests/masters_worker.py), which the bf16 module weights do not; the EMA of
    decay 0.9 follows the masters' trajectory and would not follow the bf16 weights'."""
    (code0, out0), (code1, out1) = Job(tmp_path, {"zero_stage": zero, "precision": "bf16",
                                                  "ema_decays": [0.0, 0.9]}, 2, worker="tests.masters_worker").wait()
    assert code0 == 0 and code1 == 0, (out0 + out1)[-4000:]
    record = torch.load(tmp_path / "trajectory.pt", weights_only=True)
    masters, module, (ema0, ema9) = record["masters"], record["module"], record["emas"]
    assert len(masters) == 5
    for step, (m, w, e) in enumerate(zip(masters, module, ema0)):
        assert all(w[k].dtype == torch.bfloat16 for k in w)
        assert all(e[k].dtype == torch.float32 and torch.equal(e[k], m[k]) for k in m), step
        if step:  # the first step moved the masters off bf16's grid
            assert any(not torch.equal(m[k], w[k].float()) for k in m), step

    def ema_of(trajectory):
        avg = {k: v.double() for k, v in trajectory[0].items()}
        for values in trajectory[1:]:
            avg = {k: avg[k] + 0.1 * (values[k].double() - avg[k]) for k in avg}
        return avg

    from_masters, from_module = ema_of(masters), ema_of([{k: v.float() for k, v in w.items()} for w in module])
    for k in from_masters:
        torch.testing.assert_close(ema9[-1][k].double(), from_masters[k], rtol=0, atol=1e-6, msg=k)
    assert max((from_module[k] - from_masters[k]).abs().max().item() for k in from_masters) > 1e-5


def _killed_and_resumed(ref: Path, tmp_path: Path, world: int, fault: str, **overrides):
    first = run(tmp_path, world, fault=fault, **overrides)
    assert any(code == -signal.SIGKILL for code, _ in first), "the fault point was not reached"
    assert not (tmp_path / "export" / "ema-0.5.safetensors").exists()
    if fault == "checkpoint@6":
        # Killed mid-write: the tag's files are there but it never became complete.
        assert (tmp_path / "checkpoints" / "step00000006").is_dir()
        assert not (tmp_path / "checkpoints" / "step00000006" / "COMPLETE.json").exists()
    run_id = (tmp_path / "wandb_id.txt").read_text()
    (tmp_path / "wandb_id.txt").unlink()  # the checkpoint carries the logging run id too

    second = ok(run(tmp_path, world, **overrides))
    resumed_from = {"step@5": 3, "checkpoint@6": 3, "export": 10}[fault]
    assert f"from checkpoint step {resumed_from}" in second[0][1]
    assert_same_weights(exported(tmp_path), exported(ref))
    assert stable(metrics(tmp_path)) == stable(metrics(ref))  # the loss history, bit for bit
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, 11))
    assert (tmp_path / "wandb_id.txt").read_text() == run_id
    zero3 = overrides.get("zero_stage") == 3  # ZeRO-3 writes one model-states file per rank
    states = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt"
    client = torch.load(tmp_path / "checkpoints" / "step00000010" / states, weights_only=False)
    assert client["wandb_id"] == run_id and client["step"] == 10
    assert client["data"] == {"start_batch": 20, "micro_batch": 4 // world, "world_size": world,
                              "segments": [[0, world, 4 // world]]}  # one rank count throughout


TIMING = ("img_per_s", "step_time_s", "data_wait", "peak_mem_gib")


def stable(records: list[dict]) -> list[dict]:
    """What a rerun must reproduce exactly: everything but the clock and the memory meter."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_learning_rate_warms_up_then_follows_the_cosine(reference):
    cfg = TrainConfig(steps=10, warmup_steps=3, lr_schedule="cosine")
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_at(3, cfg) == 1.0 and lr_at(10, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(3 + 7 / 2, cfg) == pytest.approx(0.5)
    assert lr_at(5, TrainConfig(steps=10, lr_schedule="constant")) == 1.0
    # What the optimizer applied at each step, as logged: the schedule at the step's start.
    logged = [m["lr"] for m in metrics(reference[1])]
    assert logged == pytest.approx([0.01 * lr_at(s - 1, TrainConfig(**{**BASE, "ema_decays": [0.9]}))
                                    for s in range(1, 11)])


def test_ema_is_the_closed_form_average_of_the_applied_steps():
    """shadow <- decay * shadow + (1 - decay) * weights after each applied step; a skipped one changes nothing."""
    decays = [0.9, 0.0, 0.99, 0.5]
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    b = torch.nn.Parameter(torch.tensor([[0.5, 4.0]], dtype=torch.bfloat16))  # averaged in fp32 all the same
    ema = EMA([("w", w), ("b", b)], decays)
    start = {"w": w.detach().double().clone(), "b": b.detach().double().clone()}
    values = [  # the weights after steps 1-4 (exact in bf16); step 3 is skipped, step 4 applied by tensor
        ({"w": [2.0, 0.0, -1.0], "b": [[1.0, -4.0]]}, None),
        ({"w": [-3.0, 5.0, 0.5], "b": [[2.0, 8.0]]}, None),
        ({"w": [100.0, -100.0, 50.0], "b": [[64.0, -64.0]]}, torch.tensor(0.0)),
        ({"w": [0.25, 1.0, 6.0], "b": [[-0.5, 0.0]]}, torch.tensor(1.0)),
    ]
    for new, applied in values:
        with torch.no_grad():
            w.copy_(torch.tensor(new["w"]))
            b.copy_(torch.tensor(new["b"]))
        ema.update(applied)
    assert torch.equal(w.detach(), torch.tensor(values[-1][0]["w"]))  # the live weights are left alone
    v1, v2, _, v4 = ({k: torch.tensor(x[k], dtype=torch.float64) for k in x} for x, _ in values)
    for i, d in enumerate(decays):
        for name in ("w", "b"):
            expected = d**3 * start[name] + (1 - d) * (d**2 * v1[name] + d * v2[name] + v4[name])
            shadow = ema.shadows[i][name]
            assert shadow.dtype == torch.float32, (d, name)
            torch.testing.assert_close(shadow.double(), expected, rtol=1e-6, atol=1e-6, msg=f"decay {d}, {name}")
            assert torch.equal(ema.full(i)[name], shadow) and torch.equal(ema.state_dict()["shadows"][i][name], shadow)
    # Decay 0 is the last applied weights; decay 0.9 by hand: 0.729 * 1 + 0.1 * (0.81 * 2 + 0.9 * -3 + 0.25).
    assert ema.shadows[1]["w"].tolist() == values[-1][0]["w"]
    assert ema.shadows[0]["w"][0].item() == pytest.approx(0.729 + 0.1 * (1.62 - 2.7 + 0.25), abs=1e-6)


def test_ema_update_reads_nothing_on_the_host():
    """The per-step update with a device-side `applied` flag never turns a tensor into a Python number
    (aten._local_scalar_dense is what .item(), bool(t) and a tensor bound as a Scalar dispatch to), and it
    equals the update with the same weight given as a number."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    params = [("a", torch.nn.Parameter(torch.randn(5))), ("b", torch.nn.Parameter(torch.randn(2, 3)))]
    by_tensor, by_number = EMA(params, [0.9, 0.99]), EMA(params, [0.9, 0.99])
    with torch.no_grad():
        for _, p in params:
            p.add_(1.0)
    with HostReads() as reads:
        by_tensor.update(torch.tensor(1.0))
    assert reads.seen == []
    by_number.update()
    for i in range(2):
        for name, _ in params:
            assert torch.equal(by_tensor.shadows[i][name], by_number.shadows[i][name])


@pytest.mark.parametrize("zero", [2, 3])
def test_steady_training_steps_read_the_host_only_in_deepspeeds_norm_check(tmp_path, zero):
    """bf16 steps that neither log, sample nor save wait for the device nowhere in pixelgen. DeepSpeed 0.19
    itself reads one bool per step: its ZeRO step checks the global gradient norm with
    `runtime/utils.is_invalid_grad_norm`; that is the one read allowed (docs/architecture.md, Non-finite steps)."""
    (code, out), = Job(tmp_path / "run", {"zero_stage": zero, "precision": "bf16"},
                       worker="tests.host_reads_worker").wait()
    assert code == 0, out[-4000:]
    report = json.loads(out.strip().splitlines()[-1])
    sites = {site: n for n, site in report["reads"]}
    assert all(site.startswith("utils.py:is_invalid_grad_norm") for site in sites), sites
    assert sum(sites.values()) <= report["steps"], sites


# ------------------------------------------------------------------------------ ranks, ZeRO stages, export
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, zero):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run(one, 1, zero_stage=zero, noise=False))
    ok(run(two, 2, zero_stage=zero, noise=False))
    # Gloo sums the two halves of each batch in another order than one rank does: equal up to rounding.
    assert_same_weights(exported(one), exported(two), exact=False, rtol=1e-4, atol=1e-6)
    for a, b in zip(metrics(one), metrics(two)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # And a run that differs in one batch does not pass that comparison (the tolerance means something).
    other = tmp_path / "other"
    ok(run(other, 1, zero_stage=zero, noise=False, nan_batches=[3]))
    with pytest.raises(AssertionError):
        assert_same_weights(exported(one), exported(other), exact=False, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_export_equals_zero_to_fp32_and_keeps_frozen_weights(tmp_path, precision):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.engine_worker import Toy

    ok(run(tmp_path, 2, zero_stage=3, precision=precision, train="decoder", steps=4, ckpt_every=4))
    export = load_file(tmp_path / "export" / "model.safetensors")
    ds = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="step00000004",
                                                  exclude_frozen_parameters=True)
    # The optimizer held the decoder only: the frozen trunk had no master weights and no optimizer state.
    assert set(ds) == {k for k in export if k.startswith("decoder.")}
    for k, v in ds.items():
        assert export[k].dtype == torch.float32 and torch.equal(export[k], v.float()), k
    if precision == "bf16":  # the masters, not the bf16 weights the module computed with
        assert any(not torch.equal(export[k], export[k].bfloat16().float()) for k in ds)
    torch.manual_seed(0)  # the engine's seed for the initial weights
    initial = Toy().state_dict()
    for k in export:
        if not k.startswith("decoder."):
            assert torch.equal(export[k], initial[k]), f"frozen {k} changed"
    assert not all(torch.equal(export[k], initial[k]) for k in ds)


@pytest.mark.parametrize("zero", [2, 3])
def test_the_sample_grid_comes_from_the_first_ema(tmp_path, zero):
    import numpy as np
    from PIL import Image

    from pixelgen.viz import save_grid
    from tests.engine_worker import WORKER_KEYS, Toy, make_task

    ok(run(tmp_path, 2, zero_stage=zero, steps=4, ema_decays=[0.5, 0.9], sample_every=2))
    grid = np.asarray(Image.open(tmp_path / "samples" / "step00000004.png"))
    expected = {}
    for name in ("ema.safetensors", "model.safetensors"):
        model = Toy()
        model.load_state_dict(load_file(tmp_path / "export" / name))
        with torch.no_grad():
            images = make_task({**WORKER_KEYS, "lr": 0.01}).sample_fn(model)
        save_grid(images, tmp_path / f"expected-{name}.png")
        expected[name] = np.asarray(Image.open(tmp_path / f"expected-{name}.png"))
    diff = np.abs(grid.astype(int) - expected["ema.safetensors"].astype(int))
    assert diff.max() <= 1  # up to rounding: sampled in the training process from the EMA of decay 0.5
    assert np.abs(grid.astype(int) - expected["model.safetensors"].astype(int)).max() > 1
    # The grid at step 2 swapped the EMA in and the training weights back out exactly: training went on as
    # in a run that drew no grid.
    assert (tmp_path / "samples" / "step00000002.png").is_file()
    plain = tmp_path / "plain"
    ok(run(plain, 2, zero_stage=zero, steps=4, ema_decays=[0.5, 0.9]))
    assert_same_weights(exported(tmp_path), exported(plain))


def test_trunk_at_its_own_learning_rate(tmp_path):
    from tests.engine_worker import Toy

    ok(run(tmp_path, 1, trunk_lr=0.0, steps=3))
    export = load_file(tmp_path / "export" / "model.safetensors")
    torch.manual_seed(0)
    initial = Toy().state_dict()
    assert all(torch.equal(export[k], initial[k]) for k in export if k.startswith("trunk."))
    assert not any(torch.equal(export[k], initial[k]) for k in export if k.startswith("decoder."))


def test_changing_the_rank_count_stops_with_a_clear_message_where_the_stream_cannot_follow(tmp_path):
    run(tmp_path, 1, fault="step@5", any_world=False)
    results = run(tmp_path, 2, any_world=False)
    assert all(code != 0 for code, _ in results)
    assert "written by 1 ranks but this run has 2" in results[0][1]
    assert "cannot carry its data position" in results[0][1] and "relaunch with 1 ranks" in results[0][1]
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_another_rank_count_goes_on_with_the_same_batches(tmp_path, zero):
    """2 ranks -> 1 rank -> 2 ranks, each change at a crash after a checkpoint: the ZeRO shards go through
    DeepSpeed's universal checkpoint, the EMAs are joined and cut again, and the stream goes on at the next
    global micro-batch (the worker's batches are the same at any rank count). Without noise in the loss the
    run then equals an uninterrupted 2-rank run up to the rounding of a different summation order."""
    spec = dict(zero_stage=zero, noise=False, steps=9, ckpt_every=3)
    ref, out = tmp_path / "reference", tmp_path / "run"
    ok(run(ref, 2, **spec))
    first = run(out, 2, fault="step@4", **spec)  # after the checkpoint at step 3
    assert any(code == -signal.SIGKILL for code, _ in first)
    second = run(out, 1, fault="step@7", **spec)  # resumes at 3 on one rank; killed after its checkpoint at 6
    assert "from checkpoint step 3 (written by 2 ranks, resumed on 1)" in second[0][1]
    assert json.loads((out / "checkpoints" / "step00000006" / "COMPLETE.json").read_text())["world_size"] == 1
    third = ok(run(out, 2, **spec))
    assert "from checkpoint step 6 (written by 1 ranks, resumed on 2)" in third[0][1]
    assert (out / "checkpoints" / "step00000006" / "universal" / "COMPLETE.json").is_file()
    # The loss history is continuous (each step once) and step by step that of the uninterrupted run.
    assert [r["step"] for r in metrics(out)] == list(range(1, 10))
    for a, b in zip(metrics(out), metrics(ref)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    assert_same_weights(exported(out), exported(ref), exact=False, rtol=1e-4, atol=1e-6)  # model and each EMA


# ----------------------------------------------------------------------------------- preemption and health
def test_sigusr2_on_one_rank_saves_on_all_and_exits_for_requeue(tmp_path):
    spec = {**BASE, "steps": 400, "ckpt_every": 1000, "log_every": 1, "warmup_steps": 0}
    job = Job(tmp_path, spec, world=2)
    deadline = time.time() + 120
    while not ((tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 12):
        assert all(p.poll() is None for p in job.procs) and time.time() < deadline
        time.sleep(0.05)
    job.procs[1].send_signal(signal.SIGUSR2)  # SLURM signals every task; the ranks must agree even if not
    results = job.wait()
    assert [code for code, _ in results] == [75, 75], results[0][1][-3000:]
    tags = [p for p in (tmp_path / "checkpoints").glob("step*") if (p / "COMPLETE.json").exists()]
    assert len(tags) == 1
    stopped = int(tags[0].name[4:])
    assert 12 <= stopped < 400 and stopped % 10 == 0  # the ranks agree every 10 steps
    assert not (tmp_path / "export").exists()

    results = ok(Job(tmp_path, {**spec, "steps": stopped + 5}, world=2).wait())
    assert f"from checkpoint step {stopped}" in results[0][1]
    assert [m["step"] for m in metrics(tmp_path)] == list(range(1, stopped + 6))


@pytest.mark.parametrize("poison", ["nan_batches", "nan_grad_batches"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, poison):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pixelgen.engine.ema import whole_state

    # Global micro-batch 4 is the first half of step 3 (grad_accum 2): one bad micro-batch spoils the step.
    ok(run(tmp_path, 2, steps=5, ckpt_every=1, keep_ckpts=10, **{poison: [4]}))
    log = metrics(tmp_path)
    assert [m["skipped_steps"] for m in log] == [0, 0, 1, 1, 1]
    if poison == "nan_batches":
        assert math.isnan(log[2]["loss"]) and all(math.isfinite(m["loss"]) for i, m in enumerate(log) if i != 2)

    def state(step):
        ckpts, tag = tmp_path / "checkpoints", f"step{step:08d}"
        emas = whole_state(_rank_files(ckpts / tag, 2))["shadows"]  # ZeRO-2: each rank's fragments
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=tag), emas

    (w2, ema2), (w3, ema3), (w4, ema4) = state(2), state(3), state(4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step changed no weight
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ema2, ema3) for k in a)  # nor any EMA
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # and training went on
    # Step 4 was applied: each EMA moved from its step-3 value toward the new weights by 1 - decay.
    assert len(ema3) == len(ema4) == len(BASE["ema_decays"]) == 2
    for d, a, b in zip(BASE["ema_decays"], ema3, ema4):
        for k in a:
            torch.testing.assert_close(b[k], d * a[k] + (1 - d) * w4[k], rtol=1e-5, atol=1e-6, msg=f"{d}:{k}")
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "export" / "model.safetensors").values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    results = run(tmp_path, 1, steps=20, ckpt_every=2, max_nonfinite_steps=3, nan_batches=list(range(4, 40)))
    code, out = results[0]
    assert code != 0
    assert "3 optimizer steps in a row had a non-finite loss" in out
    assert "reached the limit at step 5" in out  # steps 3, 4, 5
    assert "step00000004" in out  # the last good checkpoint
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------------------- measurement
def test_flops_are_counted_from_the_step_and_give_mfu(tmp_path):
    ok(run(tmp_path, 1, steps=3, peak_tflops=1e-6))
    log = metrics(tmp_path)
    # The toy's matmuls per image: forward 2*(192*32 + 32*32 + 32*192); backward computes the weight
    # gradients of all three and the input gradients of the last two (the images need none).
    forward = 2 * (192 * 32 + 32 * 32 + 32 * 192)
    per_image = forward + forward + 2 * (32 * 32 + 32 * 192)
    for m in log:
        assert m["mfu"] * 1e-6 * 1e12 / m["img_per_s"] == pytest.approx(per_image, rel=1e-9)
        assert m["step_time_s"] > 0 and 0 <= m["data_wait"] < 1 and m["peak_mem_gib"] > 0.1
    # Without a known peak (a CPU) there is no MFU rather than a made-up one.
    other = tmp_path / "cpu"
    ok(run(other, 1, steps=2))
    assert all("mfu" not in m for m in metrics(other))


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    results = ok(run(eager, 1, steps=4, noise=False)) + ok(run(compiled, 1, steps=4, noise=False, compile=True))
    assert [json.loads(out.strip().splitlines()[-1])["compiled"] for _, out in results] == [False, True]
    for a, b in zip(metrics(eager), metrics(compiled)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
