"""AdamW that skips a step with a non-finite loss or gradient on the device, without a host sync.

The fused AdamW kernel takes a `found_inf` tensor (the hook torch's GradScaler uses) and leaves parameters,
moments and step count untouched where it is nonzero. Under DeepSpeed this optimizer is the inner one, so
`step` sees whatever DeepSpeed hands it (the flat fp32 partitions under ZeRO); each rank checks its own part
and one all-reduce makes every rank skip together.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SkippingAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.loss_nonfinite: torch.Tensor | None = None  # set by the loop before the step: any micro-batch bad
        self.skipped: torch.Tensor | None = None  # after a step: 1.0 if it was skipped, else 0.0 (on the device)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else self.param_groups[0]["params"][0].device
        norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=device)]
        bad = ~torch.isfinite(torch.stack([n.float() for n in norms]).sum())
        if self.loss_nonfinite is not None:
            bad = bad | self.loss_nonfinite.to(device)
        found_inf = bad.float()  # 0-dim, like the step counters it is subtracted from
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        self.found_inf = found_inf
        try:
            return super().step(closure)
        finally:
            self.skipped = found_inf
            self.found_inf = None


def param_groups(named: list[tuple[str, nn.Parameter]], lr_of: Callable[[str], float]) -> list[dict]:
    """One optimizer group per distinct learning rate (the decoder stage can fine-tune the trunk slower)."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in named:
        groups.setdefault(float(lr_of(name)), []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]
