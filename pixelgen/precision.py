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
    fp32 tensors, like an ODE state, stays fp32). Otherwise no autocast of its own, so a caller's stays in force:
    the sample grids of a bf16 training run meet the module's bf16 weights."""
    device = torch.device(device)
    if not use_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
