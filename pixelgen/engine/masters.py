"""The fp32 master weights: where DeepSpeed keeps them, and which piece of each one this rank holds.

The optimizer updates fp32 masters; under bf16 the module's parameters are only their bf16 rounding, and
under ZeRO the masters are partitioned over the ranks. The EMA averages these pieces in place of the module's
weights and the export assembles them, through the same `Piece`, so the two cannot disagree.

| run                                   | masters                                   | this rank's piece           |
|---------------------------------------|-------------------------------------------|-----------------------------|
| fp32, ZeRO-0                          | the parameters themselves                 | all of each                 |
| bf16, ZeRO-0 (FP16_UnfusedOptimizer)  | `optimizer.fp32_groups`, one per param    | all of each                 |
| ZeRO-1/2, and bf16 ZeRO-1 (BF16_Optimizer) | flat partitions, `param._hp_mapping` | a contiguous fragment of the flattened parameter, maybe empty |
| ZeRO-3                                | flat partitions (`fp32_partitioned_groups_flat`) | rank r's padded partition, elements [r*n, (r+1)*n) |

Each piece is a view into the optimizer's own storage, so it holds the current masters after every step with
nothing copied. Resolving a ZeRO-3 piece synchronises DeepSpeed's reduce stream: do it once (and again after
a checkpoint load), never per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def overlap(start: int, numel: int, total: int) -> int:
    """How many of the `numel` elements from `start` lie inside a flattened parameter of `total` (a ZeRO-3
    partition's padding lies past its end)."""
    return max(0, min(numel, total - start))


@dataclass(frozen=True)
class Piece:
    """This rank's part of one parameter's fp32 master: `tensor` (flat when `sharded`, else shaped like the
    parameter) holds elements [start, start + tensor.numel()) of the flattened parameter; a ZeRO-3 partition
    may run past the end (padding)."""

    tensor: torch.Tensor
    start: int
    shape: tuple[int, ...]
    sharded: bool

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    def full(self, local: torch.Tensor | None = None, keep: bool = True) -> torch.Tensor | None:
        """The whole parameter, in fp32 on the CPU, from every rank's `local` (default: the masters) laid out
        like this piece. Collective when sharded: every rank calls it for the same parameters in the same order;
        ranks with keep=False take part and get None."""
        local = self.tensor if local is None else local
        if not self.sharded:
            return local.detach().float().cpu().clone().reshape(self.shape) if keep else None
        total = math.prod(self.shape)
        buffer = torch.zeros(total, dtype=torch.float32, device=local.device)
        inside = overlap(self.start, local.numel(), total)
        if inside:
            buffer[self.start:self.start + inside] = local.reshape(-1)[:inside]
        torch.distributed.all_reduce(buffer)  # the pieces are disjoint and cover the parameter
        return buffer.reshape(self.shape).cpu() if keep else None


def pieces(engine, named_params: list[tuple[str, nn.Parameter]]) -> dict[str, Piece]:
    """This rank's piece of the fp32 master of each trainable parameter. `engine` None: the parameters are
    their own masters (fp32 outside DeepSpeed)."""
    optimizer = getattr(engine, "optimizer", None)
    unfused = {}  # bf16 ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer keeps one fp32 copy per parameter
    for low, high in zip(getattr(optimizer, "fp16_groups", None) or [], getattr(optimizer, "fp32_groups", None) or []):
        for p, q in zip(low, high):
            if isinstance(q, torch.Tensor) and q.shape == p.shape:
                unfused[id(p)] = q
    return {name: _piece(p, unfused.get(id(p)), name, engine is not None) for name, p in named_params}


def _piece(p: nn.Parameter, unfused: torch.Tensor | None, name: str, in_deepspeed: bool) -> Piece:
    if hasattr(p, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(p)
        if local is None:
            raise RuntimeError(f"parameter '{name}' is partitioned by ZeRO-3 but has no fp32 master: is it trainable?")
        rank = torch.distributed.get_rank()
        return Piece(local.detach(), rank * p.ds_tensor.ds_numel, tuple(p.ds_shape), sharded=True)
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and BF16_Optimizer: a fragment, or nothing, on this rank
        mapping = p._hp_mapping
        if mapping is None:
            return Piece(torch.empty(0, dtype=torch.float32, device=p.device), 0, tuple(p.shape), sharded=True)
        return Piece(mapping.get_hp_fragment().detach(), mapping.lp_fragment_address.start, tuple(p.shape),
                     sharded=True)
    if unfused is not None:
        return Piece(unfused.detach(), 0, tuple(p.shape), sharded=False)
    if in_deepspeed and p.dtype != torch.float32:
        raise RuntimeError(f"parameter '{name}' is {p.dtype} and DeepSpeed holds no fp32 master of it; the EMA and "
                           f"the export need one (is the optimizer one pixelgen knows?)")
    return Piece(p.detach(), 0, tuple(p.shape), sharded=False)
