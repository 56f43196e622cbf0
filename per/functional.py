"""The PER loss and its gradient, the L1/L2 baselines, and activations-to-points.

Notation (docs/method.md): one site's activations form a point cloud
`x: (N, d)`; `directions: (d, s)` holds `s` unit directions `theta_k` as columns;
projections `p_ik = <x_i, theta_k>`.

Reduction over the `N` points (`REDUCTIONS`): "sum" (default) is the paper's
Algorithm 1, which adds `lam * g_i` to each point's gradient with no `1/N`;
"mean" is the `1/b` of the paper's eq. 5/6. The two differ by the factor `N`.

Precision: float64 inputs are computed in float64; every other dtype (float32,
bf16, fp16) evaluates `phi`/`erf` and all reductions in float32. bf16/fp16 points are
projected in their own dtype by the plain paths (`project`, the CPU `per_grad`), but in
float32 by the fused CUDA kernel and by `per_grad_subspace`: there the backward path and
the autograd path (`per_loss`) agree to bf16/fp16 tolerance, not to float32's.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch

LAYOUTS = ("channels", "flatten")
REDUCTIONS = ("sum", "mean")

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 input, else float32 (the accumulation dtype)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sample_directions(d: int, num_slices: int, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Random unit directions `theta_k = v_k / ||v_k||`, `v_k ~ N(0, I_d)`.

    Returns: `(d, num_slices)`, one unit-norm direction per column: the transpose of a
    contiguous `(num_slices, d)` matrix, so each direction is drawn and normalized as one
    contiguous row (a third faster than column norms for the flatten layout's `d` in the
    thousands; matrix products take the transposed view without a copy).
    """
    if d < 1:
        raise ValueError(f"dimension d must be >= 1, got {d}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    # torch.randn's generator overload takes only concrete sizes: under torch.compile with
    # dynamic shapes `d` is symbolic, so the overload without a generator serves that case.
    rng = {} if generator is None else {"generator": generator}
    v = torch.randn(num_slices, d, device=device, dtype=dtype, **rng)
    return v.div_(torch.linalg.vector_norm(v, dim=1, keepdim=True)).T


class _Phi(torch.autograd.Function):
    """`phi` with its derivative `phi'(x) = erf(x / sqrt 2)` as the backward (eq. 6's kernel);
    the forward fuses in place and saves only `x`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        z = x / _SQRT2
        out = torch.special.erf(z).mul_(x)
        return out.add_(z.square_().neg_().exp_(), alpha=_SQRT_2_OVER_PI)  # + sqrt(2/pi) e^{-x^2/2}

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.special.erf(x / _SQRT2).mul_(grad_output)


def phi(x: torch.Tensor) -> torch.Tensor:
    """`phi(x) = x erf(x / sqrt 2) + sqrt(2/pi) exp(-x^2 / 2) = E|x - Z|`, Z ~ N(0,1); elementwise.

    Differentiable: `phi'(x) = erf(x / sqrt 2)` (twice differentiable too).
    """
    return _Phi.apply(x)


def check_reduction(reduction: str) -> None:
    """Raise ValueError unless `reduction` is one of `REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def _reduce(per_point: torch.Tensor, reduction: str) -> torch.Tensor:
    """`per_point: (N,)` -> 0-d: its sum or its mean; 0 for no points under either (as
    their gradient, which is empty)."""
    check_reduction(reduction)
    total = per_point.sum()
    return total if reduction == "sum" else total / max(per_point.numel(), 1)


def check_points(x: torch.Tensor) -> None:
    """Raise ValueError unless `x` is a floating-point point cloud `(N, d)`."""
    if x.dim() != 2:
        raise ValueError(f"expected points of shape (N, d) (rank 2), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point points, got dtype {x.dtype}")


def check_directions(directions: torch.Tensor, d: int) -> None:
    """Raise ValueError unless `directions` has shape `(d, s)`."""
    if directions.dim() != 2 or directions.shape[0] != d:
        raise ValueError(f"directions must have shape (d, s) with d = {d}, got {tuple(directions.shape)}")


def project(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Projections `p = x theta`: `x: (N, d)`, `directions: (d, s)` -> `(N, s)`, `compute_dtype(x)`.

    The matmul runs in `x`'s dtype (bf16 stays on tensor cores); the result is cast up.
    """
    check_directions(directions, x.shape[1])
    return (x @ directions.to(x.dtype)).to(compute_dtype(x))


def per_loss(x: torch.Tensor, directions: torch.Tensor | None = None, *, num_slices: int = 256,
             reduction: str = "sum", generator: torch.Generator | None = None,
             check_finite: bool = True) -> torch.Tensor:
    """PER loss `L = sum_i (1/s) sum_k phi(<x_i, theta_k>)` ("sum", Algorithm 1) or
    `(1/N)` times that ("mean", paper eq. 5 with b -> N).

    Args:
        x: `(N, d)` points.
        directions: `(d, s)` unit directions; drawn with `sample_directions(d, num_slices,
            generator=generator)` when None.
        reduction: "sum" or "mean" over the `N` points (`REDUCTIONS`).
        check_finite: raise ValueError on NaN/inf in `x` (synchronizes the device).

    Returns: 0-d tensor in `compute_dtype(x)`. Its autograd gradient is `per_grad`.
    """
    check_points(x)
    check_reduction(reduction)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("non-finite activations (NaN or inf) passed to per_loss")
    if directions is None:
        directions = sample_directions(x.shape[1], num_slices, generator=generator,
                                       device=x.device, dtype=compute_dtype(x))
    return _reduce(phi(project(x, directions)).mean(dim=1), reduction)


def per_grad(x: torch.Tensor, directions: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """Analytic gradient of `per_loss(x, directions, reduction=reduction)`:
    `dL/dx_i = (1/s) sum_k erf(p_ik / sqrt 2) theta_k` (Algorithm 1's `g_i`, "sum"),
    times `1/N` for "mean" (eq. 6).

    `x: (N, d)`, `directions: (d, s)` -> `(N, d)` in `x`'s dtype (computed in `compute_dtype(x)`);
    any directions (the Regularizer's have unit norm). The result carries no autograd graph
    (`x` is read detached). Rows of points with a NaN or inf coordinate are unspecified (NaN
    on the eager CPU path, finite or NaN on the others): such a run has diverged.

    On CUDA a fused Triton kernel (`per._triton`, for `d <= FUSED_MAX_DIM` and float32/bf16/fp16)
    keeps each block of points on chip, so the `(N, s)` projections never reach memory;
    `PER_TRITON=0`, float64 and wider points take `_per_grad_blocked` in one block. On
    CPU, `_per_grad_cpu` works through `PER_GRAD_BLOCK_ROWS` points at a time so each
    block's projections stay in cache; `PER_CPU_COMPILE=1` compiles the blocked path for
    float32 instead (`_per_grad_cpu_compiled`). Code that torch.compile traces calls the
    kernel and the CPU path as the custom operators `per::per_grad_fused` and
    `per::per_grad_cpu`, which it keeps whole: the same results, and no graph break.
    """
    check_points(x)
    check_reduction(reduction)
    check_directions(directions, x.shape[1])
    x = x.detach()
    (n, _), s = x.shape, directions.shape[1]
    if n == 0:
        return torch.zeros_like(x)
    scale = 1.0 / (s * (n if reduction == "mean" else 1))
    theta = directions.to(compute_dtype(x))
    traced = torch.compiler.is_compiling()
    if _use_fused_kernel(x):
        from per import _triton
        fused = _triton.per_grad_fused_op if traced else _triton.per_grad_fused
        # The directions as drawn, a transposed view (any strides serve the kernel): on the
        # H200 the bench's mode rows, fed the view, were 1.1-2.1x faster than per_grad's rows,
        # fed a row-major copy (docs/speed.md; not yet re-measured with the view).
        return fused(x, theta, scale)
    if x.device.type != "cpu":       # blocks pay on CPU caches; elsewhere one product each
        return _per_grad_blocked(x, theta, scale, n)
    if x.dtype == torch.float32 and os.environ.get("PER_CPU_COMPILE", "0") == "1" and not traced:
        return _per_grad_cpu_compiled(x, theta, scale, PER_GRAD_BLOCK_ROWS)
    return (_per_grad_cpu_op if traced else _per_grad_cpu_points)(x, theta, scale)


def _per_grad_cpu_points(x: torch.Tensor, theta: torch.Tensor, scale: float) -> torch.Tensor:
    """`per_grad`'s eager CPU path: `x: (N, d)`, `theta: (d, s)` in `compute_dtype(x)` ->
    `(N, d)` in `x`'s dtype (`_per_grad_cpu`)."""
    out = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype)
    _per_grad_cpu(x[None], theta, scale, PER_GRAD_BLOCK_ROWS, out[None])
    return out


def _add_per_grad_cpu(grad_output: torch.Tensor, h: torch.Tensor, theta: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """`add_per_grad`'s CPU path in the site's own memory: `h`, `grad_output` contiguous
    `(B, C, H, W)` of one dtype, `theta: (C, s)` in it -> `grad_output + scale * (sum over
    directions)`, a new `(B, C, H, W)` tensor (`_per_grad_cpu` on transposed views)."""
    b, c, height, width = h.shape
    out = torch.empty_like(h)
    as_points = lambda t: t.view(b, c, height * width).transpose(1, 2)      # (B, H*W, C)
    _per_grad_cpu(as_points(h), theta, scale, PER_GRAD_BLOCK_ROWS, as_points(out), as_points(grad_output))
    return out


# The eager CPU paths as operators for traced code: they branch on values (the check for
# rows to redo), which torch.compile cannot trace, so it keeps them whole.
_per_grad_cpu_op = torch.library.custom_op("per::per_grad_cpu", mutates_args=())(_per_grad_cpu_points)
_add_per_grad_cpu_op = torch.library.custom_op("per::add_per_grad_cpu", mutates_args=())(_add_per_grad_cpu)
_per_grad_cpu_op.register_fake(lambda x, theta, scale: x.new_empty(x.shape))
_add_per_grad_cpu_op.register_fake(lambda grad_output, h, theta, scale: torch.empty_like(h))


def subspace_applies(n: int, d: int, num_slices: int) -> bool:
    """Whether `per_grad_subspace` draws implicitly for `n` points in `R^d`: `n + s <= d` (the
    complement holds `s` directions' worth) and `n <= s / 4`, where it is the faster one.

    Measured against `per_grad(x, sample_directions(d, 256))` on CPU (one thread, float32,
    `d` = 4096 to 16384): 4.5-6.5x faster at `n = 16`, 2.5-3.0x at 32, 1.25-1.4x at 64,
    0.8-0.9x at 96 and 0.5-0.6x at 128 (its QR of the points grows as `d n^2`).
    """
    return 0 < 4 * n <= num_slices and n + num_slices <= d


def add_per_grad(grad_output: torch.Tensor, h: torch.Tensor, directions: torch.Tensor, lam: float, *,
                 layout: str = "channels", reduction: str = "sum") -> torch.Tensor:
    """`grad_output + lam * dL/dh` with `L = per_loss(to_points(h, layout), directions)`: the
    gradient a PER site passes back (Algorithm 1), in `h`'s shape and `grad_output`'s dtype.

    `h`, `grad_output`: the site's activations and the gradient reaching them (any shape
    `to_points` takes), neither modified; `directions: (d, s)`. For use without autograd
    (a backward, or `torch.no_grad()`). On CPU, a contiguous `(B, C, H, W)` site in the
    channels layout (float32/float64, `grad_output` alike and contiguous) is computed in
    its own memory layout: each example's `H*W` positions are its points as a transposed
    view, and each block's back-projection is added in place into a copy of `grad_output`,
    so neither the points nor `lam * dL/dh` is materialized (traced by torch.compile: the
    custom operator `per::add_per_grad_cpu`). Everything else (other layouts, memory
    formats and dtypes, CUDA, `PER_CPU_COMPILE=1`) goes through `per_grad`.
    """
    check_reduction(reduction)
    if (h.device.type == "cpu" and h.dim() == 4 and layout == "channels"
            and h.dtype in (torch.float32, torch.float64) and grad_output.dtype == h.dtype
            and h.is_contiguous() and grad_output.is_contiguous() and h.numel() > 0
            and os.environ.get("PER_CPU_COMPILE", "0") != "1"):
        b, c, height, width = h.shape
        check_directions(directions, c)
        n = b * height * width
        scale = lam / (directions.shape[1] * (n if reduction == "mean" else 1))
        add = _add_per_grad_cpu_op if torch.compiler.is_compiling() else _add_per_grad_cpu
        return add(grad_output, h, directions.to(h.dtype), scale)
    site_grad = from_points(per_grad(to_points(h, layout), directions, reduction=reduction), h.shape, layout)
    return torch.add(grad_output, site_grad.to(grad_output.dtype), alpha=lam)


@torch.compiler.disable     # eager code with Python control flow on values; a graph break either way
def per_grad_subspace(x: torch.Tensor, num_slices: int, *, reduction: str = "sum",
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_grad` and `project` for fresh random directions that are never formed: returns
    `(dL/dx, p)` with the same joint distribution as `(per_grad(x, theta), project(x, theta))`
    for `theta = sample_directions(d, num_slices)`. For few points in many dimensions (the
    flatten layout: `N = B` points in `R^{C*H*W}`), where drawing the `d x s` normals
    dominates the step.

    `x: (N, d)` -> `((N, d)` in `x`'s dtype, `(N, s)` in `compute_dtype(x))`. Takes this route
    where `subspace_applies(N, d, s)` and the points' norm is finite; otherwise draws
    `theta` explicitly (then `per_grad`'s rows for points with a NaN or inf coordinate).
    bf16/fp16 points are projected in float32 here (in their own dtype by `project`).

    Why it is exact (`v_k ~ N(0, I_d)`, `theta_k = v_k / ||v_k||`, `g_i = scale sum_k
    erf(p_ik / sqrt 2) theta_k`): take an orthonormal `E: (d, N)` whose span holds the points
    (QR of `x^T`, `x = R_x^T E^T`) and split `v_k = E a_k + z_k`, `z_k` in the complement of
    dimension `d' = d - N`. By rotation invariance `a: (N, s)` and `Z: (d', s)` are independent
    standard normals. `p = R_x^T a / ||v||` needs only `a` and the column norms of `Z`; the
    gradient is `g^T = E a m + Z m` with `m_ki = scale erf(p_ik / sqrt 2) / ||v_k||`. Write
    `Z = Q R` (QR): `Q` is Haar on the `s`-frames of the complement, independent of `R`, and
    `R` is Bartlett's (`R_kk^2 ~ chi^2(d' - k)`, k from 0; `N(0, 1)` above the diagonal), with
    the column norms of `Z`. With `R m = O T` (QR), `Q O` is a Haar `N`-frame of the complement
    independent of `(a, R)`; it is drawn as the QR factor (positive diagonal, by Cholesky)
    of a fresh Gaussian `y: (d, N)` projected off `E`. Random numbers: `N (s + d) + s^2`
    (`R` uses the `s^2 / 2` above the diagonal of an `s x s` draw) against `d s`; products
    `O(d N^2 + s^2 N)` against `O(d N s)`.
    """
    check_points(x)
    check_reduction(reduction)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    (n, d), s = x.shape, num_slices
    cdtype = compute_dtype(x)
    xc = x.to(cdtype)
    # One norm rules out NaN, inf and overflow (a finite cloud whose sum of squares passes
    # the dtype's range draws explicitly too: its QR would overflow).
    if not subspace_applies(n, d, s) or not math.isfinite(float(torch.linalg.vector_norm(xc))):
        theta = sample_directions(d, s, generator=generator, device=x.device, dtype=cdtype)
        return per_grad(x, theta, reduction=reduction), project(x, theta)
    scale = 1.0 / (s * (n if reduction == "mean" else 1))
    draw = {"dtype": cdtype, "device": x.device, **({} if generator is None else {"generator": generator})}
    e, r_x = torch.linalg.qr(xc.T)                            # (d, N), (N, N): x = r_x^T e^T
    a = torch.randn(n, s, **draw)                             # the directions in span(e)
    r = torch.randn(s, s, **draw).triu_(1)                    # Bartlett's R of the rest
    dof = (d - n) - torch.arange(s, dtype=cdtype, device=x.device)
    r.diagonal().copy_(torch._standard_gamma(dof / 2, generator=generator).mul_(2).sqrt_())
    norms = (a.square().sum(0) + r.square().sum(0)).sqrt_()   # ||v_k||, (s,)
    p = r_x.T @ a / norms                                     # (N, s)
    m = (torch.erf(p / _SQRT2) * (scale / norms)).T           # (s, N)
    t = torch.linalg.qr(r @ m).R                              # (N, N): R m = O t
    y = torch.randn(n, d, **draw)                             # y^T: (d, N)
    ey = e.T @ y.T                                            # (N, N)
    chol = torch.linalg.cholesky(y @ y.T - ey.T @ ey)         # of (y - e ey)^T (y - e ey)
    frame_t = torch.linalg.solve_triangular(chol.T, t, upper=True)   # Haar frame = (y - e ey) chol^-T
    grad = torch.addmm((a @ m - ey @ frame_t).T @ e.T, frame_t.T, y)  # g = (e a m + frame t)^T
    return grad.to(x.dtype), p


# Points per block on the CPU path (1 MiB of float32 projections at s = 256): the fastest
# of 256 to 4096 rows over a ResNet-20 PER step's sites, eager and compiled (docs/speed.md,
# "Blocks").
PER_GRAD_BLOCK_ROWS = 1024
# Widest site the fused kernel serves. On an H200 (docs/speed.md), float32 points, 256
# directions: at d = 16-64 the kernel's float32-accurate products take 0.43-0.52x the
# plain path's (TF32 off) time, at d = 192 and 240 1.9x and 1.3x: wider sites (the deep ELU
# net's) take the plain path.
FUSED_MAX_DIM = 128


def _use_fused_kernel(x: torch.Tensor) -> bool:
    """The Triton kernel serves CUDA tensors of `d <= FUSED_MAX_DIM` in float32/bf16/fp16,
    unless the environment sets `PER_TRITON=0` or Triton is not installed (a CUDA build
    without it, e.g. on Windows: the plain path then)."""
    return (x.is_cuda and x.dtype != torch.float64 and x.shape[1] <= FUSED_MAX_DIM
            and os.environ.get("PER_TRITON", "1") != "0" and HAS_TRITON)


HAS_TRITON = importlib.util.find_spec("triton") is not None   # a constant: compiled code reads it freely


def _per_grad_blocked(x: torch.Tensor, theta: torch.Tensor, scale: float,
                      block_rows: int) -> torch.Tensor:
    """`scale * erf(x theta / sqrt 2) theta^T`, `block_rows` points at a time, in plain
    torch ops: the path off CPU (one block) and the one `PER_CPU_COMPILE=1` compiles.

    `x: (N, d)`, `theta: (d, s)` in `compute_dtype(x)` -> `(N, d)` in `x`'s dtype. Each
    block projects in `x`'s dtype (as `project`), then takes `erf` and back-projects in
    `compute_dtype(x)`. Traced by torch.compile, the concatenated blocks become products
    written straight into one buffer.
    """
    n, d = x.shape
    cdtype = compute_dtype(x)
    # Fold 1/sqrt 2 and `scale` into the smaller operand: the directions (d x s, once) when
    # d <= N, else each block's projections (rows x s).
    fold = d <= n
    theta_in = (theta / _SQRT2 if fold else theta).to(x.dtype)                  # (d, s)
    theta_out = (theta.T * scale).contiguous() if fold else theta.T             # (s, d)
    blocks = []
    for start in range(0, n, block_rows):
        e = (x[start:start + block_rows] @ theta_in).to(cdtype)                 # (b, s)
        e = e.erf_() if fold else e.mul_(1 / _SQRT2).erf_().mul_(scale)
        blocks.append((e @ theta_out).to(x.dtype))                              # (b, d)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _per_grad_cpu(xs: torch.Tensor, theta: torch.Tensor, scale: float, block_rows: int,
                  outs: torch.Tensor, adds: torch.Tensor | None = None) -> None:
    """The eager CPU path of `per_grad`: `outs = [adds +] scale * erf(xs theta / sqrt 2) theta^T`,
    about `block_rows` points at a time, so each block's projections stay in cache.

    `xs`, `outs`, `adds`: `(B, n, d)` views of point clouds (`per_grad`: `B = 1`; a
    contiguous `(B, C, H, W)` site: each example's `H*W` positions, a transposed view of its
    memory, so no copy is made); `adds` in `outs`' dtype; `theta: (d, s)` in
    `compute_dtype(xs)`. A block is part of one example's points, or several whole examples
    (batched products). Per block: the projections, shifted by `_PROJECTION_SHIFT` in the
    same product; `erf` by `_scaled_erf_cpu`; the back-projection added into `outs`. Two
    buffers of a block's `(points, s)` serve every block (fresh ones cost page faults: the
    reuse took 0.77x the time over a ResNet-20 step's 19 sites). One sum checks the result:
    rows that are not finite (a point holding NaN or inf, a projection that overflows, a
    shifted projection of exactly 0, a non-finite addend) are redone by `_redo_rows_cpu`.
    """
    (b, n, d), s = xs.shape, theta.shape[1]
    cdtype = compute_dtype(xs)
    rows, group = (block_rows, 1) if n >= block_rows else (n, min(b, block_rows // n))
    proj = torch.empty(group, rows, s, dtype=cdtype)
    erfs = torch.empty(group, rows, s, dtype=cdtype)
    theta_in, theta_out = theta.to(xs.dtype).expand(group, d, s), theta.T.expand(group, s, d)
    shift = torch.full((s,), _PROJECTION_SHIFT, dtype=cdtype)
    minus_scale = torch.tensor(-scale, dtype=cdtype)
    if adds is None:
        outs.zero_()
    else:
        outs.copy_(adds)

    def blocks(t: torch.Tensor) -> list[torch.Tensor]:   # (g, r, d) views: g examples, r points
        return [block for examples in t.split(group) for block in examples.split(rows, dim=1)]

    for xb, ob in zip(blocks(xs), blocks(outs)):
        g, r = xb.shape[:2]                  # r < rows only where group = 1: contiguous slices
        p, e = proj[:g, :r], erfs[:g, :r]
        if xs.dtype == cdtype:
            torch.baddbmm(shift, xb, theta_in[:g], out=p)
        else:                                # bf16/fp16 points project in their dtype
            p.copy_(torch.bmm(xb, theta_in[:g])).add_(_PROJECTION_SHIFT)
        _scaled_erf_cpu(p, scale, out=e, minus_scale=minus_scale)
        if ob.dtype == cdtype:
            ob.baddbmm_(e, theta_out[:g])
        else:
            ob.add_(torch.bmm(e, theta_out[:g]))
    if not math.isfinite(float(outs.sum(dtype=cdtype))):
        _redo_rows_cpu(xs, theta, scale, outs, adds)


def _redo_rows_cpu(xs: torch.Tensor, theta: torch.Tensor, scale: float, outs: torch.Tensor,
                   adds: torch.Tensor | None) -> None:
    """Recomputes the rows of `outs` that are not finite with ATen's `erf` (exact at 0,
    +-1 at infinite projections); rows of points holding NaN or inf become NaN. Arguments
    as `_per_grad_cpu`'s. Only on such steps: finding the rows takes a pass over `outs`."""
    bad = ~torch.isfinite(outs).all(dim=2)                                      # (B, n)
    x = xs[bad]                                                                 # (k, d)
    p = (x @ theta.to(x.dtype)).to(theta.dtype)                                 # (k, s)
    rows = torch.erf(p / _SQRT2).mul_(scale) @ theta.T                          # (k, d)
    if adds is not None:
        rows = rows + adds[bad]
    rows[~torch.isfinite(x).all(dim=1)] = float("nan")
    outs[bad] = rows.to(outs.dtype)


# The CPU path adds this to every projection, as the bias of its product, before
# `_scaled_erf_cpu` (at 0 its `gelu(q) / q` is `0 / 0`, and a point whose channels are all 0
# projects to 0): erf(p / sqrt 2) moves by at most 0.8 * 1e-20, far below float32's and
# float64's resolution of a gradient row (a sum of terms up to 1). A shifted projection of
# exactly 0 (exact cancellation) gives NaN, and `_per_grad_cpu` redoes the row. A subnormal
# one would give a finite but wrong erf (off by up to 1: `gelu` rounds `q / 2` on the
# subnormals' grid). It cannot occur while every nonzero product of a coordinate and a
# direction entry is at least 2^-60 (float32; 2^-900 float64): every partial sum, in any
# order, with or without FMA, is then a multiple of 2^-107 (2^-1005), as the shift is, so the
# shifted projection is 0 or normal. Below that, a subnormal needs terms that cancel exactly
# (the bias can enter the sum first and be absorbed): adversarial inputs, none among the
# 74M shifted projections of a ResNet-20 step (no 0 either). Adding the shift after
# the product instead would rule it out at one more pass over the projections: 3.6 ms of a
# 162 ms ResNet-20 step, interleaved, a job on the other core (as much as checking the
# products' size first).
_PROJECTION_SHIFT = 1e-20


def _scaled_erf_cpu(q: torch.Tensor, scale: float, *, out: torch.Tensor,
                    minus_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`out = scale * erf(q / sqrt 2)` on CPU through the exact identity
    `erf(q / sqrt 2) = 2 gelu(q) / q - 1` (`gelu(q) = q Phi(q)`, `Phi` the normal CDF), for
    shifted projections `q`: normal floats (at 0 the result is NaN, as at NaN and infinite
    `q`; on subnormals it can be off by up to 1, see `_PROJECTION_SHIFT`).

    Why: ATen's `erf` on CPU calls MKL's high-accuracy `vsErf`, while its exact `gelu`
    evaluates `erf` with a vectorized polynomial. Per float32 value on this machine kind
    (AVX-512, one thread, 1024 x 256 block): about 0.3 ns for these two passes against
    1.0 ns for `erf`; max abs error 7e-7 against float64 (`erf`: 6e-8).
    `minus_scale`: `-scale` as a 0-d tensor of `q`'s dtype, made once by a caller of many blocks.
    """
    if minus_scale is None:
        minus_scale = torch.tensor(-scale, dtype=q.dtype)
    torch.ops.aten.gelu.out(q, out=out)
    return torch.addcdiv(minus_scale, out, q, value=2 * scale, out=out)


def _per_grad_cpu_compiled(x: torch.Tensor, theta: torch.Tensor, scale: float,
                           block_rows: int) -> torch.Tensor:
    """`_per_grad_blocked` through `torch.compile` (`PER_CPU_COMPILE=1`, float32 on CPU):
    Inductor's vectorized C++ `erf` and no per-block Python; max abs error of its `erf`
    5e-7 against float64. Its time against the eager `_per_grad_cpu`: docs/speed.md.

    Compiled per point-cloud shape (`dynamic=False`: the block loop unrolls; a ResNet run
    has one per stage, twice with the epoch's last partial batch); past torch's recompile
    limit (8 shapes) new shapes run eager. It needs a C++ compiler; the first call
    compiles for about 15 s.
    """
    global _compiled_blocked
    if _compiled_blocked is None:
        _compiled_blocked = torch.compile(_per_grad_blocked, dynamic=False)
    try:
        return _compiled_blocked(x, theta, scale, block_rows)
    except Exception as err:   # the backend reports a missing compiler on the first call
        raise RuntimeError("PER_CPU_COMPILE=1 needs torch.compile's C++ backend (a working C++ "
                           f"compiler); unset PER_CPU_COMPILE to use the eager path. Cause: {err}") from err


_compiled_blocked = None


def l1_penalty(x: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """`sum_i ||x_i||_1` ("sum") or `(1/N)` times that ("mean") for `x: (N, d)`;
    0-d tensor in `compute_dtype(x)`."""
    check_points(x)
    return _reduce(x.to(compute_dtype(x)).abs().sum(dim=1), reduction)


def l2_penalty(x: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """`sum_i ||x_i||_2^2` ("sum") or `(1/N)` times that ("mean") for `x: (N, d)`;
    0-d tensor in `compute_dtype(x)`."""
    check_points(x)
    return _reduce(x.to(compute_dtype(x)).square().sum(dim=1), reduction)


def check_layout(layout: str) -> None:
    """Raise ValueError unless `layout` is one of `LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")


def to_points(h: torch.Tensor, layout: str = "channels") -> torch.Tensor:
    """Activations -> point cloud `(N, d)`.

    - `(B, d)` -> unchanged (`N = B`).
    - `(B, C, H, W)`, layout "channels" -> `(B*H*W, C)`: each spatial position is a point;
      layout "flatten" -> `(B, C*H*W)`: each example is a point.
    - `(T, B, d)` (always a sequence) -> `(T*B, d)`: each example and time step is a point.
    """
    d = point_dim(h.shape, layout)     # checks the layout and the rank
    if h.dim() == 2:
        return h
    if h.dim() == 4 and layout == "channels":
        return h.permute(0, 2, 3, 1).reshape(-1, d)
    return h.reshape(-1, d)


def point_dim(shape: torch.Size, layout: str = "channels") -> int:
    """`d` of `to_points(h, layout)` for activations of `shape`, without building the points."""
    check_layout(layout)
    if len(shape) == 4 and layout == "flatten":
        return shape[1] * shape[2] * shape[3]
    if len(shape) in (2, 4):
        return shape[1]
    if len(shape) == 3:
        return shape[2]
    raise ValueError(f"activations must have rank 2 (B, d), 3 (T, B, d) or 4 (B, C, H, W), "
                     f"got shape {tuple(shape)}")


def from_points(x: torch.Tensor, shape: torch.Size, layout: str = "channels") -> torch.Tensor:
    """Inverse of `to_points`: `x: (N, d)` -> a tensor of `shape` (a view where possible)."""
    if len(shape) == 4 and layout == "channels":
        b, c, h, w = shape
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.reshape(shape)
