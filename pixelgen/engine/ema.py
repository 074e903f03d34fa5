"""Exponential moving averages of the fp32 master weights, one per decay.

Each EMA averages what the optimizer updates: DeepSpeed's fp32 masters (pixelgen/engine/masters.py), not the
module's parameters, which under bf16 are only their rounding (an average of those follows a staircase
quantised to bf16). Under ZeRO the masters are partitioned, and so are the averages: each rank averages its
own piece of every parameter (a ZeRO-1/2 fragment, a ZeRO-3 partition), with no communication per step and
1/N of the memory. The pieces are assembled only to export or to sample; each rank's shard is saved in its
own file of the checkpoint (engine/checkpoint.py), with the layout that a reshard needs.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from pixelgen.engine import masters


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decays: list[float], engine=None):
        """`engine`: the DeepSpeed engine whose optimizer holds the masters; None for parameters that are
        their own masters (outside DeepSpeed)."""
        self.decays = [float(d) for d in decays]
        self.params = dict(named_params)
        self.engine = engine
        self.bind()
        self.shadows = [{n: pc.tensor.float().clone() for n, pc in self.pieces.items()} for _ in self.decays]

    def bind(self) -> None:
        """Resolve this rank's piece of every master (views into the optimizer's storage). Done at the start
        and again when a checkpoint is loaded, never per step (a ZeRO-3 lookup waits for DeepSpeed's stream)."""
        self.pieces = masters.pieces(self.engine, list(self.params.items()))
        self.sharded = any(pc.sharded for pc in self.pieces.values())
        self._names = [n for n, pc in self.pieces.items() if pc.numel]  # a rank may hold nothing of a parameter

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """`applied`: 1.0 when the optimizer step happened, 0.0 when it was skipped (a device tensor, so the
        loop never waits for the host); a skipped step leaves the averages as they were."""
        current = [self.pieces[n].tensor.float() for n in self._names]  # fp32 masters: no copy
        for decay, shadow in zip(self.decays, self.shadows):
            targets = [shadow[n] for n in self._names]
            if not targets:
                continue
            if applied is None:
                torch._foreach_lerp_(targets, current, 1.0 - decay)
            else:
                # One weight tensor per parameter: a single 0-dim tensor binds to the Scalar overload and is read
                # on the host (.item(), a sync every step); the List overload keeps it on the device.
                weight = (1.0 - decay) * applied
                torch._foreach_lerp_(targets, current, [weight] * len(targets))

    def layout(self) -> dict[str, list]:
        """Where each shard lies in its flattened parameter: {name: [start, numel, shape]}."""
        return {n: [pc.start, pc.numel, list(pc.shape)] for n, pc in self.pieces.items()}

    def state_dict(self) -> dict:
        """This rank's averages (its shards when sharded) and where they lie."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return {"decays": self.decays, "sharded": self.sharded, "layout": self.layout(), "world_size": world,
                "shadows": [{n: t.cpu() for n, t in s.items()} for s in self.shadows]}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Load averages saved by `state_dict`, after the engine's own checkpoint is loaded (the masters are
        looked up again). Full averages (an unsharded run's) are cut into this rank's pieces; shards load only
        into the same partitioning."""
        self.bind()
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"{source} holds EMAs with decays {state['decays']} but the config asks for "
                             f"{self.decays} (key 'ema_decays'): set it back to resume, or start the stage afresh")
        saved_sharded = state.get("sharded", False)
        if saved_sharded and not self.sharded:
            raise ValueError(f"{source} holds EMA shards of a ZeRO run and this run keeps whole EMAs (key "
                             f"'zero_stage'): set it back to resume, or start the stage afresh")
        if saved_sharded:
            self._check_same_partitioning(state, source)
        for shadow, saved in zip(self.shadows, state["shadows"]):
            missing = set(shadow) - set(saved)
            if missing:
                raise KeyError(f"{source}: EMA state lacks {sorted(missing)[:5]}; it was made for another model")
            for n, t in shadow.items():
                t.copy_(saved[n] if saved_sharded else self._cut(n, saved[n], source))

    def _cut(self, name: str, whole: torch.Tensor, source: str) -> torch.Tensor:
        """This rank's piece of a whole average (zero where a ZeRO-3 partition is padding)."""
        pc = self.pieces[name]
        if tuple(whole.shape) != pc.shape:
            raise ValueError(f"{source}: the EMA of '{name}' has shape {list(whole.shape)}, the model's is "
                             f"{list(pc.shape)}; it was made for another model")
        if not pc.sharded:
            return whole
        flat = whole.reshape(-1).float()
        out = torch.zeros(pc.numel, dtype=torch.float32)
        inside = masters.overlap(pc.start, pc.numel, flat.numel())
        out[:inside] = flat[pc.start:pc.start + inside]
        return out

    def _check_same_partitioning(self, state: dict, source: str) -> None:
        saved_world = state.get("world_size")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        saved_layout = state.get("layout")
        if saved_layout is None:  # ZeRO-3 shards saved before the layout was recorded: compare their sizes
            here = self.layout()
            same = all(t.numel() == here[n][1] for n, t in state["shadows"][0].items() if n in here)
        else:
            same = all(saved_layout.get(n, [None, None])[:2] == v[:2] for n, v in self.layout().items())
        if not same or (saved_world is not None and saved_world != world):
            raise ValueError(f"{source} holds EMA shards partitioned for {saved_world or 'another number of'} "
                             f"ranks and another ZeRO stage or model than this run ({world} ranks): relaunch as "
                             f"it was written to resume it")

    def full(self, index: int, keep: bool = True) -> dict[str, torch.Tensor]:
        """One EMA as full fp32 tensors on the CPU. Collective when sharded (every rank calls it); ranks with
        keep=False take part in the gathers and get {}."""
        shadow = self.shadows[index]
        out = {n: pc.full(shadow[n], keep) for n, pc in self.pieces.items()}
        return out if keep else {}

    @contextlib.contextmanager
    def swapped_in(self, index: int = 0):
        """Temporarily put one EMA into the live parameters (for sampling), then restore them.

        Under ZeRO-3 the parameters stay gathered for the whole block (sampling never waits on ZeRO's
        prefetch) and rank 0 alone writes them; the other ranks compute with the training weights, which is
        harmless because only rank 0 keeps the samples. On leaving, DeepSpeed re-partitions rank 0's restored
        values."""
        zero3 = any(_is_zero3(p) for p in self.params.values())
        writer = not zero3 or torch.distributed.get_rank() == 0
        values = self.full(index, keep=writer)  # collective when sharded
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


def whole_state(shards: list[dict]) -> dict:
    """One unsharded EMA state from every rank's sharded `state_dict` (in rank order), as an unsharded run
    saves it: offline, from the checkpoint's rank files, with the layout each shard recorded."""
    first = shards[0]
    if not first.get("sharded"):
        return first
    if len(shards) != first.get("world_size", len(shards)) or "layout" not in first:
        raise ValueError(f"need the shards of all {first.get('world_size')} ranks, each with its layout; got "
                         f"{len(shards)}")
    whole = []
    for i in range(len(first["decays"])):
        out = {}
        for name, (_, _, shape) in first["layout"].items():
            flat = torch.zeros(math.prod(shape), dtype=torch.float32)
            for shard in shards:
                start, numel, _ = shard["layout"][name]
                inside = masters.overlap(start, numel, flat.numel())
                flat[start:start + inside] = shard["shadows"][i][name].reshape(-1)[:inside]
            out[name] = flat.reshape(shape)
        whole.append(out)
    return {"decays": first["decays"], "sharded": False, "shadows": whole}
