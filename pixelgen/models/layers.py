"""Building blocks shared by the patch-level trunk and the pixel-level decoder (PixelDiT)."""

import contextlib
import functools
import math
from typing import Callable, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.checkpoint import checkpoint

from .config import Init

T = TypeVar("T")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def run_block(block: nn.Module, *args, checkpointing: bool):
    """Call a block, recomputing it in backward instead of storing its activations when `checkpointing`."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def init_linear_xavier(module):
    # DiT's basic init; the owning model applies its zero-inits and embedding inits on top.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_linears(module: nn.Module, init: Init) -> None:
    """The base init of every Linear in `module`, which its owner's embedding and zero inits then override.

    pixelgen: xavier-uniform weights, zero biases (DiT's). published: PyTorch's default (kaiming-uniform weights,
    uniform biases), drawn again here: the official PixelDiT code leaves every Linear it does not name at that,
    and at XL the PiT compaction's weights then have std 0.009 rather than xavier's 0.020."""
    published = Init(init) == Init.published  # anything else raises here, not silently as pixelgen
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if published:
                m.reset_parameters()
            else:
                init_linear_xavier(m)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 whatever the autocast dtype: the mean of squares over a wide dim is too coarse in bf16.
        x_fp32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (x_fp32 * self.weight.float()).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 like RMSNorm; `affine`: a learned weight and bias (the parameter names of
    nn.LayerNorm's, so converted checkpoints map one to one)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps=self.eps).type_as(x)


def make_norm(kind: str, dim: int, *, before_output: bool = False) -> nn.Module:
    """The norm of a decoder's blocks (`before_output`: the one before its output Linear). rms: RMSNorm with a
    weight everywhere, as pixelgen's decoders always had (their checkpoints hold it). layer: DeCo's LayerNorm,
    affine in the blocks and plain before the output, where the Linear after it can absorb any scale and shift."""
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "layer":
        return LayerNorm(dim, affine=not before_output)
    raise ValueError(f"unknown decoder norm {kind!r}: rms or layer (key 'model.decoder.norm')")


# Position tables (RoPE cos/sin, 2D sin-cos, timestep frequencies) depend on shapes only, yet were rebuilt by
# every forward, at every step of a sampler. They are memoised here, per arguments and device, rather than held as
# buffers: DeepSpeed's bf16 mode casts a module's floating buffers to bf16, and RoPE is applied in fp32; the input
# grid of a trunk or decoder is the image's, known only at the call; and a dict outside the modules leaves state
# dicts, checkpoints and exported weights as they were.
_TABLES: dict[tuple, object] = {}
_caching = True


@contextlib.contextmanager
def tables_uncached():
    """Rebuild every position table on every call inside this block, as before they were cached: the reference
    that tests/test_models.py and benchmarks/position_tables.py compare the cached tables against."""
    global _caching
    before, _caching = _caching, False
    try:
        yield
    finally:
        _caching = before


def cached_table(key: tuple, device, build: Callable[[], T]) -> T:
    """`build()` the first time for (key, device, default dtype), the same tensors every time after; callers must
    not modify them in place.

    Built fresh, as before, where a cached tensor would be wrong: on the meta device; under a torch dispatch
    mode (the memory estimator's FakeTensorMode rejects real tensors and its fake ones must not leak out;
    FlopCounterMode); while torch.compile traces (the graph computes its own). Built outside inference mode, so
    a table first made while sampling under torch.inference_mode is an ordinary tensor that training can use.
    """
    if torch.compiler.is_compiling() or not _caching or is_in_torch_dispatch_mode():
        return build()
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":
        return build()
    full_key = (*key, device, torch.get_default_dtype())
    table = _TABLES.get(full_key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = _TABLES[full_key] = build()
    return table


def _memoised(build: Callable[..., T]) -> Callable[..., T]:
    """A table builder f(*args, device=None, **kwargs) with hashable arguments, cached by `cached_table`."""
    @functools.wraps(build)
    def table(*args, device=None, **kwargs):
        key = (build.__qualname__, args, tuple(sorted(kwargs.items())))
        return cached_table(key, device, lambda: build(*args, device=device, **kwargs))
    return table


def rope_at(head_dim: int, rows_L, cols_L, *, theta: float = 10_000.0):
    """cos/sin tables, each [L, head_dim/2], for tokens at explicit (row, col) coordinates (any real values).

    The first half of the rotary pairs rotates with the row, the second half with the column.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    rows_L = torch.as_tensor(rows_L, dtype=torch.float32)
    cols_L = torch.as_tensor(cols_L, dtype=torch.float32, device=rows_L.device)
    freqs_F = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float32, device=rows_L.device) / head_dim)
    angles_LP = torch.cat([rows_L[:, None] * freqs_F, cols_L[:, None] * freqs_F], dim=-1)
    return angles_LP.cos(), angles_LP.sin()


