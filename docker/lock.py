"""The image's and the test venv's hash-locked package sets, made by uv from pyproject.toml.

    python docker/lock.py             # regenerate docker/lock/*.txt, keeping every pin pyproject still allows
    python docker/lock.py --upgrade   # the newest versions pyproject allows
    python docker/lock.py --check     # exit 1 when pyproject.toml and the locks disagree (no network)
    python docker/lock.py --split docker/lock/cpu.txt OUT   # OUT/first.txt, then OUT/deepspeed.txt

One file per base, each installed with `pip install --require-hashes --no-deps`:
- cpu.txt: everything for the plain Python 3.11 base (torch and its CUDA wheels too, as the registry ships
  them) and the `test` extra; the venv of `make test` installs it as well.
- cuda.txt: everything for the CUDA base (NGC PyTorch, Python 3.12) but what the base provides and must keep:
  torch, torchvision, triton and the nvidia-*/cuda-* libraries (TORCH_STACK).
DeepSpeed is an sdist whose build imports torch, so `--split` cuts it out to be installed second, without
build isolation. uv (pinned below) resolves for the target platform and Python rather than for this machine,
and keeps the existing pins as preferences. Each file starts with a fingerprint of its inputs, which
`--check` compares.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "docker" / "lock"
UV = "uv==0.13.9"
INDEX = "https://pypi.org/simple"
PLATFORM = "x86_64-manylinux_2_28"
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|pytorch-triton|nvidia-.*|cuda-.*)$")
SEPARATE = "deepspeed"


@dataclass(frozen=True)
class Target:
    name: str
    python: str
    extras: tuple[str, ...]
    base_provides: bool  # leave TORCH_STACK to the base image


TARGETS = (Target("cpu", "3.11", ("test",), False), Target("cuda", "3.12", (), True))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fingerprint(pyproject: Path, target: Target) -> str:
    """What the lock was made from: pyproject's dependencies (and the target's extras) and the target."""
    project = tomllib.loads(pyproject.read_text())["project"]
    data = {"dependencies": project["dependencies"], "requires-python": project.get("requires-python"),
            "extras": {e: project.get("optional-dependencies", {}).get(e) for e in target.extras},
            "target": [target.name, target.python, PLATFORM, target.base_provides, SEPARATE]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def pins_of(text: str) -> dict[str, tuple[str, int]]:
    """{normalized name: (version, number of hashes)} of the `name==version` requirements in `text`."""
    pins = {}
    for name, lines in stanzas(text):
        if name and (m := re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==([^\s\\;]+)", lines)):
            pins[name] = (m[1], lines.count("--hash=sha256:"))
    return pins


def read_lock(path: Path) -> dict[str, tuple[str, int]]:
    return pins_of(path.read_text())


def header_fingerprint(path: Path) -> str | None:
    first = path.read_text().split("\n", 1)[0]
    return first.split("inputs-sha256=", 1)[1].strip() if "inputs-sha256=" in first else None


def check(root: Path = ROOT) -> list[str]:
    """Where pyproject.toml and the locks disagree, one line each (empty: they agree)."""
    from packaging.requirements import Requirement

    pyproject = root / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    lock_dir = root / "docker" / "lock"
    problems = []
    for target in TARGETS:
        path = lock_dir / f"{target.name}.txt"
        if not path.is_file():
            problems.append(f"{path} is missing: run `make lock`")
            continue
        if header_fingerprint(path) != fingerprint(pyproject, target):
            problems.append(f"{path} was made from another pyproject.toml (its dependencies changed since): "
                            f"run `make lock`")
        pins = read_lock(path)
        if SEPARATE not in pins:
            problems.append(f"{path} has no {SEPARATE} pin: run `make lock`")
        wanted = list(project["dependencies"])
        for extra in target.extras:
            wanted += project.get("optional-dependencies", {}).get(extra, [])
        for spec in wanted:
            req = Requirement(spec)
            name = normalize(req.name)
            if target.base_provides and TORCH_STACK.match(name):
                if name in pins:
                    problems.append(f"{path}: {name} is the base image's, it must not be in the lock")
                continue
            if name not in pins:
                problems.append(f"{path}: pyproject.toml needs {spec!r}, the lock has no {name}: run `make lock`")
            elif not req.specifier.contains(pins[name][0], prereleases=True):
                problems.append(f"{path}: pyproject.toml needs {spec!r}, the lock pins {name}=={pins[name][0]}: "
                                f"run `make lock`")
        for name, (version, hashes) in pins.items():
            if hashes == 0:
                problems.append(f"{path}: {name}=={version} has no --hash: run `make lock`")
    return problems


def uv(*args: str) -> str:
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", "--index-url", INDEX, "--quiet", *args]
    env = {**os.environ, "UV_NO_CONFIG": "1"}
    env.setdefault("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout


def stanzas(text: str) -> list[tuple[str | None, str]]:
    """A uv requirements file as (normalized package name or None for comments, its lines), in order."""
    out: list[tuple[str | None, str]] = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.startswith((" ", "#")):
            out.append((normalize(re.split(r"[=<>;\s]", line, maxsplit=1)[0]), line))
        elif out and line.startswith(" "):
            out[-1] = (out[-1][0], out[-1][1] + line)
        else:
            out.append((None, line))
    return out


def generate(upgrade: bool) -> None:
    if importlib.util.find_spec("uv") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", UV], check=True)
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for target in TARGETS:
        path = LOCK_DIR / f"{target.name}.txt"
        # -o: uv keeps the pins already in the file unless --upgrade
        uv("--python-version", target.python, "--python-platform", PLATFORM, "--generate-hashes",
           "--custom-compile-command", "make lock", "-o", str(path), *(["--upgrade"] if upgrade else []),
           *(a for e in target.extras for a in ("--extra", e)))
        kept = [text for name, text in stanzas(path.read_text())
                if not (target.base_provides and name and TORCH_STACK.match(name))]
        path.write_text(f"# inputs-sha256={fingerprint(ROOT / 'pyproject.toml', target)}\n" + "".join(kept))
    problems = check()
    if problems:
        raise SystemExit("\n".join(problems))
    for f in sorted(LOCK_DIR.glob("*.txt")):
        print(f"{f.relative_to(ROOT)}: {len(read_lock(f))} packages")


def split(lock: Path, out: Path) -> None:
    """Write `out`/first.txt (all but DeepSpeed) and `out`/deepspeed.txt (DeepSpeed alone) from a lock, to be
    installed in this order: DeepSpeed's build imports torch, which pip would not have installed yet."""
    parts = stanzas(lock.read_text())
    second = [text for name, text in parts if name == SEPARATE]
    if not second:
        raise SystemExit(f"{lock} has no {SEPARATE} pin: run `make lock`")
    out.mkdir(parents=True, exist_ok=True)
    (out / "first.txt").write_text("".join(text for name, text in parts if name != SEPARATE))
    (out / f"{SEPARATE}.txt").write_text("".join(second))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upgrade", action="store_true", help="take the newest versions pyproject.toml allows")
    ap.add_argument("--check", action="store_true", help="only compare pyproject.toml with the locks")
    ap.add_argument("--split", nargs=2, metavar=("LOCK", "OUT"), help="write OUT/first.txt and OUT/deepspeed.txt")
    ap.add_argument("--pins", metavar="LOCK", help="print LOCK's pins without hashes (a pip constraints file)")
    args = ap.parse_args()
    if args.pins:
        print("\n".join(f"{n}=={v}" for n, (v, _) in read_lock(Path(args.pins)).items()))
        return
    if args.split:
        split(Path(args.split[0]), Path(args.split[1]))
        return
    if args.check:
        problems = check()
        print("\n".join(problems) or "the locks agree with pyproject.toml")
        raise SystemExit(1 if problems else 0)
    generate(args.upgrade)


if __name__ == "__main__":
    main()
