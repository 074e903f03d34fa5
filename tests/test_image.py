"""The container image: the hash-locked package sets (docker/lock/), the provenance checks between a checkout
and an image (pipeline/image.py), and the image itself, built with podman from this checkout against a base
made from Debian's packages (docker/local-base) and run through `podman image mount` + chroot (`podman run`
does not work in this sandbox).

The build needs root, podman and debootstrap (installed here with apt-get when missing) and the package
registry; where it cannot run, the live tests skip with the reason, and with CI or PIXELGEN_REQUIRE_IMAGE set
that skip is a failure.
PIXELGEN_TEST_IMAGE=TAG runs the image tests against an image you built (make image) instead, and keeps it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import cluster, image, rundir
from pipeline.config import ConfigError
from tests.conftest import ROOT
from tests.test_slurm import _dry_run, _profile

sys.path.insert(0, str(ROOT / "docker"))
import lock  # noqa: E402  (docker/lock.py)

sys.path.pop(0)


def _pins(text: str) -> dict[str, str]:
    return {name: version for name, (version, _) in lock.pins_of(text).items()}


# ----------------------------------------------------------------------------------------------- the lock
def _copy_inputs(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "docker" / "lock", tmp_path / "docker" / "lock")
    return tmp_path


def test_the_locks_agree_with_pyproject_and_hash_every_package():
    assert lock.check() == []
    for target in lock.TARGETS:
        pins = lock.read_lock(ROOT / "docker" / "lock" / f"{target.name}.txt")
        assert pins and all(hashes > 0 for _, hashes in pins.values())
        assert ("torch" in pins) != target.base_provides  # the CUDA base keeps its own torch
        assert not target.base_provides or not any(lock.TORCH_STACK.match(n) for n in pins)


def test_a_changed_pyproject_or_a_hand_edited_lock_is_named(tmp_path):
    root = _copy_inputs(tmp_path)
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(text.replace('"timm>=1.0.20"', '"timm>=2.0"'))
    problems = lock.check(root)
    assert any("made from another pyproject.toml" in p for p in problems)
    assert any("'timm>=2.0'" in p and "timm==1.0.31" in p and "make lock" in p for p in problems)
    (root / "pyproject.toml").write_text(text.replace('"scipy>=1.11",', '"scipy>=1.11", "zstandard>=0.20",'))
    assert any("the lock has no zstandard" in p for p in lock.check(root))
    # A pin whose hashes were dropped by hand.
    (root / "pyproject.toml").write_text(text)
    cpu = root / "docker" / "lock" / "cpu.txt"
    cpu.write_text(re.sub(r"^(einops==\S+) \\\n(    --hash=\S+ ?\\?\n)+", r"\1\n", cpu.read_text(), flags=re.M))
    assert lock.check(root) == [f"{cpu}: einops==0.8.2 has no --hash: run `make lock`"]


def test_split_puts_deepspeed_alone_second(tmp_path):
    lock.split(ROOT / "docker" / "lock" / "cpu.txt", tmp_path)
    first, second = (tmp_path / "first.txt").read_text(), (tmp_path / "deepspeed.txt").read_text()
    whole = _pins((ROOT / "docker" / "lock" / "cpu.txt").read_text())
    assert list(_pins(second)) == ["deepspeed"] and "--hash=sha256:" in second
    assert _pins(first) == {k: v for k, v in whole.items() if k != "deepspeed"}


def test_the_cuda_image_needs_no_deepspeed_op():
    """On the CUDA base no DeepSpeed op is prebuilt (nvcc-built ops are not needed): the stages give DeepSpeed
    torch's AdamW (no `optimizer` section, so no FusedAdam), and the cuda accelerator has no shared-memory
    allreduce op to load (the CPU accelerator's is built into the CPU image)."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from pixelgen.engine.config import TrainConfig
    from pixelgen.engine.train import deepspeed_config

    assert "optimizer" not in deepspeed_config(TrainConfig(), world_size=8, bf16=True)
    assert CUDA_Accelerator().create_op_builder("ShareMemCommBuilder") is None


# ----------------------------------------------------------------------------------------------- provenance
def test_revisions_compare_by_commit():
    assert image.mismatch("abc", "abc-dirty", "x") is None
    assert image.mismatch("unknown", "abc", "x") is None and image.mismatch("abc", None, "x") is None
    message = image.mismatch("abc", "def", "the image /i.sqsh")
    assert "the image /i.sqsh holds pixelgen def" in message and "submitting checkout is at abc" in message


def test_a_job_in_an_image_of_another_revision_stops_at_start(tmp_path):
    info = tmp_path / "image.json"
    info.write_text(json.dumps({"revision": "1111111111111111111111111111111111111111", "lock": "cpu"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    proc = subprocess.run([sys.executable, "-m", "pipeline.jobstart", "-u", "-m", "submitit.core._submit",
                           str(tmp_path / "%j")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, image.INFO_ENV: str(info), image.SUBMIT_ENV: "2222222222222222222222222222222222222222"})
    assert proc.returncode == image.EXIT_MISMATCH, proc.stderr
    assert f"this job's image ({info}) holds pixelgen 1111111111111111111111111111111111111111" in proc.stderr
    assert "the submitting checkout is at 2222222222222222222222222222222222222222" in proc.stderr


def test_the_job_script_exports_the_checkout_revision(tmp_path, fake_imagenet):
    scripts = _dry_run(tmp_path, fake_imagenet, _profile(tmp_path))
    for text in scripts.values():
        assert f"export {image.SUBMIT_ENV}={rundir.git_revision()}" in text.splitlines()


def _sqsh_profile(tmp_path: Path, revision: str, digest: str = "sha256:" + "ab" * 32, **changes) -> Path:
    sqsh = tmp_path / "pixelgen.sqsh"
    sqsh.write_bytes(b"squashfs stand-in")
    Path(f"{sqsh}.json").write_text(json.dumps({"image": "localhost/pixelgen:t", "digest": digest,
                                                "revision": revision, "version": "0.1.0", "lock": "cuda",
                                                "lock_sha256": "cd" * 32}))
    return _profile(tmp_path, gpus_per_node=4, tasks_per_node=None,
                    **{"container.runtime": "pyxis", "container.image": str(sqsh), **changes})


def test_submission_refuses_an_image_of_another_revision(tmp_path, fake_imagenet):
    profile = _sqsh_profile(tmp_path, "0" * 40)
    with pytest.raises(AssertionError, match=rf"the image {tmp_path}/pixelgen.sqsh holds pixelgen 0{{40}}, but the "
                                             rf"submitting checkout is at {rundir.git_revision()}"):
        _dry_run(tmp_path, fake_imagenet, profile)


def test_the_image_identity_reaches_the_run_record_and_run_json(tmp_path, fake_imagenet):
    profile_path = _sqsh_profile(tmp_path, rundir.git_revision())
    _, profile = cluster.load_profile(str(profile_path))
    info = cluster.check_image(profile)
    assert info["digest"] == "sha256:" + "ab" * 32 and info["revision"] == rundir.git_revision()
    assert info["lock"] == "cuda" and info["lock_sha256"] == "cd" * 32
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"git_revision": "r", "config_hash": "h"}))
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run}", f"data.imagenet_dir={fake_imagenet}"])
    cluster.add_submission(run, cfg, "run", str(profile_path), profile, {"shard": {"job_id": "5", "tasks": 1}})
    record = cluster.read_record(run)
    assert record["submissions"][-1]["container"]["digest"] == "sha256:" + "ab" * 32
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["container"] == record["submissions"][-1]["container"] and run_json["config_hash"] == "h"
    # The profile's own digest must agree with the file's.
    _, profile = cluster.load_profile(str(_sqsh_profile(tmp_path, rundir.git_revision(),
                                                        **{"container.digest": "sha256:" + "ef" * 32})))
    with pytest.raises(ConfigError, match="container.digest = sha256:efef.* says the image .* is sha256:abab"):
        cluster.check_image(profile)