@_memoised
def rope_2d(head_dim: int, h: int, w: int, *, theta: float = 10_000.0, extent: float = 16.0, device=None):
    """rope_at for an h x w token grid in row-major order.

    Positions are spread over a fixed `extent` whatever the grid size (PixelDiT's linspace(0, 16, n)),
    so the angles a model sees do not grow with resolution. Cached per arguments and device (`cached_table`).
    """
    rows = torch.linspace(0, extent, h, device=device)[:, None].expand(h, w)
    cols = torch.linspace(0, extent, w, device=device)[None, :].expand(h, w)
    return rope_at(head_dim, rows.reshape(-1), cols.reshape(-1), theta=theta)


def apply_rope(x, cos_LP, sin_LP):
    """Rotate consecutive channel pairs of x [..., L, head_dim] by the angles of their token.

    As one complex product (pair = real, imaginary part): the same arithmetic as x1 cos - x2 sin,
    x1 sin + x2 cos, in a third of the ops, which is what a one-token sampling step pays for."""
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * torch.complex(cos_LP, sin_LP)).flatten(-2).type_as(x)


@_memoised
def sincos_2d(dim: int, h: int, w: int, *, device=None):
    """Fixed 2D sin-cos absolute position embedding [h, w, dim]: half the channels encode the row, half the column.
    Cached per arguments and device (`cached_table`)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega_F = 10_000.0 ** (-torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    rows_HF = torch.arange(h, dtype=torch.float32, device=device)[:, None] * omega_F
    cols_WF = torch.arange(w, dtype=torch.float32, device=device)[:, None] * omega_F
    rows_HWD = torch.cat([rows_HF.sin(), rows_HF.cos()], dim=-1)[:, None].expand(h, w, -1)
    cols_HWD = torch.cat([cols_WF.sin(), cols_WF.cos()], dim=-1)[None, :].expand(h, w, -1)
    return torch.cat([rows_HWD, cols_HWD], dim=-1)


# Which kernel F.scaled_dot_product_attention runs on a CUDA GPU (sm80+), by the rules of torch 2.x's
# aten/src/ATen/native/transformers/cuda/sdp_utils.cpp: flash takes fp16/bf16 heads of a multiple of 8 up to 256
# and no explicit mask (is_causal is fine); memory-efficient attention takes masks and any dtype, with heads a
# multiple of 8 in fp16/bf16 (4 in fp32); anything else falls back to the math kernel, which materialises and
# keeps for backward the B x H x L x L attention matrix. cuDNN attention (sm90) takes a subset of flash's shapes.
CUDA_HEAD_ALIGN = 8


def sdpa_cuda_kernel(head_dim: int, dtype: torch.dtype, masked: bool = False) -> str:
    """'flash', 'efficient' or 'math': the kernel SDPA picks on a CUDA GPU for heads of `head_dim` in `dtype`."""
    half = dtype in (torch.float16, torch.bfloat16)
    if half and head_dim % 8 == 0 and head_dim <= 256 and not masked:
        return "flash"
    if head_dim % (8 if half else 4) == 0:
        return "efficient"
    return "math"


def sdpa_head_dim(head_dim: int) -> int:
    """The head width attention runs at on CUDA: padded with zeros up to a multiple of 8, which every fused kernel
    takes in every dtype. Zero channels add nothing to q.k and give zero output channels, which are cut off."""
    return -(-head_dim // CUDA_HEAD_ALIGN) * CUDA_HEAD_ALIGN


def sdpa(q, k, v, *, attn_mask=None, is_causal: bool = False, pad_to: int | None = None, dropout_p: float = 0.0):
    """F.scaled_dot_product_attention over [B, H, L, d] heads, run at head width `pad_to` (zero-padded, with the
    unpadded 1/sqrt(d) scale) when that is wider than d."""
    d = q.shape[-1]
    if pad_to is None or pad_to <= d:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    q, k, v = (F.pad(t, (0, pad_to - d)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=d**-0.5,
                                         dropout_p=dropout_p)
    return out[..., :d]


def attention_report(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """One line per attention shape of `model` that the CUDA kernels do not take as it is: what SDPA would fall
    back to, and the padding pixelgen applies instead (on CUDA only; the CPU kernel takes any head width)."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            shapes.setdefault((module.heads, module.head_dim), []).append(name)
    lines = []
    for (heads, d), names in sorted(shapes.items()):
        if sdpa_cuda_kernel(d, dtype) == "flash":
            continue
        padded = sdpa_head_dim(d)
        where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
        lines.append(f"attention {where}: {heads} heads of width {d} would take SDPA's "
                     f"{sdpa_cuda_kernel(d, dtype)} kernel on CUDA in {str(dtype).removeprefix('torch.')}, "
                     f"which keeps the L x L attention matrix for backward; padded to {padded} for "
                     f"{sdpa_cuda_kernel(padded, dtype)} attention ({padded / d:.1f}x its q.k and p.v FLOPs)")
    return lines


