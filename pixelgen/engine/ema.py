"""Exponential moving averages of the trainable parameters, one per decay, kept in fp32 whatever the
training precision. Under ZeRO-3 the parameters are gathered for the update, so every rank holds the full
averages (simple and exact; sharding them like the parameters would save memory at XL scale)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decays: list[float]):
        self.decays = [float(d) for d in decays]
        self.params = dict(named_params)
        with _gathered(list(self.params.values())):
            self.shadows = [{n: p.detach().float().clone() for n, p in self.params.items()} for _ in self.decays]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """`applied`: 1.0 when the optimizer step happened, 0.0 when it was skipped (a device tensor, so the
        loop never waits for the host); a skipped step leaves the averages as they were."""
        names = list(self.params)
        with _gathered(list(self.params.values())):
            current = [self.params[n].detach().float() for n in names]
            for decay, shadow in zip(self.decays, self.shadows):
                weight = 1.0 - decay if applied is None else (1.0 - decay) * applied
                torch._foreach_lerp_([shadow[n] for n in names], current, weight)

    def state_dict(self) -> dict:
        return {"decays": self.decays, "shadows": [{n: t.cpu() for n, t in s.items()} for s in self.shadows]}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"{source} holds EMAs with decays {state['decays']} but the config asks for "
                             f"{self.decays} (key 'ema_decays'): set it back to resume, or start the stage afresh")
        for shadow, saved in zip(self.shadows, state["shadows"]):
            missing = set(shadow) - set(saved)
            if missing:
                raise KeyError(f"{source}: EMA state lacks {sorted(missing)[:5]}; it was made for another model")
            for n, t in shadow.items():
                t.copy_(saved[n])

    def averaged(self, index: int) -> dict[str, torch.Tensor]:
        return self.shadows[index]

    @contextlib.contextmanager
    def swapped_in(self, index: int = 0):
        """Temporarily put one EMA into the live parameters (for sampling), then restore them."""
        shadow = self.shadows[index]
        with _gathered(list(self.params.values()), modify=True):
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(shadow[n].to(p.dtype))
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(backup[n])


def _gathered(params, modify: bool = False):
    """ZeRO-3 partitions parameters; gather them for the duration (a no-op for stages 0-2)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()
