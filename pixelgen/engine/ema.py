"""Exponential moving average of the trainable parameters, kept in fp32 whatever the training precision."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.params = dict(named_params)
        with _gathered(list(self.params.values())):
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.params)
        with _gathered(list(self.params.values())):
            current = [self.params[n].detach().float() for n in names]
            torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}: the checkpoint was made for another model")
        for n, t in self.shadow.items():
            t.copy_(state[n])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the live parameters (for sampling), then restore them."""
        with _gathered(list(self.params.values()), modify=True):
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n].to(p.dtype))
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
