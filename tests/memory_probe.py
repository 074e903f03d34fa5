"""Measures the CPU memory one training step takes, for tests/test_memory.py.

    MALLOC_MMAP_THRESHOLD_=65536 python -m tests.memory_probe SPEC_JSON

spec: {"resolution": int, "batch": int, "num_classes": int,
       "cases": [{"trunk": {...}, "decoder": {...}, "precision": "fp32" | "bf16"}, ...]}
(the dicts are TrunkConfig / DecoderConfig keyword arguments; bf16 casts the model and the batch, like
DeepSpeed's bf16 mode). Prints one JSON list with, per case, the bytes
resident before the step and the peak during it.

Each case runs in a child forked after the imports, so it starts from an interpreter that has allocated no
tensor yet and pays the ~5 s import of torch once. The environment must make glibc hand every large block back
to the OS on free (MALLOC_MMAP_THRESHOLD_), so that resident memory follows the live tensors.

The peak is the kernel's resident high-water mark (VmHWM) after resetting it through /proc/self/clear_refs:
exact, where a sampling thread could miss a short peak, and resettable after the warm-up step, where
getrusage's ru_maxrss keeps the warm-up's peak (which also pays one-off lazy initialisations).
"""

import gc
import json
import os
import sys

import torch

from pixelgen.diffusion import FlowMatching
from pixelgen.families import build_generator
from pixelgen.models.config import DecoderConfig, ModelConfig, ObjectiveConfig, TrunkConfig


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(case: dict, resolution: int, batch: int, num_classes: int) -> dict:
    cfg = ModelConfig(trunk=TrunkConfig(**case["trunk"]), decoder=DecoderConfig(**case["decoder"]),
                      num_classes=num_classes)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case["precision"]]
    torch.manual_seed(0)
    model = build_generator(cfg, resolution).to(dtype)
    x0 = torch.randn(batch, 3, resolution, resolution, dtype=dtype)
    y = torch.randint(0, num_classes, (batch,))
    objective = FlowMatching(ObjectiveConfig(), num_classes, cfg.class_dropout)
    # Gradients allocated up front: backward then accumulates into them in place, so they belong to the
    # baseline and the step's growth is activations plus backward's transient buffers.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        loss, _ = objective.loss(model, x0, y)
        loss.backward()

    step()  # warm-up: one-off lazy initialisations stay resident and out of the measured growth
    gc.collect()
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    step()
    return {"before": before, "peak": peak_resident_bytes()}


def in_child(fn) -> dict:
    """fn()'s JSON result, computed in a child forked from this process (so it starts from what the parent
    holds, and allocates nothing in it); a failure comes back as {"error": ...}."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            out = fn()
        except BaseException as e:  # the parent reports it; a child must never return into the parent's code
            out, code = {"error": f"{type(e).__name__}: {e}"}, 1
        os.write(write_fd, json.dumps(out).encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    results = [in_child(lambda case=case: measure(case, spec["resolution"], spec["batch"], spec["num_classes"]))
               for case in spec["cases"]]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
