"""Model FLOPs of a training step, counted once by FlopCounterMode, and the MFU they imply."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs people train on, by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1}


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counter() -> FlopCounterMode:
    # The CPU kernel of scaled_dot_product_attention is missing from FlopCounterMode's table (it would count
    # nothing for attention); it does the same two matmuls as the GPU kernels.
    flash_cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=flash_cpu)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The device's peak for MFU: the configured value, else a known GPU's bf16 peak; None on a CPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


@contextlib.contextmanager
def maybe_count(enabled: bool):
    """Count the FLOPs of the block when enabled; yields the counter (or None)."""
    if not enabled:
        yield None
        return
    c = counter()
    with c:
        yield c
