"""The precision choice shared by training (`train_*.precision`) and sampling (`sampler.precision`)."""

from __future__ import annotations

import contextlib
from enum import StrEnum

import torch


class Precision(StrEnum):
    auto = "auto"  # bf16 on a GPU, fp32 on the CPU
    bf16 = "bf16"
    fp32 = "fp32"


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == Precision.bf16 or (precision == Precision.auto and torch.device(device).type == "cuda")


def autocast(precision: str, device):
    """The network's ops in bf16 where `precision` says so (matmuls and convolutions; elementwise arithmetic on
    fp32 tensors, like an ODE state, stays fp32), and on a GPU TF32 for the matmuls left in fp32 (norms and
    RoPE that compute in fp32 on purpose), restored on leaving so that what runs outside (the Inception
    features of FID) stays strict fp32. Otherwise no autocast of its own, so a caller's stays in force: the
    sample grids of a bf16 training run meet the module's bf16 weights; `fp32` is strict fp32, for checks."""
    device = torch.device(device)
    if not use_bf16(precision, device):
        return contextlib.nullcontext()
    return _bf16(device)


@contextlib.contextmanager
def _bf16(device: torch.device):
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_matmul_precision("high"))  # TF32
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        yield


@contextlib.contextmanager
def _matmul_precision(value: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
