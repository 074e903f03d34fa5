"""Distributed set-up from the launcher's environment: SLURM host lists, the launcher precedence, and a real
two-process gloo rendezvous from a fake `srun` environment."""

import json
import os
import socket
import subprocess
import sys

import pytest

from pixelgen.engine.dist import collective_timeout_s, first_host, launcher_env
from tests.conftest import ROOT

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
EXPORT_ONLY_VARS = ("LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")  # what submitit's export may also write


def _srun_task(procid: int, localid: int, **extra: str) -> dict:
    env = dict(SLURM_JOB_ID="123456", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="8", SLURM_PROCID=str(procid),
               SLURM_LOCALID=str(localid), SLURM_JOB_NODELIST="gpu[12-13]", PATH="/usr/bin")
    env.update(extra)
    return env


# --- first_host ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"),
    ("gpu[03-05,09]", "gpu03"),
    ("gpu[003-005]", "gpu003"),
    ("a[1-2],b[3]", "a1"),
    ("rack1-node[7,9]", "rack1-node7"),
    ("n[01-02]-ib", "n01-ib"),
    ("x", "x"),
    ("node3,node1", "node3"),
])
def test_first_host_of_a_slurm_hostlist(nodelist, host):
    assert first_host(nodelist) == host


def test_an_empty_hostlist_is_refused_by_name():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_host("")


@pytest.mark.parametrize("nodelist", ["gpu[03-05", "gpu]", "gpu[]", "gpu[a-b]"])
def test_a_malformed_hostlist_is_refused(nodelist):
    with pytest.raises(ValueError, match="malformed"):
        first_host(nodelist)


# --- launcher_env ------------------------------------------------------------------------------------------------

def test_torchrun_variables_are_passed_through():
    environ = dict(RANK="5", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29500")
    assert launcher_env(environ) == {**environ, "LAUNCHER": "torchrun"}


def test_torchrun_defaults_local_rank_and_master_addr():
    env = launcher_env(dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="29500"))
    assert (env["LOCAL_RANK"], env["MASTER_ADDR"], env["LAUNCHER"]) == ("0", "127.0.0.1", "torchrun")


def test_multi_rank_launcher_without_master_port_is_refused():
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        launcher_env(dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1"))


def test_a_world_of_one_without_master_port_gets_a_port():
    env = launcher_env(dict(RANK="0", WORLD_SIZE="1"))
    assert env["LAUNCHER"] == "torchrun"
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_rank_without_world_size_is_refused():
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        launcher_env(dict(RANK="3"))


def test_an_srun_task_takes_its_place_from_slurm():
    env = launcher_env(_srun_task(procid=3, localid=1))
    assert env["LAUNCHER"] == "slurm"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "8", "1", "gpu12")
    assert 1024 < int(env["MASTER_PORT"]) < 65536
    # Every task of the job computes the same rendezvous without talking to the others.
    other = launcher_env(_srun_task(procid=6, localid=0))
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])
    # Another job gets another port.
    assert launcher_env(_srun_task(3, 1, SLURM_JOB_ID="123457"))["MASTER_PORT"] != env["MASTER_PORT"]


def test_an_srun_task_prefers_the_step_nodelist_and_an_explicit_port():
    env = launcher_env(_srun_task(0, 0, SLURM_STEP_NODELIST="gpu[13]", MASTER_PORT="31000"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu13", "31000")
    env = launcher_env({**{k: v for k, v in _srun_task(0, 0).items() if k != "SLURM_JOB_NODELIST"},
                        "SLURM_NODELIST": "cpu[4-5]"})
    assert env["MASTER_ADDR"] == "cpu4"


def test_the_batch_script_shell_is_a_single_process():
    environ = dict(SLURM_JOB_ID="123456", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_LOCALID="0",
                   SLURM_JOB_NODELIST="gpu[12-13]")
    env = launcher_env(environ)
    assert env["LAUNCHER"] == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "1", "0", "127.0.0.1")


def test_no_launcher_is_a_single_process():
    env = launcher_env({"PATH": "/usr/bin"})
    assert env["LAUNCHER"] == "single"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "1", "0")
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_torchrun_wins_over_slurm():
    # e.g. torchrun started by srun: one SLURM task, several torch ranks.
    environ = {**_srun_task(0, 0), "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "h1",
               "MASTER_PORT": "29400"}
    env = launcher_env(environ)
    assert env == dict(RANK="2", WORLD_SIZE="4", LOCAL_RANK="2", MASTER_ADDR="h1", MASTER_PORT="29400",
                       LAUNCHER="torchrun")


@pytest.mark.parametrize("missing", ["SLURM_LOCALID", "SLURM_PROCID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_an_srun_task_missing_a_variable_names_it(missing):
    environ = _srun_task(3, 1)
    del environ[missing]
    with pytest.raises(RuntimeError, match=missing):
        launcher_env(environ)


def test_cuda_visible_devices_is_neither_returned_nor_changed():
    for environ in (_srun_task(3, 1, CUDA_VISIBLE_DEVICES="0,1,2,3"),
                    dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="29500", CUDA_VISIBLE_DEVICES="0,1"),
                    dict(CUDA_VISIBLE_DEVICES="3")):
        before = dict(environ)
        env = launcher_env(environ)
        assert set(env) == {*TORCH_VARS, "LAUNCHER"}
        assert environ == before


# --- the pipeline's submitit layer --------------------------------------------------------------------------------

def _clear_torch_vars(monkeypatch):
    # Set, then delete: monkeypatch then restores each variable's original state (absent, usually) after the
    # test, including the values _export_distributed_env writes into os.environ itself. Leaked into the test
    # process, they would make every later `pixelgen` subprocess wait for a rank that never comes.
    for name in (*TORCH_VARS, *EXPORT_ONLY_VARS):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def _local_task(monkeypatch, rank: int):
    _clear_torch_vars(monkeypatch)
    for name, value in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="77", SUBMITIT_LOCAL_NTASKS="2",
                            SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0",
                            SUBMITIT_LOCAL_GLOBALID=str(rank), SUBMITIT_LOCAL_LOCALID=str(rank)).items():
        monkeypatch.setenv(name, value)