class Attention(nn.Module):
    """Multi-head self-attention with per-head RMS qk-norm and 2D RoPE.

    `io_dim` (default `dim`) is the width of the tokens coming in and going out, so attention can run wider
    than the tokens it mixes (the decoder's low-dim pixels attending at a higher width).
    """

    def __init__(self, dim: int, heads: int, io_dim: int | None = None, *, qkv_bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        io_dim = dim if io_dim is None else io_dim
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout  # on the attention weights and the output, in training (JiT's H and G)
        self.qkv = nn.Linear(io_dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, io_dim)

    def forward(self, x_BLD, rope, *, causal: bool = False, cache: dict | None = None):
        """`causal`: token i attends to tokens <= i. `cache` (causal only): a dict this layer keeps its keys and
        values in; x_BLD are then the next tokens after those already cached (rope: their positions only)."""
        B, L, _ = x_BLD.shape
        # view + permute rather than einops: this runs once per block per sampling step, where overhead is the cost.
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        mask, is_causal = None, False
        if causal and q.shape[2] > 1:  # a single new token may see everything cached
            if past == 0:
                is_causal = True  # square: SDPA's own causal mask, which flash attention takes (a mask it does not)
            else:
                Lq, Lk = q.shape[2], k.shape[2]
                mask = torch.arange(Lk, device=q.device)[None] <= past + torch.arange(Lq, device=q.device)[:, None]
        pad_to = sdpa_head_dim(self.head_dim) if q.is_cuda else None  # see attention_report
        p = self.dropout if self.training else 0.0
        o_BHLd = sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, pad_to=pad_to, dropout_p=p)
        return F.dropout(self.proj(o_BHLd.transpose(1, 2).reshape(B, L, -1)), p)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        # 2/3 keeps the parameter count of a GELU MLP with the same ratio; this order avoids 3071.999 -> 3071.
        hidden = int(2 * mlp_ratio * dim / 3)
        self.dropout = dropout  # on the hidden features and the output, in training (JiT's H and G)
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        return F.dropout(self.w2(F.dropout(F.silu(self.w1(x)) * self.w3(x), p)), p)


ACTIVATIONS: dict[str, Callable] = {"gelu": F.gelu, "silu": F.silu}  # exact GELU (DiT's is the tanh one)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@_memoised
def timestep_frequencies(dim: int, max_period: float, *, device=None):
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)


def timestep_features(t_B, dim: int, max_period: float):
    freqs = timestep_frequencies(dim, max_period, device=t_B.device)
    args_BF = t_B.float()[:, None] * freqs
    return torch.cat([args_BF.cos(), args_BF.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by an MLP.

    max_period=10 (PixelDiT) because t lives in [0, 1]: DiT's 10000 assumes t in [0, 1000] and would
    leave most features nearly constant over [0, 1]; with 10 every frequency lies in [0.1, 1] rad per unit t.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t_B):
        feats = timestep_features(t_B, self.freq_dim, self.max_period)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """num_classes + 1 rows: the last one (index num_classes) is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y_B):
        return self.table(y_B)


class CausalBlock(nn.Module):
    """Pre-norm causal transformer block (RMSNorm, qk-norm attention with RoPE, SwiGLU), no modulation: the
    autoregressive levels take their condition as tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_ratio)

    def forward(self, x_BLD, rope, cache: dict | None = None):
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), rope, causal=True, cache=cache)
        return x_BLD + self.mlp(self.norm2(x_BLD))


class CausalTransformer(nn.Module):
    """`depth` causal blocks and a final norm. With `caches` (from `new_cache`), the tokens passed are the next
    ones after those already seen, and each block keeps its keys and values: sampling step by step costs one
    token's work per step instead of the whole prefix again."""

    def __init__(self, *, dim: int, depth: int, heads: int, mlp_ratio: float, activation_checkpointing: bool = False):
        super().__init__()
        self.head_dim = dim // heads
        self.activation_checkpointing = activation_checkpointing
        self.blocks = nn.ModuleList([CausalBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = RMSNorm(dim)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]

    def forward(self, x_BLD, rope, caches: list[dict] | None = None):
        for i, block in enumerate(self.blocks):
            if caches is None:
                x_BLD = run_block(block, x_BLD, rope, checkpointing=self.activation_checkpointing)
            else:
                x_BLD = block(x_BLD, rope, caches[i])
        return self.norm(x_BLD)


class ZConditioned(nn.Module):
    """The second level's input from the semantic AR: z projected to the decoder's width, and a learned null
    condition that replaces it for decoder-level guidance (trained by dropping z)."""

    def __init__(self, z_dim: int, dim: int):
        super().__init__()
        self.z_proj = nn.Linear(z_dim, dim)
        self.null_cond = nn.Parameter(torch.zeros(dim))

    def condition(self, z_NZ: torch.Tensor, drop_N: torch.Tensor | None = None) -> torch.Tensor:
        """z -> the condition [N, dim]; rows where drop_N is true get the learned null condition."""
        c = self.z_proj(z_NZ)
        if drop_N is not None:
            c = torch.where(drop_N[:, None], self.null_cond.to(c.dtype).expand_as(c), c)
        return c

    def null_condition(self, n: int) -> torch.Tensor:
        return self.null_cond[None].expand(n, -1)
