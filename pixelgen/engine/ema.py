"""Exponential moving averages of the trainable parameters, one per decay, kept in fp32 whatever the training
precision.

Under ZeRO-3 each rank averages only its own partition of every parameter (`ds_tensor`), so the averages are
sharded like the weights: no gather per step and 1/N of the memory. They travel in each rank's own DeepSpeed
model-states file (ZeRO-3 writes one per rank), and are gathered only to export or to sample.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _local(p: nn.Parameter) -> torch.Tensor:
    """The part of the parameter this rank holds: its ZeRO-3 partition (flat, padded), else all of it."""
    return (p.ds_tensor if _is_zero3(p) else p).detach()


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.params = dict(named_params)
        self.sharded = any(_is_zero3(p) for p in self.params.values())
        self.shadows = [{n: _local(p).float().clone() for n, p in self.params.items()} for _ in self.decays]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """`applied`: 1.0 when the optimizer step happened, 0.0 when it was skipped (a device tensor, so the
        loop never waits for the host); a skipped step leaves the averages as they were."""
        names = list(self.params)
        current = [_local(self.params[n]).float() for n in names]
        for decay, shadow in zip(self.decays, self.shadows):
            targets = [shadow[n] for n in names]
            if applied is None:
                torch._foreach_lerp_(targets, current, 1.0 - decay)
            else:
                # One weight tensor per parameter: a single 0-dim tensor binds to the Scalar overload and is read
                # on the host (.item(), a sync every step); the List overload keeps it on the device.
                weight = (1.0 - decay) * applied
                torch._foreach_lerp_(targets, current, [weight] * len(targets))

    def state_dict(self) -> dict:
        """This rank's averages (its shards under ZeRO-3)."""
        return {"decays": self.decays, "sharded": self.sharded,
                "shadows": [{n: t.cpu() for n, t in s.items()} for s in self.shadows]}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"{source} holds EMAs with decays {state['decays']} but the config asks for "
                             f"{self.decays} (key 'ema_decays'): set it back to resume, or start the stage afresh")
        if state.get("sharded", False) != self.sharded:
            raise ValueError(f"{source} was written {'with' if state.get('sharded') else 'without'} ZeRO-3 and "
                             f"this run is {'with' if self.sharded else 'without'} it (key 'zero_stage'): set it "
                             f"back to resume, or start the stage afresh")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            missing = set(shadow) - set(saved)
            if missing:
                raise KeyError(f"{source}: EMA state lacks {sorted(missing)[:5]}; it was made for another model")
            for n, t in shadow.items():
                t.copy_(saved[n])

    def full(self, index: int, keep: bool = True) -> dict[str, torch.Tensor]:
        """One EMA as full fp32 tensors on the CPU. Collective under ZeRO-3 (every rank calls it); ranks with
        keep=False take part in the gathers and get {}."""
        shadow = self.shadows[index]
        if not self.sharded:
            return {n: t.cpu() for n, t in shadow.items()}
        world = torch.distributed.get_world_size()
        out = {}
        for n, p in self.params.items():
            parts = [torch.empty_like(shadow[n]) for _ in range(world)]
            torch.distributed.all_gather(parts, shadow[n])
            if keep:  # partitions are contiguous slices of the flattened parameter, padded at the end
                out[n] = torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu()
        return out

    @contextlib.contextmanager
    def swapped_in(self, index: int = 0):
        """Temporarily put one EMA into the live parameters (for sampling), then restore them.

        Under ZeRO-3 the parameters stay gathered for the whole block (sampling never waits on ZeRO's
        prefetch) and rank 0 alone writes them; the other ranks compute with the training weights, which is
        harmless because only rank 0 keeps the samples. On leaving, DeepSpeed re-partitions rank 0's restored
        values."""
        writer = not self.sharded or torch.distributed.get_rank() == 0
        values = self.full(index, keep=writer)  # collective under ZeRO-3
        with _gathered_for_rank0_writes(list(self.params.values())):
            backup = {}
            with torch.no_grad():
                for n, p in self.params.items() if writer else ():
                    backup[n] = p.detach().clone()
                    p.copy_(values[n].to(p.device, p.dtype))
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, p in self.params.items() if writer else ():
                        p.copy_(backup[n])


def _gathered_for_rank0_writes(params):
    """ZeRO-3 partitions parameters: gather them for the duration, re-partitioning rank 0's values on leaving
    (a no-op for stages 0-2)."""
    if any(_is_zero3(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()