def test_submitit_exports_nothing_under_slurm(monkeypatch):
    from pipeline.orchestrate import _export_distributed_env

    _clear_torch_vars(monkeypatch)
    for name, value in {**_srun_task(1, 1), "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(name, value)
    _export_distributed_env()
    assert not any(name in os.environ for name in TORCH_VARS)
    assert launcher_env(os.environ)["LAUNCHER"] == "slurm"


def test_submitit_exports_for_a_local_multi_task_job_even_inside_a_slurm_allocation(monkeypatch):
    from pipeline.orchestrate import _export_distributed_env

    _local_task(monkeypatch, rank=1)
    monkeypatch.setenv("SLURM_JOB_ID", "123456")  # e.g. started from an salloc shell
    _export_distributed_env()
    assert (os.environ.get("RANK"), os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_RANK")) == ("1", "2", "1")
    assert launcher_env(os.environ)["LAUNCHER"] == "torchrun"


# --- a real rendezvous ----------------------------------------------------------------------------------------------

_RANK_SCRIPT = """
import json, torch
from pixelgen.engine.dist import init_distributed
info = init_distributed()
again = init_distributed()  # idempotent
assert again == info, (again, info)
x = torch.tensor([info.rank + 1.0])
torch.distributed.all_reduce(x)
print(json.dumps(dict(rank=info.rank, world=info.world_size, local=info.local_rank, sum=x.item(),
                      backend=torch.distributed.get_backend())), flush=True)
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_srun_tasks_meet_through_gloo():
    base = {k: v for k, v in os.environ.items()
            if k not in TORCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_"))}
    base.update(SLURM_JOB_ID="424242", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="localhost",
                MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"rank exited {proc.returncode}\n{out}\n{err[-4000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert [r["local"] for r in sorted(results, key=lambda r: r["rank"])] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3 and r["backend"] == "gloo" for r in results)


def test_multi_rank_processes_destroy_their_process_groups_and_exit_cleanly():
    """The end of a multi-rank process, eight times over (benchmarks/exit_stress.py runs it hundreds of times,
    side by side with the old ending): every rank leaves no process group to the interpreter's teardown, and
    exits 0. Without it, 15 processes in 300 aborted after their last line (exit -6) on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_"))}
    for job in range(8):
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, "-m", "tests.exit_worker"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
                 for r in (0, 1)]
        results = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
        if any(code and "EADDRINUSE" in out for code, out in results):
            continue  # the port was taken between choosing and binding it
        for code, out in results:
            assert code == 0 and out.rstrip().endswith("process groups left at exit: False"), (job, code, out[-2000:])


_STALL_SCRIPT = """
import json, os, sys, time, torch
from pixelgen.engine.dist import init_distributed, peer_lost
info = init_distributed()
torch.distributed.all_reduce(torch.ones(1))  # both ranks met
if info.rank == 1:
    print("stalled", flush=True)
    time.sleep(300)  # alive but silent: a rank on a node whose link is gone
start = time.time()
try:
    torch.distributed.all_reduce(torch.ones(1))
    print(json.dumps({"error": None}), flush=True)
except Exception as err:
    print(json.dumps({"error": peer_lost(err, info.rank), "waited": time.time() - start}), flush=True)
"""


def test_a_rank_whose_peer_stops_answering_gives_up_after_the_collective_timeout():
    """No TCP reset, no exit: the peer just never answers. Rank 0 waits PIXELGEN_COLLECTIVE_TIMEOUT_S, not
    torch's 30 min, and the error says what happened and what to do; then the process ends (its own shutdown
    does not wait for the silent peer either)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(("SLURM_", "SUBMITIT_"))}
    for _ in range(3):
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, "-c", _STALL_SCRIPT], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                                       "PIXELGEN_COLLECTIVE_TIMEOUT_S": "3", "DS_ACCELERATOR": "cpu"})
                 for r in (0, 1)]
        try:
            out = procs[0].communicate(timeout=120)[0]
            assert procs[1].poll() is None  # rank 0 ended while its peer was still there, silent
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        if "EADDRINUSE" not in out:  # the port was taken between choosing and binding it
            break
    assert procs[0].returncode == 0, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert 3 <= result["waited"] < 15, result
    assert result["error"].startswith("rank 0: a collective timed out: a peer rank stopped answering"), result
    assert "PIXELGEN_COLLECTIVE_TIMEOUT_S=3 s" in result["error"] and "pixelgen resume" in result["error"]


def test_the_collective_timeout_must_be_whole_seconds():
    assert collective_timeout_s({}) == 600 and collective_timeout_s({"PIXELGEN_COLLECTIVE_TIMEOUT_S": "45"}) == 45
    for bad in ("0", "1.5", "ten"):
        with pytest.raises(RuntimeError, match=f"PIXELGEN_COLLECTIVE_TIMEOUT_S='{bad}': must be a whole number"):
            collective_timeout_s({"PIXELGEN_COLLECTIVE_TIMEOUT_S": bad})
