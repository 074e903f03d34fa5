"""Training-memory estimate per GPU for a generator config: model states under ZeRO plus activations.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, sec. 3.1) per trainable parameter:
bf16 mixed precision = 2 B weights + 2 B gradients + 12 B optimizer states (fp32 master weights, Adam m and v);
fp32 = 4 + 4 + 8. Stage 1 splits the optimizer states over the data-parallel ranks, stage 2 also the gradients,
stage 3 also the weights. Frozen parameters cost their weights only. The trainer's EMA (pixelgen.engine.ema) is
an fp32 copy of the trainable parameters per entry of `ema_decays`, partitioned like the fp32 masters it
averages (from stage 1), and is counted apart. Not counted: DeepSpeed's
communication buckets, the CUDA context and allocator fragmentation, the REPA / DINO teachers, the data.

Activations are not written as per-layer formulas (they would go stale with every new block kind): one training
step's forward (the generator plus its family's loss, pixelgen.families) is traced on fake tensors, and the bytes of the tensors
autograd saves for backward are counted (see `_trace`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves

from .config import ModelConfig

PRECISIONS = ("bf16", "fp32")
# Bytes per trainable parameter: (weights, gradients, optimizer states incl. any fp32 master copy).
_STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_EMA_BYTES = 4  # fp32 shadow per trainable parameter, replicated on every rank
_PARTS = ("trunk", "decoder")  # the generator's parts whose `blocks` ModuleList can be checkpointed

GiB = 2**30

__all__ = ["GiB", "PRECISIONS", "MemoryEstimate", "estimate_memory", "model_state_bytes"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (GPU) for one training step; see the module docstring for what is and is not counted."""

    params_total: int
    params_trainable: int
    batch_size: int  # per rank
    world_size: int
    zero_stage: int
    precision: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    activations_per_sample: int  # no activation checkpointing anywhere
    activations_per_sample_checkpointed: int  # every trunk and decoder block recomputed in backward
    activations_per_sample_configured: int  # with the config's own trunk/decoder activation_checkpointing

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.ema_bytes

    @property
    def activation_bytes(self) -> int:
        return self.activations_per_sample_configured * self.batch_size

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes

    def table(self) -> str:
        rows = [
            ("parameters (total / trainable)", f"{self.params_total / 1e6:.1f}M / {self.params_trainable / 1e6:.1f}M"),
            ("weights", _gib(self.param_bytes)),
            ("gradients", _gib(self.grad_bytes)),
            ("optimizer states", _gib(self.optimizer_bytes)),
            ("EMA (fp32)", _gib(self.ema_bytes)),
            ("activations / sample (no ckpt)", _gib(self.activations_per_sample)),
            ("activations / sample (ckpt)", _gib(self.activations_per_sample_checkpointed)),
            (f"activations x {self.batch_size} (as configured)", _gib(self.activation_bytes)),
            ("total per GPU", _gib(self.total_bytes)),
        ]
        width = max(len(name) for name, _ in rows)
        head = (f"memory per GPU: {self.precision}, ZeRO-{self.zero_stage} over {self.world_size} GPU(s), "
                f"batch {self.batch_size} per GPU")
        return "\n".join([head] + [f"  {name:<{width}}  {value:>12}" for name, value in rows])

    __str__ = table


def _gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB"


def model_state_bytes(params_total: int, params_trainable: int, *, world_size: int, zero_stage: int,
                      precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) in bytes per rank, by the ZeRO paper's accounting."""
    if precision not in _STATE_BYTES:
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage {zero_stage!r}: must be 0, 1, 2 or 3")
    if world_size < 1:
        raise ValueError(f"world_size {world_size!r}: must be >= 1")
    w, g, o = _STATE_BYTES[precision]

    def per_rank(n: int, partitioned_from_stage: int) -> int:
        # ZeRO pads the partitions to equal size; ceil is that padding at parameter granularity.
        return math.ceil(n / world_size) if zero_stage >= partitioned_from_stage else n

    return w * per_rank(params_total, 3), g * per_rank(params_trainable, 2), o * per_rank(params_trainable, 1)


