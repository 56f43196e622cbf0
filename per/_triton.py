"""Fused PER gradient on the GPU: one Triton program per block of
points computes the projections, `erf` and the back-projection, so the `(N, s)`
projection matrix never reaches memory.

`per.per_grad` calls `per_grad_fused` for CUDA tensors (see `per.functional._use_fused_kernel`);
under `TRITON_INTERPRET=1` (set before this module is imported) the same kernel runs on
CPU tensors, which is how the tests check it without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_S = 64          # directions per inner step
PRECISIONS = ("ieee", "tf32", "tf32x3")   # tl.dot's input_precision: float32, TF32, 3 x TF32
TILE_ELEMENTS = 4096  # points per program x padded d: bounds the accumulator's registers


@triton.jit
def _per_grad_kernel(x_ptr, theta_ptr, out_ptr, n, d, s,
                     stride_xn, stride_xd, stride_td, stride_ts, stride_on, stride_od,
                     scale, inv_sqrt2,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                     PRECISION: tl.constexpr):
    """out[rows] = scale * erf(x[rows] theta / sqrt 2) theta^T for one block of rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n, cols < d
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # (BN, BD)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, s, BLOCK_S):
        ks = k0 + tl.arange(0, BLOCK_S)
        theta = tl.load(theta_ptr + cols[:, None] * stride_td + ks[None, :] * stride_ts,
                        mask=col_ok[:, None] & (ks < s)[None, :], other=0.0)   # (BD, BS) fp32
        # Padded directions are 0, so their erf(0) = 0 adds nothing.
        p = tl.dot(x, theta, input_precision=PRECISION)                        # (BN, BS)
        e = tl.math.erf(p * inv_sqrt2)
        acc = tl.dot(e, tl.trans(theta), acc, input_precision=PRECISION)      # (BN, BD)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od,
             (acc * scale).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def default_precision(tensor_cores: bool, allow_tf32: bool) -> str:
    """The products' mode of `per_grad_fused`. With TF32 tensor cores (an NVIDIA GPU of
    compute capability 8.0 or more): "tf32" where TF32 is allowed, else "tf32x3", float32's
    accuracy at less cost than "ieee" (on an NVIDIA H200, a 256-direction site at
    N = 131k, d = 16: 0.124 against 0.196 ms, relative error against float64 2.1e-7 against
    2.4e-7). Elsewhere (older or AMD GPUs, the CPU interpreter) "ieee"."""
    if not tensor_cores:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


@functools.lru_cache(maxsize=None)
def has_tf32_tensor_cores(device: torch.device) -> bool:
    """An NVIDIA GPU (not ROCm) of compute capability >= 8.0 (asked once per device)."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 0))


def per_grad_fused(x: torch.Tensor, theta: torch.Tensor, scale: float,
                   precision: str | None = None) -> torch.Tensor:
    """`scale * erf(x theta / sqrt 2) theta^T` in one kernel.

    `x: (N, d)` float32/bf16/fp16 with `d <= 256` (any strides), `theta: (d, s)` float32
    -> `(N, d)` in `x`'s dtype. Both products run on float32 values, in the mode
    `default_precision` picks: on a GPU with TF32 tensor cores, TF32 when
    `torch.backends.cuda.matmul.allow_tf32` is set, as `trainer.precision=tf32|bf16` does
    (TF32 holds bf16/fp16 inputs exactly), else three TF32 products ("tf32x3"), at
    float32's accuracy (measured as IEEE products'; `PER_TRITON=0` takes the plain path,
    IEEE products where TF32 is off); elsewhere "ieee". triton 3.8's interpreter gets bf16
    `tl.dot` wrong, so a bf16 product could not be tested on CPU. `precision` (one of
    `PRECISIONS`) overrides the mode; the benchmark times each.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    (n, d), s = x.shape, theta.shape[1]
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_n = max(16, min(64, TILE_ELEMENTS // block_d))
    precision = precision or default_precision(has_tf32_tensor_cores(x.device),
                                               torch.backends.cuda.matmul.allow_tf32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():   # launch on x's GPU
        _per_grad_kernel[(triton.cdiv(n, block_n),)](
            x, theta, out, n, d, s, x.stride(0), x.stride(1), theta.stride(0), theta.stride(1),
            out.stride(0), out.stride(1), scale, 1 / math.sqrt(2.0),
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=BLOCK_S,
            PRECISION=precision)
    return out


def _per_grad_fused_default(x: torch.Tensor, theta: torch.Tensor, scale: float) -> torch.Tensor:
    """`per_grad_fused` with the products' mode chosen from the backend flags."""
    return per_grad_fused(x, theta, scale)


# For traced code: torch.compile keeps the operator whole in its graph (the fake gives the
# result's shape, dtype and row-major strides), so a compiled PER step is one CUDA graph.
# Eager code calls the function itself, without the dispatcher's overhead.
per_grad_fused_op = torch.library.custom_op("per::per_grad_fused", mutates_args=())(_per_grad_fused_default)
per_grad_fused_op.register_fake(lambda x, theta, scale: x.new_empty(x.shape))
