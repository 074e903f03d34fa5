"""Distributed set-up from whichever launcher started the process.

Understood launchers, in order of precedence (`launcher_env`):

* torchrun, or any launcher that sets torch's `RANK` and `WORLD_SIZE` (the pipeline's submitit layer does so
  for its local multi-task executor): its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are
  used as they are; a multi-rank launcher must set MASTER_PORT for every rank.
* a SLURM `srun` task (`SLURM_STEP_NUM_TASKS` is set): rank, world size and local rank come from
  SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, the rendezvous host is the first node of the step's
  node list, and the port is MASTER_PORT if set, else derived from SLURM_JOB_ID so that every task agrees.
* anything else, including the batch script's own shell on a SLURM node: a world of one.

CUDA_VISIBLE_DEVICES is never touched: DeepSpeed picks each rank's device from LOCAL_RANK.

A rank waits at most `collective_timeout_s()` seconds (PIXELGEN_COLLECTIVE_TIMEOUT_S, default 600; a cluster
profile's `collective_timeout_s` sets it for its jobs) in one collective for its peers: a peer on a node that
vanished never answers, and without a bound gloo and NCCL wait for torch's default of 30 min. Then it raises
(gloo) or NCCL's watchdog ends the process, the stage fails, and the run resumes from its last complete
checkpoint. On a cluster, keep it above SLURM's SlurmdTimeout, so that SLURM first marks the node DOWN and
requeues the job (NODE_FAIL) instead of the job failing on its own.

A process that initialised torch.distributed here destroys its process groups before the interpreter starts
to finalise (`shutdown`, registered with atexit): otherwise gloo's worker threads can still hold work objects
while Python tears down, and the process aborts after its last line ("terminate called without an active
exception", exit -6; pytorch/pytorch#190489), which srun reports as a failed job even though the stage wrote its
result.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from pixelgen.engine import faults

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "PIXELGEN_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600


def collective_timeout_s(environ: Mapping[str, str] = os.environ) -> int:
    """How long a rank waits for its peers in one collective (see the module's doc), from TIMEOUT_ENV."""
    value = environ.get(TIMEOUT_ENV, "")
    if value == "":
        return DEFAULT_TIMEOUT_S
    if not value.isdigit() or int(value) < 1:
        raise RuntimeError(f"{TIMEOUT_ENV}={value!r}: must be a whole number of seconds >= 1 (how long a rank "
                           "waits for its peers in one collective)")
    return int(value)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist ("gpu[03-05,09],cpu1" -> "gpu03"); zero padding is kept."""
    # Only the first name is needed, so no full expansion: python-hostlist would be the first GPL-licensed
    # package in the image, and `scontrol show hostnames` needs a Slurm client inside the container.
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list (SLURM_JOB_NODELIST): cannot choose the rendezvous host")
    # The first entry runs up to the first comma outside brackets: text and bracket groups, e.g. "n[01-02]-ib".
    entry = re.match(r"(?:[^\[\],]+|\[[^\[\]]*\])+", nodelist)
    rest = nodelist[entry.end():] if entry else nodelist
    if entry is None or (rest and not rest.startswith(",")):
        raise ValueError(f"malformed SLURM node list {nodelist!r}")

    def first_value(group: re.Match) -> str:  # "[03-05,09]" -> "03", "[1-9:2]" -> "1"
        value = re.match(r"\d+", group.group(1))
        if value is None:
            raise ValueError(f"malformed SLURM node list {nodelist!r}")
        return value.group()

    return re.sub(r"\[([^\[\]]*)\]", first_value, entry.group())


def _require(environ: Mapping[str, str], name: str, why: str) -> str:
    value = environ.get(name, "")
    if value == "":
        raise RuntimeError(f"{name} is not set but {why}")
    return value


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Torch's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for this process, from the launcher's
    variables in `environ` (not modified), plus LAUNCHER: "torchrun", "slurm" or "single"."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        if "RANK" not in environ or "WORLD_SIZE" not in environ:
            have, missing = ("RANK", "WORLD_SIZE") if "RANK" in environ else ("WORLD_SIZE", "RANK")
            raise RuntimeError(f"{have} is set but {missing} is not: the launcher must set both for every rank")
        world = environ["WORLD_SIZE"]
        port = environ.get("MASTER_PORT", "")
        if not port:
            if world != "1":
                raise RuntimeError(f"MASTER_PORT is not set but WORLD_SIZE={world}: the launcher must set "
                                   "MASTER_PORT for all ranks")
            port = str(_free_port())
        return dict(RANK=environ["RANK"], WORLD_SIZE=world, LOCAL_RANK=environ.get("LOCAL_RANK", "0"),
                    MASTER_ADDR=environ.get("MASTER_ADDR") or "127.0.0.1", MASTER_PORT=port, LAUNCHER="torchrun")

    # srun sets SLURM_STEP_NUM_TASKS in every task it starts. The batch script's own shell also runs on a
    # compute node with SLURM_JOB_ID / SLURM_NTASKS set, but it is one process, not a task of a step: if it
    # were treated as a rank of SLURM_NTASKS it would wait forever for peers that were never started.
    if "SLURM_STEP_NUM_TASKS" in environ:
        why = "SLURM_STEP_NUM_TASKS is (this looks like an srun task)"
        world = _require(environ, "SLURM_STEP_NUM_TASKS", why)
        rank = _require(environ, "SLURM_PROCID", why)
        local = _require(environ, "SLURM_LOCALID", why)
        try:
            ok = 0 <= int(rank) < int(world) and int(local) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise RuntimeError(f"inconsistent SLURM task: SLURM_PROCID={rank!r}, SLURM_LOCALID={local!r}, "
                               f"SLURM_STEP_NUM_TASKS={world!r}")
        if world == "1":
            # Nobody to meet: a local rendezvous avoids depending on the node's name resolving.
            addr, port = "127.0.0.1", environ.get("MASTER_PORT") or str(_free_port())
        else:
            nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                             if environ.get(k)), None)
            if nodelist is None:
                raise RuntimeError(f"SLURM_JOB_NODELIST (or SLURM_STEP_NODELIST) is not set but {why}")
            addr = first_host(nodelist)
            port = environ.get("MASTER_PORT", "")
            if not port:
                # Every task computes the same port without talking to the others. SLURM_JOB_ID is distinct
                # for each task of a job array too. (Two multi-task steps of one job running at once on the
                # same first node would collide: set MASTER_PORT for them.)
                job_id = _require(environ, "SLURM_JOB_ID", f"{why} and MASTER_PORT is not set")
                if not job_id.isdigit():
                    raise RuntimeError(f"SLURM_JOB_ID={job_id!r} is not a number: set MASTER_PORT instead")
                port = str(15000 + int(job_id) % 20000)
        return dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local, MASTER_ADDR=addr, MASTER_PORT=port,
                    LAUNCHER="slurm")

    return dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                LAUNCHER="single")


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on the CPU, nccl on GPUs) from the launcher's
    environment (see `launcher_env`), exporting torch's variables into os.environ; idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    on_gpu = accel.device_name() == "cuda"
    initialised = torch.distributed.is_initialized()
    env = launcher_env(os.environ)
    for name in TORCH_VARS:  # launcher_env keeps any RANK / WORLD_SIZE already set, so nothing contradicts
        # The missing ones again when initialised already: the debug executor runs the stages one after another
        # in one process and restores the environment after each, while the process group stays (and
        # DeepSpeed's engine reads LOCAL_RANK).
        if initialised:
            os.environ.setdefault(name, env[name])
        else:
            os.environ[name] = env[name]
    if not initialised:
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(seconds=collective_timeout_s()))
        # atexit runs handlers last-registered first: anything registered after this point (wandb's own
        # teardown, for one) ends before the process groups go.
        atexit.register(shutdown)
        faults.hold("startup", int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not on_gpu:
        _share_cores()
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


_PEER_GONE = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Watchdog caught collective operation timeout")


def peer_lost(err: BaseException, rank: int) -> str | None:
    """What to tell the user when `err` is a collective that failed because a peer rank stopped answering or
    vanished (gloo's timeout, a connection its peer's end closed; NCCL's watchdog), else None."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(s in text for s in _PEER_GONE):
        return None
    why = "timed out" if "imed out" in text or "timeout" in text else "lost its connection"
    return (f"rank {rank}: a collective {why}: a peer rank stopped answering (its node may be lost, or it "
            f"crashed; the wait is bounded by {TIMEOUT_ENV}={collective_timeout_s()} s). Nothing after the last "
            f"complete checkpoint is kept; resume the run from it (`pixelgen resume RUN_DIR`; a SLURM job "
            f"requeued after a node failure does so by itself). The backend said: {text.strip().splitlines()[0]}")


def _share_cores() -> None:
    """CPU ranks on one machine split its cores instead of each starting a thread per core: two ranks of two
    threads each on two cores ran the FID stage at half the speed of one rank (benchmarks/fid_sampling.py).
    An explicit OMP_NUM_THREADS wins; SLURM's cpus-per-task already narrows each task's affinity mask."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))


def shutdown() -> None:
    """Destroy every process group (DeepSpeed's sub-groups too) while the interpreter is whole; idempotent.

    Local: no collective, so a rank whose peer already died or exited does not wait for it. `init_distributed`
    registers it with atexit, so it runs at the end of every process that initialised here, however it ends
    (a stage's return, an exception, `sys.exit(75)`); not earlier, since the debug executor runs several stages
    in one process and DeepSpeed keeps its groups across them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