def estimate_memory(model_cfg: ModelConfig, resolution: int, *, batch_size: int = 1, world_size: int = 1,
                    zero_stage: int = 2, precision: str = "bf16",
                    trainable: Optional[Callable[[str], bool]] = None, emas: int = 1) -> MemoryEstimate:
    """Per-GPU training memory of `model_cfg` at `resolution` px with `batch_size` images per GPU.

    `emas`: how many EMAs the trainer keeps (one per entry of `ema_decays`).
    `trainable(name)` says which parameters train (default: all), as in the trainer's TrainTask; frozen ones get
    no gradients or optimizer states and record no activations for backward unless something before them trains.
    Builds nothing real: the model and the traced step live on fake tensors, so an XL at batch 32 is cheap
    (two or three traces of a few seconds each). Activations per sample are the batch's divided by its size,
    so batch-independent saves (RoPE and position tables) are spread over the batch.
    """
    trainable = trainable or (lambda name: True)
    configured = {part: getattr(model_cfg, part).activation_checkpointing for part in _PARTS}
    plain = _trace(model_cfg, {part: False for part in _PARTS}, resolution, batch_size, precision, trainable)
    every = _trace(model_cfg, {part: True for part in _PARTS}, resolution, batch_size, precision, trainable)
    if not any(configured.values()):
        as_configured = plain.saved_bytes
    elif all(configured.values()):
        as_configured = _checkpointed_bytes(plain, every, _PARTS)
    else:
        mixed = _trace(model_cfg, configured, resolution, batch_size, precision, trainable)
        as_configured = _checkpointed_bytes(plain, mixed, [part for part, on in configured.items() if on])
    weights, grads, optim = model_state_bytes(plain.params_total, plain.params_trainable, world_size=world_size,
                                              zero_stage=zero_stage, precision=precision)
    return MemoryEstimate(
        params_total=plain.params_total,
        params_trainable=plain.params_trainable,
        batch_size=batch_size,
        world_size=world_size,
        zero_stage=zero_stage,
        precision=precision,
        param_bytes=weights,
        grad_bytes=grads,
        optimizer_bytes=optim,
        # The EMA shards follow the fp32 masters, which ZeRO partitions from stage 1 on.
        ema_bytes=emas * _EMA_BYTES * (math.ceil(plain.params_trainable / world_size) if zero_stage >= 1
                                       else plain.params_trainable),
        activations_per_sample=plain.saved_bytes // batch_size,
        activations_per_sample_checkpointed=_checkpointed_bytes(plain, every, _PARTS) // batch_size,
        activations_per_sample_configured=as_configured // batch_size,
    )


@dataclass
class _Trace:
    params_total: int
    params_trainable: int
    saved_bytes: int  # what autograd holds for backward at the end of the forward, as the outer hook saw it
    block_saved_bytes: dict[str, int]  # per block: its own saves (its inputs excluded), held at the same time


class _Packed:
    """What the saved-tensor hook hands autograd: a weak reference to it tells whether the graph still holds the
    tensor when the forward ends (a frozen part's saves are dropped with its graph right away)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _fake_copy(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace a meta-device model's parameters and buffers by fake CPU tensors, floating ones in `dtype`.

    Building on meta and swapping in fakes is ~10x faster than building under FakeTensorMode (every init op
    would go through fake dispatch), and `Module.to` cannot cast fake tensors (it refuses to swap subclasses).
    Values are irrelevant here: only shapes and dtypes decide what is saved. Must run under FakeTensorMode.
    """
    copies: dict[int, torch.Tensor] = {}  # a tensor shared by two modules stays shared

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cpu")
        return copies[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)


def _trace(model_cfg: ModelConfig, checkpointing: dict[str, bool], resolution: int, batch_size: int,
           precision: str, trainable: Callable[[str], bool]) -> _Trace:
    """Run one training forward on fake CPU tensors and account what autograd holds for backward at its end.

    Fake tensors on the CPU device, not the meta device: on meta, F.scaled_dot_product_attention takes the math
    path and saves the L x L attention matrix, while the real CPU and GPU (flash / memory-efficient) kernels save
    only q, k, v, the output and the logsumexp; a fake CPU tensor dispatches like a real one. (The CPU kernel
    takes any head size; on the GPU, layers.Attention pads a head width that the fused kernels do not take, e.g.
    not a multiple of 8, so the math kernel and its attention matrix never come up there either.)

    bf16: DeepSpeed's bf16 mode casts the module to bf16 and runs it without autocast, so the model's weights and
    the inputs are bf16 here too (CUDA autocast cannot run on CPU fake tensors anyway). Ops that compute in
    fp32 on purpose (RMSNorm, RoPE, the fp32 loss) save fp32 tensors, as they do on the GPU.

    Counted: tensors passed to the saved-tensor hook and still held by the graph when the forward ends,
    deduplicated by storage (views of one tensor cost once), parameters and buffers left out (they are weights).
    Inside a checkpointed block the checkpoint's own hook takes over, so its saves are invisible here; its inputs
    are not: non-reentrant checkpointing keeps them through an ordinary save_for_backward, which this hook sees.
    """
    from pixelgen import families  # the registry sits above the networks

    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}: must be >= 1")
    dtype = _DTYPES[precision]
    parts = {part: replace(getattr(model_cfg, part), activation_checkpointing=on)
             for part, on in checkpointing.items()}
    traced_cfg = replace(model_cfg, **parts)
    with torch.device("meta"):
        model = families.build_generator(traced_cfg, resolution, pretrained=False)
    loss_fn = families.get(model_cfg.trunk.kind).trace_loss(traced_cfg, resolution)
    with FakeTensorMode():
        _fake_copy(model, dtype)
        n_total, n_trainable = 0, 0
        for name, p in model.named_parameters():
            p.requires_grad_(trainable(name))
            n_total += p.numel()
            n_trainable += p.numel() if p.requires_grad else 0
        weights = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        x0 = torch.randn(batch_size, 3, resolution, resolution, dtype=dtype)
        y = torch.randint(0, model_cfg.num_classes, (batch_size,))

        recorder = _SavedTensors()
        with recorder.recording(model):
            loss, _ = loss_fn(model, x0, y)
        gc.collect()  # a dropped checkpoint frame sits in a reference cycle with its saves
        saved_bytes, block_saved_bytes = recorder.held(weights)
        del loss  # only now: the graph it roots holds the saves counted
    return _Trace(params_total=n_total, params_trainable=n_trainable, saved_bytes=saved_bytes,
                  block_saved_bytes=block_saved_bytes)


