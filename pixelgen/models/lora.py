"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning a frozen encoder."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) * B(A(x)) with the base Linear frozen.

    A gets the LoRA paper's kaiming-uniform init and B zeros, so wrapping changes nothing until B trains.
    alpha = rank (scale 1), the reference implementation's default: the update's size then does not depend on the
    rank chosen. Deliberately exposes no `.weight`: code that reads the weight directly (bypassing forward, e.g.
    timm's Eva attention with a qkv bias) fails loudly instead of silently skipping the adapter.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = 1.0  # alpha / rank with alpha = rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(module: nn.Module, rank: int, targets=("qkv", "proj", "fc1", "fc2")) -> list[str]:
    """Wrap every nn.Linear child of `module` named one of `targets` in a LoRALinear, in place, and freeze all of
    `module` but the adapters. Returns the names of the wrapped Linears."""
    to_wrap = [(name, parent, child_name)
               for name, parent in module.named_modules()
               for child_name, child in parent.named_children()
               if child_name in targets and isinstance(child, nn.Linear)]
    for _, parent, child_name in to_wrap:
        setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank))
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return [f"{name}.{child_name}" if name else child_name for name, _, child_name in to_wrap]
