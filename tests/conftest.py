import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"

# Tests never need a GPU, and reach no network but the package registry (the image build, test_image.py).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# `make test` runs the suite on two pytest-xdist workers, one file per unit (--dist loadfile), in this order
# (--no-loadscope-reorder): the longest files first, so that the last to finish is a short one. The live SLURM
# file mostly waits on the cluster (a lost node's timeout, a time limit, a requeue) and the in-process tests use
# one thread (one_thread below): one worker alone leaves a core idle most of the time. Seconds measured serially
# (docs/benchmarks.md, "Install and test suite").
LONGEST_FIRST = ("test_slurm.py", "test_image.py", "test_engine.py", "test_pipeline.py", "test_fid_stage.py",
                 "test_families.py", "test_gpu_benchmark.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process tests run tiny matmuls: one thread is faster, and on small shared CPUs a multi-threaded
    BLAS was 10-100x slower. Subprocesses started by the tests keep torch's default."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def launcher_env_unchanged():
    """Torch's rank variables leaked into the test process by one test would make every later `pixelgen`
    subprocess wait for ranks that never come (it happened once): fail the test that leaks them instead."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUDA_VISIBLE_DEVICES")
    before = {k: os.environ.get(k) for k in names}
    yield
    after = {k: os.environ.get(k) for k in names}
    assert after == before, f"the test changed the process's launcher variables: {before} -> {after}"


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory) -> Path:
    """A small ImageNet-layout folder shared by the pipeline tests (4 classes, 24px)."""
    from pixelgen.data.fake_imagenet import generate

    out = tmp_path_factory.mktemp("fake-imagenet")
    generate(out, num_classes=4, train_per_class=12, val_per_class=4, size=24, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def chain(tmp_path_factory, fake_imagenet):
    """The tiny chain run once through submitit's local executor; the SLURM tests compare against it."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    # Two shard tasks: the shard stage runs as a job array, as it would on SLURM.
    proc = pixelgen(*chain_args(run_dir, fake_imagenet), "--executor", "local")
    return run_dir, proc


def chain_args(run_dir: Path, fake_imagenet: Path) -> list[str]:
    return ["run", str(TINY), f"run_dir={run_dir}", f"data.imagenet_dir={fake_imagenet}", "shard.array_tasks=2"]


def pixelgen(*args: str, cwd: Path = ROOT, check: bool = True, timeout: int = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `pixelgen` console command (installed into the venv running the tests)."""
    exe = Path(sys.executable).parent / "pixelgen"
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"pixelgen {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package), registered as <name>_benchmark."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