# ------------------------------------------------------------------------------------------ the build script
_ENGINE = """#!/usr/bin/env bash
# Stands in for the container engine: its `build` fails FAILS times with MESSAGE, then succeeds.
case "$1" in
    build) n=$(cat "$STATE" 2>/dev/null || echo 0); echo $((n + 1)) > "$STATE"
           echo "STEP 13/20: RUN python -m pip install ..."
           if [ "$n" -lt "$FAILS" ]; then echo "$MESSAGE" >&2; echo "Error: building at STEP 13" >&2; exit 1; fi
           echo "built $*" ;;
    image) echo sha256:feedbeef ;;
esac
"""


def _build_script(tmp_path: Path, fails: int, message: str) -> tuple[subprocess.CompletedProcess, int]:
    """docker/build-image against a stand-in engine: the kernel's transient memfd refusal cannot be made on
    purpose, and what is under test is the script's reaction to it."""
    tmp_path.mkdir(exist_ok=True)
    engine = tmp_path / "docker"
    engine.write_text(_ENGINE)
    engine.chmod(0o755)
    state = tmp_path / "builds"
    proc = subprocess.run([str(ROOT / "docker" / "build-image"), "--base", "debian@sha256:" + "0" * 64,
                           "--tag", "localhost/t:1"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CONTAINER_ENGINE": str(engine), "STATE": str(state),
                               "FAILS": str(fails), "MESSAGE": message})
    return proc, int(state.read_text())