class _SavedTensors:
    """What autograd saves for backward during one forward, and which checkpointable block saved it."""

    def __init__(self):
        self.packed: list[tuple[weakref.ref, Optional[str]]] = []  # (saved tensor, the block saving it)
        self.block_inputs: dict[str, set[int]] = {}
        self.current: Optional[str] = None

    def _pack(self, t: torch.Tensor) -> _Packed:
        box = _Packed(t)
        self.packed.append((weakref.ref(box), self.current))
        return box

    def _enter(self, name: str):
        def hook(module, args):
            self.current = name
            self.block_inputs[name] = {_storage_key(a) for a in _tensors(args)}
        return hook

    def _leave(self, module, args, output):
        self.current = None

    @contextlib.contextmanager
    def recording(self, model: nn.Module):
        handles = []
        for part in _PARTS:
            for i, block in enumerate(_blocks(getattr(model, part))):
                handles.append(block.register_forward_pre_hook(self._enter(f"{part}.blocks.{i}")))
                handles.append(block.register_forward_hook(self._leave))
        try:
            with saved_tensors_hooks(self._pack, lambda box: box.tensor):
                yield
        finally:
            for h in handles:
                h.remove()

    def held(self, weights: set[int]) -> tuple[int, dict[str, int]]:
        """Bytes the graph still holds when the forward is over (weights and buffers left out, views of one
        storage counted once), and per block its own saves (its inputs excluded)."""
        saved: dict[int, int] = {}
        per_block: dict[str, dict[int, int]] = {name: {} for name in self.block_inputs}
        for ref, block in self.packed:
            box = ref()
            if box is None:
                continue
            key = _storage_key(box.tensor)
            if key in weights:
                continue
            saved[key] = _storage_bytes(box.tensor)
            if block is not None and key not in self.block_inputs[block]:
                per_block[block][key] = saved[key]
        return sum(saved.values()), {name: sum(keys.values()) for name, keys in per_block.items()}


def _blocks(part: nn.Module) -> nn.ModuleList:
    """The blocks `activation_checkpointing` recomputes: the part's own `blocks`, or those of the stack it wraps
    (the semantic and pixel ARs' causal stacks, the diffusion head's pixel decoder); none for a part without
    blocks (the `linear` decoder: one Linear, nothing to recompute), whose saves count as they happen."""
    if isinstance(getattr(part, "blocks", None), nn.ModuleList):
        return part.blocks
    found = [m for name, m in part.named_modules() if name.endswith("blocks") and isinstance(m, nn.ModuleList)]
    return found[0] if found else nn.ModuleList()


def _tensors(tree) -> Iterable[torch.Tensor]:
    return (t for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _checkpointed_bytes(plain: _Trace, ckpt: _Trace, parts: Iterable[str]) -> int:
    """Activations with the blocks of `parts` checkpointed (`ckpt` traced so), approximated as:

    what autograd holds with checkpointing on, as the outer hook sees it: the saves outside the checkpointed
      blocks and the block inputs each checkpoint keeps for its recompute
    + the largest single checkpointed block's own saves, from the trace without checkpointing: in backward one
      block at a time is recomputed, and its saves live until its backward is done, on top of everything above.
    Like the plain estimate it leaves out backward's transient buffers (gradients of activations, temporaries),
    and it keeps every outside save alive during each recompute, though by the time block k is recomputed
    backward has freed the saves of what came after it; tests/test_memory.py finds both to be a few percent.
    """
    prefixes = tuple(f"{part}." for part in parts)
    recompute = [n for name, n in plain.block_saved_bytes.items() if name.startswith(prefixes)]
    return ckpt.saved_bytes + max(recompute, default=0)