def test_the_build_is_retried_only_after_the_transient_memfd_refusal(tmp_path):
    busy = "Close_Fd sealing memfd copy: Device or resource busy"
    proc, builds = _build_script(tmp_path / "once", 1, busy)
    assert proc.returncode == 0, proc.stderr
    assert builds == 2 and "attempt 1 failed on a transient kernel refusal" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "sha256:feedbeef"  # still the digest last
    proc, builds = _build_script(tmp_path / "always", 5, busy)
    assert proc.returncode == 1 and builds == 3  # three tries at most
    # Any other failure is the build's own: no second try, and the reason stays on screen.
    proc, builds = _build_script(tmp_path / "other", 1, "ERROR: No matching distribution found for torch==9")
    assert proc.returncode == 1 and builds == 1
    assert "No matching distribution found for torch==9" in proc.stdout + proc.stderr
    assert "build-image: docker build failed (exit 1); its output is above" in proc.stderr


# ------------------------------------------------------------------------------------------ the live image
def _run(*cmd, timeout=1800, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


# The build (apt, debootstrap, ~6.5 GB of wheels) runs inside the first live test's setup: 526 s on a 2-core
# machine beside the SLURM file, over the suite's 600 s per-test limit on a slower one (CI's two image tests
# errored at 1.27x this machine's time). Its own limit is the build's; the tests' limit adds their calls.
BUILD_TIMEOUT_S = 2400
live_image_timeout = pytest.mark.timeout(BUILD_TIMEOUT_S + 600)


class Build:
    """The CPU image of this checkout, built against a Debian base made here (docker/local-base), by
    `make image`, as one process the `built` fixture starts and waits for. Everything it made is removed at
    the end (the images are several GB). Not started at collection: beside the serial suite it made the
    fresh-machine CI 2-3 minutes slower in all than the build alone costs (2 cores, and its 13 GB of writes
    evict the page cache every torch import of the other tests reads from). Under `make test` it runs on one
    worker while the other runs the live SLURM file, which mostly waits (tests/conftest.py)."""

    def __init__(self):
        self.tag = f"localhost/pixelgen-test:{os.getpid()}"
        self.base = f"localhost/pixelgen-test-base:{os.getpid()}"
        self.reason = None
        if os.geteuid() != 0:
            self.reason = "building an image here needs root (podman build --isolation chroot, debootstrap)"
        elif not all(shutil.which(b) for b in ("podman", "debootstrap")) and shutil.which("apt-get") is None:
            self.reason = "podman or debootstrap is missing and there is no apt-get to install them"
        self.proc = None
        # An image you built yourself (make image), to iterate on these tests without rebuilding; kept.
        self.reused = os.environ.get("PIXELGEN_TEST_IMAGE")
        if self.reused:
            self.tag, self.reason, self.started = self.reused, None, time.time()

    def start(self) -> "Build":
        if self.reason or self.proc or self.reused:
            return self
        self.work = Path(tempfile.mkdtemp(prefix="pixelgen-image-"))
        self.log = self.work / "build.log"
        install = ("command -v podman >/dev/null && command -v debootstrap >/dev/null || "
                   "flock /run/lock/pixelgen-apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                   "apt-get install -y -qq podman debootstrap >/dev/null'")  # one apt at a time (slurm/local/up)
        # --layers=false: one commit of the finished tree (a fresh build has no layer cache to reuse).
        script = (f"set -e; {install}; {ROOT}/docker/local-base {self.base} {self.work}/rootfs >/dev/null; "
                  f"IMAGE_BUILD_FLAGS=--layers=false make -s -C {ROOT} image BASE={self.base} IMAGE={self.tag}")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.time()
        atexit.register(self.remove)
        return self

    def wait(self, timeout: int = BUILD_TIMEOUT_S) -> str:
        """The build's output; fails with its log's end when it failed."""
        if self.reused:
            return ""
        self.proc.wait(timeout=timeout)
        out = self.log.read_text()
        if self.proc.returncode != 0:
            raise AssertionError(f"building the image failed (exit {self.proc.returncode}):\n{out[-8000:]}")
        return out

    def remove(self):
        if self.reused:
            return
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        subprocess.run(["podman", "rmi", "-f", self.tag, self.base], capture_output=True, timeout=300)
        shutil.rmtree(self.work, ignore_errors=True)


BUILD: Build | None = None


def start_build() -> Build:
    global BUILD
    BUILD = BUILD or Build().start()
    return BUILD


@pytest.fixture(scope="module")
def built():
    build = start_build()
    if build.reason:
        if os.environ.get("CI") or os.environ.get("PIXELGEN_REQUIRE_IMAGE"):
            pytest.fail(f"CI requires the image tests, but: {build.reason}")
        pytest.skip(build.reason)
    try:
        output = build.wait()
        print(f"image built in {time.time() - build.started:.0f} s")
        yield build.tag, output
    finally:
        build.remove()


def _inspect(tag: str, fmt: str):
    return json.loads(_run("podman", "image", "inspect", "--format", fmt, tag).stdout)


class Chroot:
    """The image's read-only tree with /proc, /dev and a tmpfs /tmp, commands run with the image's env."""

    def __init__(self, tag: str):
        self.tag = tag
        self.env = dict(e.split("=", 1) for e in _inspect(tag, "{{json .Config.Env}}"))
        self.env.update(HOME="/tmp", LANG="C.UTF-8", OMP_NUM_THREADS="1")

    def __enter__(self):
        self.root = Path(_run("podman", "image", "mount", self.tag).stdout.strip())
        self.mounts = []
        for args, target in ((["-t", "proc", "proc"], "proc"), (["--rbind", "/dev"], "dev"),
                             (["-t", "tmpfs", "tmpfs"], "tmp")):
            _run("mount", *args, self.root / target)
            self.mounts.append(self.root / target)
        return self

    def __call__(self, script: str, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run(["chroot", str(self.root), "/bin/bash", "-c", script], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd="/")
        if check and proc.returncode != 0:
            raise AssertionError(f"in the image: {script}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-6000:]}")
        return proc

    def __exit__(self, *exc):
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True, timeout=60)
        subprocess.run(["podman", "image", "unmount", self.tag], capture_output=True, timeout=60)


@live_image_timeout
def test_the_image_is_labelled_with_this_checkout(built, tmp_path):
    tag, build = built
    labels = _inspect(tag, "{{json .Config.Labels}}")
    lock_sha = hashlib.sha256((ROOT / "docker" / "lock" / "cpu.txt").read_bytes()).hexdigest()
    assert labels["org.opencontainers.image.revision"] == rundir.git_revision()
    assert labels["io.pixelgen.lock"] == "cpu" and labels["io.pixelgen.lock.sha256"] == lock_sha
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert re.search(r"@sha256:[0-9a-f]{64}$", labels["org.opencontainers.image.base.name"])  # built by digest
    digest = _inspect(tag, "{{json .Digest}}")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    if build:  # not for PIXELGEN_TEST_IMAGE
        assert build.strip().splitlines()[-1] == digest  # make image prints the digest last
    # The labels file docker/convert writes beside an image file is what the submission checks and records.
    sqsh = tmp_path / "pixelgen.sqsh"
    sqsh.write_bytes(b"squashfs stand-in")
    _run(ROOT / "docker" / "convert", "labels", tag, sqsh)
    _, profile = cluster.load_profile(str(_profile(tmp_path, gpus_per_node=4, tasks_per_node=None,
                                                   **{"container.runtime": "pyxis", "container.image": str(sqsh)})))
    info = cluster.check_image(profile)
    assert (info["digest"], info["revision"], info["lock_sha256"]) == (digest, rundir.git_revision(), lock_sha)


@live_image_timeout
def test_the_image_holds_the_lock_and_runs_the_chain(built):
    tag, _ = built
    lock_pins = _pins((ROOT / "docker" / "lock" / "cpu.txt").read_text())
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    with Chroot(tag) as run:
        assert "usage: pixelgen" in run("pixelgen --help").stdout
        # Exactly the lock's packages (and pixelgen, pip): nothing resolved, nothing missing.
        freeze = _pins(run("pip list --format=freeze --disable-pip-version-check").stdout)
        assert freeze.pop("pixelgen") == "0.1.0" and freeze.pop("pip")
        assert freeze == lock_pins
        # Outside a git checkout the revision is the one the image was built from.
        assert run("python -c 'from pipeline.rundir import git_revision; print(git_revision())'").stdout.strip() \
            == rundir.git_revision()
        # DeepSpeed's CPU op is built in: a job neither needs a compiler nor a writable cache for it.
        assert run("python -c 'from deepspeed.git_version_info import installed_ops as o; "
                   "print(bool(o[\"deepspeed_shm_comm\"]))'").stdout.splitlines()[-1] == "True"
        # No certificate or secret in a layer: the build's CA bundle was a secret mount.
        assert not (run.root / "run" / "secrets" / "ca").exists()
        assert "PIP_CERT" not in run.env
        if host_ca.is_file():
            image_ca = (run.root / "etc/ssl/certs/ca-certificates.crt")
            own = set(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END", host_ca.read_text(), re.S))
            theirs = set(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END", image_ca.read_text(), re.S)) \
                if image_ca.is_file() else set()
            for cert in own - theirs:  # the host's own CAs (this network re-signs TLS) are in no file of the
                needle = cert.splitlines()[1]  # image's /etc or /opt (below 1 MiB: a bundle, not a library)
                files = subprocess.run(["find", str(run.root / "opt"), str(run.root / "etc"), "-type", "f", "-size",
                                        "-1024k", "-print0"], capture_output=True, timeout=300, check=True).stdout
                found = subprocess.run(["xargs", "-0", "grep", "-lF", needle], input=files, capture_output=True,
                                       timeout=300)
                assert found.returncode == 123 and not found.stdout, found.stdout[:2000]  # 123: no grep matched
        # A job submitted from another revision stops before its pickle is read.
        stop = run(f"{image.SUBMIT_ENV}={'0' * 40} python -m pipeline.jobstart -u -m submitit.core._submit /tmp/j",
                   check=False)
        assert stop.returncode == image.EXIT_MISMATCH and f"holds pixelgen {rundir.git_revision()}" in stop.stderr
        # The tiny chain: shards, both training stages on DeepSpeed (gloo), FID, in the image's own Python.
        run("pixelgen fake-imagenet /tmp/in --classes 4 --train-per-class 12 --val-per-class 4 --size 24")
        chain = run("cd /opt/pixelgen && pixelgen run configs/tiny.yaml run_dir=/tmp/run data.imagenet_dir=/tmp/in",
                    timeout=1500)
        assert all((run.root / "tmp" / "run" / stage / "DONE.json").is_file()
                   for stage in ("shard", "train_trunk", "train_decoder", "fid")), chain.stdout[-3000:]
        fid = json.loads((run.root / "tmp" / "run" / "fid" / "DONE.json").read_text())
        assert fid, chain.stdout[-3000:]
        run_json = json.loads((run.root / "tmp" / "run" / "run.json").read_text())
        assert run_json["git_revision"] == rundir.git_revision()
