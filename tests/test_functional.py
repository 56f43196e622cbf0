"""per.functional against independent NumPy/scipy float64 evaluations of the formulas in docs/method.md."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import per
from per.functional import from_points


def _np_phi(p: np.ndarray) -> np.ndarray:
    return p * scipy.special.erf(p / np.sqrt(2)) + np.sqrt(2 / np.pi) * np.exp(-p ** 2 / 2)


def _np_per(x: np.ndarray, theta: np.ndarray, reduction: str) -> tuple[float, np.ndarray]:
    """Algorithm 1 ("sum") and eq. 5/6 ("mean") written out, loop by loop:
    L = sum_i (1/s) sum_k phi(p_ik), dL/dx_i = (1/s) sum_k erf(p_ik/sqrt2) theta_k,
    both divided by N for "mean"."""
    n, s = x.shape[0], theta.shape[1]
    loss, grad = 0.0, np.zeros_like(x)
    for i in range(n):
        for k in range(s):
            p = float(x[i] @ theta[:, k])
            loss += _np_phi(np.array(p)) / s
            grad[i] += scipy.special.erf(p / np.sqrt(2)) * theta[:, k] / s
    scale = 1.0 / n if reduction == "mean" else 1.0
    return float(loss) * scale, grad * scale


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n, d", [(37, 6), (3, 20)])  # N > d and N < d (flatten-like)
def test_per_loss_and_grad_match_numpy_float64(n, d, reduction):
    rng = np.random.default_rng(0)
    x_np = rng.normal(0.5, 2.0, size=(n, d))
    theta = rng.normal(size=(d, 11))
    theta /= np.linalg.norm(theta, axis=0)
    want_loss, want_grad = _np_per(x_np, theta, reduction)

    x = torch.tensor(x_np, requires_grad=True)
    directions = torch.tensor(theta)
    loss = per.per_loss(x, directions, reduction=reduction)
    loss.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(per.per_grad(x.detach(), directions, reduction=reduction).numpy(),
                               want_grad, rtol=1e-10, atol=1e-14)


def test_default_reduction_is_algorithm_1_sum():
    x = torch.randn(50, 3, dtype=torch.float64)
    directions = per.sample_directions(3, 8, dtype=torch.float64)
    assert per.per_loss(x, directions).item() == pytest.approx(
        50 * per.per_loss(x, directions, reduction="mean").item(), rel=1e-12)
    torch.testing.assert_close(per.per_grad(x, directions),
                               50 * per.per_grad(x, directions, reduction="mean"))
    for fn in (per.per_loss, per.per_grad, per.l1_penalty, per.l2_penalty):
        args = (x, directions) if fn is per.per_grad else (x,)
        with pytest.raises(ValueError, match="valid: sum, mean"):
            fn(*args, reduction="avg")


def test_per_loss_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    directions = per.sample_directions(4, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: per.per_loss(t, directions), (x,))
    assert torch.autograd.gradgradcheck(lambda t: per.per_loss(t, directions), (x,))


def test_per_grad_equals_autograd_float32():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 8, generator=gen, requires_grad=True)
    directions = per.sample_directions(8, 32, generator=gen)
    per.per_loss(x, directions).backward()
    torch.testing.assert_close(per.per_grad(x.detach(), directions), x.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("value", [-3.0, -0.7, 0.0, 0.4, 2.5])
def test_phi_is_expected_abs_difference_to_standard_normal(value):
    # Monte Carlo E|x - Z|: std(|x - Z|) <= sqrt(x^2 + 1), so 5 standard errors is the margin.
    n = 2_000_000
    z = np.random.default_rng(3).standard_normal(n)
    mc = np.abs(value - z).mean()
    margin = 5 * math.sqrt(value ** 2 + 1) / math.sqrt(n)
    assert abs(per.phi(torch.tensor(value, dtype=torch.float64)).item() - mc) < margin


def test_phi_matches_its_formula_and_derivative():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    per.phi(x).sum().backward()
    x_np = x.detach().numpy()
    np.testing.assert_allclose(per.phi(x.detach()).numpy(), _np_phi(x_np), rtol=1e-14)
    np.testing.assert_allclose(x.grad.numpy(), scipy.special.erf(x_np / np.sqrt(2)), rtol=1e-14)


def test_phi_at_zero():
    assert per.phi(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(
        math.sqrt(2 / math.pi), rel=1e-15)


def test_sample_directions_unit_columns_and_generator():
    a = per.sample_directions(5, 300, generator=torch.Generator().manual_seed(4))
    b = per.sample_directions(5, 300, generator=torch.Generator().manual_seed(4))
    c = per.sample_directions(5, 300, generator=torch.Generator().manual_seed(5))
    assert a.shape == (5, 300) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=0), torch.ones(300))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Uniform on the sphere: the mean direction is ~ 0 (each coordinate has variance 1/(d n)).
    assert a.mean(dim=1).abs().max() < 5 / math.sqrt(5 * 300)
    assert per.sample_directions(3, 2, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("d, s", [(0, 4), (3, 0), (3, -1)])
def test_sample_directions_rejects_bad_sizes(d, s):
    with pytest.raises(ValueError, match=">= 1"):
        per.sample_directions(d, s)


def test_per_loss_generator_reproducible():
    x = torch.randn(20, 3)
    a = per.per_loss(x, num_slices=16, generator=torch.Generator().manual_seed(6))
    b = per.per_loss(x, num_slices=16, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def test_per_loss_bf16_accumulates_in_fp32():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(128, 16, generator=gen)
    directions = per.sample_directions(16, 64, generator=gen)
    loss = per.per_loss(x.bfloat16(), directions)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(per.per_loss(x, directions).item(), rel=1e-2)
    grad = per.per_grad(x.bfloat16(), directions)   # (1/s) sum_k erf(.) theta_k: entries <= 1
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), per.per_grad(x, directions), rtol=0.05, atol=2e-3)


def test_l1_l2_match_numpy():
    x_np = np.random.default_rng(8).normal(size=(10, 4))
    x = torch.tensor(x_np)
    assert per.l1_penalty(x).item() == pytest.approx(np.abs(x_np).sum(), rel=1e-12)
    assert per.l2_penalty(x).item() == pytest.approx((x_np ** 2).sum(), rel=1e-12)
    assert per.l1_penalty(x, reduction="mean").item() == pytest.approx(
        np.abs(x_np).sum(axis=1).mean(), rel=1e-12)
    assert per.l2_penalty(x, reduction="mean").item() == pytest.approx(
        (x_np ** 2).sum(axis=1).mean(), rel=1e-12)
    assert per.l2_penalty(x.float().bfloat16()).dtype == torch.float32


def test_per_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        per.per_loss(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="non-finite"):
        per.per_loss(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        per.per_loss(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="num_slices"):
        per.per_loss(torch.zeros(2, 3), num_slices=0)
    with pytest.raises(ValueError, match="directions"):
        per.per_loss(torch.zeros(2, 3), torch.zeros(4, 5))


def test_to_points_shapes_and_layouts():
    h2 = torch.randn(4, 3)
    assert per.to_points(h2) is h2
    h4 = torch.randn(2, 3, 4, 5)
    pts = per.to_points(h4, "channels")
    assert pts.shape == (2 * 4 * 5, 3)
    torch.testing.assert_close(pts[1 * 20 + 2 * 5 + 3], h4[1, :, 2, 3])  # point (b=1, y=2, x=3)
    torch.testing.assert_close(per.to_points(h4.contiguous(memory_format=torch.channels_last)), pts)
    flat = per.to_points(h4, "flatten")
    assert flat.shape == (2, 60)
    torch.testing.assert_close(flat[1], h4[1].reshape(-1))
    seq = torch.randn(7, 2, 3)
    assert per.to_points(seq, "flatten").shape == (14, 3)
    torch.testing.assert_close(per.to_points(seq)[1 * 2 + 1], seq[1, 1])
    for layout in per.LAYOUTS:
        for h in (h2, h4, seq):
            assert torch.equal(from_points(per.to_points(h, layout), h.shape, layout), h)


def test_to_points_rejects_bad_input():
    with pytest.raises(ValueError, match="channels, flatten"):
        per.to_points(torch.zeros(2, 3), "pixels")
    for shape in [(5,), (1, 2, 3, 4, 5)]:
        with pytest.raises(ValueError, match=r"rank 2 .* 3 .* 4"):
            per.to_points(torch.zeros(shape))


def _unblocked_per_grad(x: torch.Tensor, theta: torch.Tensor, reduction: str) -> torch.Tensor:
    """The formula in one piece, in float64: `erf(x theta / sqrt 2) theta^T / s` (/ N for "mean")."""
    x64, t64 = x.double(), theta.double()
    g = torch.erf(x64 @ t64 / math.sqrt(2)) @ t64.T / theta.shape[1]
    return g / x.shape[0] if reduction == "mean" else g


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-15),
                                               (torch.float32, 1e-5, 1e-7),
                                               (torch.bfloat16, 2e-2, 2e-3)])
@pytest.mark.parametrize("n, d, block", [(1000, 16, 256),   # N not a multiple of the block
                                         (100, 8, 256),     # N < block: one block
                                         (12, 40, 5)])      # d > N: constants folded per block
def test_per_grad_blocks_equal_the_unblocked_formula(n, d, block, dtype, rtol, atol, reduction,
                                                     monkeypatch):
    monkeypatch.setattr(per.functional, "PER_GRAD_BLOCK_ROWS", block)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    theta = per.sample_directions(d, 64, generator=gen, dtype=torch.float64)
    got = per.per_grad(x, theta, reduction=reduction)
    assert got.dtype == dtype and got.shape == (n, d)
    # bf16 projects in bf16 (as `project`): compare with the same rounded directions.
    want = _unblocked_per_grad(x, theta.to(dtype) if dtype == torch.bfloat16 else theta, reduction)
    scale = 1.0 if reduction == "sum" else 1.0 / n
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale)


def test_per_grad_block_size_does_not_change_the_result(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(777, 16, generator=gen)
    theta = per.sample_directions(16, 256, generator=gen)
    results = []
    for block in (1, 64, 777, 10_000):
        monkeypatch.setattr(per.functional, "PER_GRAD_BLOCK_ROWS", block)
        results.append(per.per_grad(x, theta))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-8)


def test_per_grad_accepts_non_contiguous_points():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(4, 16, 5, 5, generator=gen)      # channels layout: a permuted view
    x = per.to_points(h.contiguous(memory_format=torch.channels_last), "channels")
    theta = per.sample_directions(16, 32, generator=gen)
    torch.testing.assert_close(per.per_grad(x, theta), per.per_grad(x.contiguous(), theta))
    torch.testing.assert_close(per.per_grad(x.T.contiguous().T, theta).double(),
                               _unblocked_per_grad(x, theta, "sum"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("layout", per.LAYOUTS)
def test_point_dim_is_the_width_of_the_points(shape, layout):
    assert per.functional.point_dim(torch.Size(shape), layout) == per.to_points(torch.zeros(shape), layout).shape[1]


def test_point_dim_rejects_bad_ranks_and_layouts():
    with pytest.raises(ValueError, match="rank 2"):
        per.functional.point_dim(torch.Size([2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="valid: channels, flatten"):
        per.functional.point_dim(torch.Size([2, 3]), "rows")


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_cpu_erf_through_gelu_is_erf_or_not_finite(dtype, atol):
    """`_scaled_erf_cpu` (2 gelu(q) / q - 1) of shifted projections `q = p + shift` against
    float64 `erf(p / sqrt 2)` for `p`: 0, subnormals (the shift absorbs them: no `q` here
    is subnormal, the identity's one bad range), the shift and its neighbours, a log-spaced
    sweep of the ordinary range, values where `gelu` overflows and infinity. Every finite
    result is right; results that are not (their rows are redone) come only from `q = 0`,
    overflow and infinity."""
    finfo = torch.finfo(dtype)
    shift = per.functional._PROJECTION_SHIFT
    mags = torch.cat([torch.tensor([0.0, finfo.smallest_normal / 4, finfo.smallest_normal, 1e-31, shift,
                                    shift * (1 + finfo.eps), 3e-20, finfo.max / 2, finfo.max, math.inf],
                                   dtype=torch.float64),
                      torch.logspace(-40, 1.5, 5000, dtype=torch.float64)])
    p = torch.cat([mags, -mags]).to(dtype)
    q = p + shift                                               # as the product's bias adds it
    assert not ((q != 0) & (q.abs() < finfo.smallest_normal)).any()
    for scale in (1.0, 1 / 256):
        got = per.functional._scaled_erf_cpu(q, scale, out=torch.empty_like(q)).double()
        want = scale * torch.erf(p.double() / math.sqrt(2))
        finite = got.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=atol * scale)
        may_fail = (q == 0) | (p.abs() >= finfo.max)           # -shift, +-max, +-inf
        assert (finite | may_fail).all(), p[~finite & ~may_fail]
        assert not finite[q == 0].any() and finite.sum() >= len(p) - 5


def test_per_grad_redoes_the_rows_of_a_projection_at_minus_the_shift():
    """A projection of exactly `-shift` makes the shifted one 0 (`0 / 0` in the gelu
    identity): that point's row is recomputed with ATen's erf, the others are untouched."""
    shift = torch.tensor(per.functional._PROJECTION_SHIFT, dtype=torch.float32).item()
    x = torch.tensor([[-shift], [0.5], [0.0]])
    theta = torch.tensor([[1.0, -1.0]])
    got = per.per_grad(x, theta).double()
    want = torch.erf(x.double() @ theta.double() / math.sqrt(2)) @ theta.double().T / 2
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    h = x.T.reshape(1, 1, 1, 3).contiguous()                # the same points, as an NCHW site
    go = torch.ones_like(h)
    out = per.functional.add_per_grad(go, h, theta, 2.0)
    torch.testing.assert_close(per.to_points(out, "channels").double(), 1 + 2 * want, rtol=1e-6, atol=1e-30)


def test_per_grad_gives_nan_rows_for_non_finite_points():
    """per_grad returns NaN for the points that hold NaN or inf (the CPU path's redone rows),
    and finite values for the others, zeros included."""
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0], [1.0, 2.0], [0.0, 0.0]])
    theta = per.sample_directions(2, 16, generator=torch.Generator().manual_seed(0))
    got = per.per_grad(x, theta)
    assert got[:2].isnan().all() and got[2:].isfinite().all()
    torch.testing.assert_close(got[2:].double(), _unblocked_per_grad(x[2:], theta, "sum"), rtol=1e-5, atol=1e-7)



def test_shifted_projections_stay_normal_when_products_cancel_exactly():
    """Products that cancel exactly (1 - 1) leave the remainder of the smallest one. While
    every product is at least 2^-60, the shifted projection is still normal (or 0), whatever
    order the product adds the shift in, and the gradient is right."""
    c = torch.tensor(0.5 ** 0.5).item()
    for tiny in (2.0 ** -59, 2.0 ** -60):
        theta = torch.tensor([[c], [c], [2.0 ** -19]]).expand(3, 256).contiguous()
        for n in (1, 2, 8):                          # small-matrix kernels differ by shape
            x = torch.tensor([[1.0, -1.0, tiny / 2.0 ** -19]]).expand(n, 3).contiguous()
            want = torch.erf(x.double() @ theta.double() / math.sqrt(2)) @ theta.double().T / 256
            torch.testing.assert_close(per.per_grad(x, theta).double(), want, rtol=1e-6, atol=1e-12)
            h = x.T.reshape(1, 3, n, 1).contiguous()
            got = per.functional.add_per_grad(torch.zeros_like(h), h, theta, 1.0)
            torch.testing.assert_close(per.to_points(got, "channels").double(), want, rtol=1e-6, atol=1e-12)


def test_add_per_grad_redoes_rows_in_any_example_and_not_for_zero_points(monkeypatch):
    """The row check covers every example of a batched block (an overflowing point in the
    third of four examples, 9 points each, blocks of 2 examples), and points that are all
    zeros (dead ReLU channels) take the shifted identity without a redo."""
    monkeypatch.setattr(per.functional, "PER_GRAD_BLOCK_ROWS", 18)
    gen = torch.Generator().manual_seed(9)
    h, go = torch.randn(4, 3, 3, 3, generator=gen).relu(), torch.randn(4, 3, 3, 3, generator=gen)
    h[:, :, 0] = 0.0                                 # three dead points per example
    theta = per.sample_directions(3, 16, generator=gen)
    redone = []
    real = per.functional._redo_rows_cpu
    monkeypatch.setattr(per.functional, "_redo_rows_cpu", lambda *a: (redone.append(1), real(*a)))
    got = per.functional.add_per_grad(go, h, theta, 0.7)
    assert not redone
    torch.testing.assert_close(got.double(), _added_through_points(go, h, theta, 0.7), rtol=1e-5, atol=1e-6)
    h[2, :, 1, 1] = torch.tensor([3e38, 3e38, -3e38])   # finite, but its projections overflow
    got = per.functional.add_per_grad(go, h, theta, 0.7)
    assert redone and got.isfinite().all()
    x = per.to_points(h.double(), "channels")
    p = (x @ theta.double()).clamp(-1e300, 1e300)
    want = go.double() + 0.7 * from_points(torch.erf(p / math.sqrt(2)) @ theta.double().T / 16, h.shape, "channels")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("rows", [slice(0, 2), slice(0, 3)])
def test_per_grad_of_huge_finite_points(rows):
    """float32 points up to the dtype's range: rows 0-1 project finitely and take the gelu
    identity; the third point's projections overflow, so the CPU path redoes its row with
    ATen's erf. Either way erf is +-1 where it should be."""
    x = torch.tensor([[1e36, -1e36], [1.0, 2.0], [3e38, -3e38]])[rows]
    theta = per.sample_directions(2, 16, generator=torch.Generator().manual_seed(2))
    got = per.per_grad(x, theta).double()
    p = (x.double() @ theta.double()).clamp(-1e300, 1e300)
    assert rows.stop == 2 or torch.isinf(x @ theta).any()       # the overflow this case is about
    torch.testing.assert_close(got, torch.erf(p / math.sqrt(2)) @ theta.double().T / 16, rtol=1e-5, atol=1e-7)


def test_per_grad_of_huge_points_and_long_directions():
    """Finite points whose float32 coordinate sum overflows keep finite rows; a direction
    longer than 1 makes a projection of a finite point infinite (erf 1, in a redone row)."""
    x = torch.tensor([[3e38, 3e38], [1.0, -2.0]])
    theta = per.sample_directions(2, 8, generator=torch.Generator().manual_seed(3))
    want = torch.erf(x.double() @ theta.double() / math.sqrt(2)) @ theta.double().T / 8
    torch.testing.assert_close(per.per_grad(x, theta).double(), want, rtol=1e-5, atol=1e-7)
    h = x.T.reshape(1, 2, 1, 2).contiguous()                # the same points, as an NCHW site
    got = per.functional.add_per_grad(torch.zeros_like(h), h, theta, 1.0)
    torch.testing.assert_close(per.to_points(got, "channels").double(), want, rtol=1e-5, atol=1e-7)
    long = torch.tensor([[10.0]])
    assert torch.isinf(torch.tensor([[1e38]]) @ long).all()
    assert per.per_grad(torch.tensor([[1e38]]), long).item() == 10.0     # erf(inf) * 10


def test_fp16_points_whose_projections_overflow_get_erf_of_infinity():
    """fp16 projects in fp16: a point along the first direction's signs projects past
    fp16's range (inf, where erf is 1); the points are finite, so their rows are too (the
    row check sums in float32)."""
    theta = per.sample_directions(256, 8, generator=torch.Generator().manual_seed(1))
    x = torch.stack([30000.0 * torch.sign(theta[:, 0]), torch.full((256,), -300.0)]).half()
    assert torch.isinf(x @ theta.half())[0, 0]          # the overflow this test is about
    assert torch.isinf(x[1].sum())                      # -76800: past fp16's range
    got = per.per_grad(x, theta).double()
    want = torch.erf(x.double() @ theta.double() / math.sqrt(2)) @ theta.double().T / 8
    assert got.isfinite().all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def _added_through_points(go, h, theta, lam, layout="channels", reduction="sum"):
    """`go + lam * dL/dh` the plain way: points, `per_grad`, back to `h`'s shape, in float64."""
    x = per.to_points(h.double(), layout)
    return go.double() + lam * from_points(_unblocked_per_grad(x, theta.double(), reduction), h.shape, layout)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-12, 1e-14), (torch.float32, 1e-5, 1e-6)])
@pytest.mark.parametrize("shape, block", [((3, 4, 6, 5), 64),    # 30 points per example: 2 per block, then 1
                                          ((2, 4, 9, 9), 32),    # 81 points: blocks of 32, 32, 17 per example
                                          ((5, 8, 1, 1), 1024)]) # all examples in one block
def test_add_per_grad_in_place_layout_equals_the_points_formula(shape, block, dtype, rtol, atol, reduction,
                                                                monkeypatch):
    """The CPU path that works in a contiguous NCHW site's own memory (examples grouped or
    split into blocks, the last product adding into `grad_output`) against the formula."""
    monkeypatch.setattr(per.functional, "PER_GRAD_BLOCK_ROWS", block)
    gen = torch.Generator().manual_seed(6)
    h, go = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    theta = per.sample_directions(shape[1], 32, generator=gen, dtype=torch.float64).to(dtype)
    got = per.functional.add_per_grad(go, h, theta, 0.3, reduction=reduction)
    assert got.shape == h.shape and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got.double(), _added_through_points(go, h, theta, 0.3, reduction=reduction),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", ["channels_last", "sliced", "flatten", "rank 3", "bf16", "mixed dtypes"])
def test_add_per_grad_other_sites_go_through_per_grad(case):
    gen = torch.Generator().manual_seed(7)
    h, go = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    layout = "flatten" if case == "flatten" else "channels"
    if case == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    elif case == "sliced":
        h, go = h[:, :, ::2], go[:, :, ::2]
    elif case == "rank 3":
        h, go = h[0], go[0]
    elif case == "bf16":
        h, go = h.bfloat16(), go.bfloat16()
    elif case == "mixed dtypes":
        go = go.double()
    theta = per.sample_directions(per.functional.point_dim(h.shape, layout), 16, generator=gen)
    got = per.functional.add_per_grad(go, h, theta, 0.5, layout=layout)
    want = torch.add(go, from_points(per.per_grad(per.to_points(h, layout), theta), h.shape, layout).to(go.dtype),
                     alpha=0.5)
    assert got.dtype == go.dtype
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.double(), _added_through_points(go, h, theta.to(h.dtype), 0.5, layout),
                               rtol=2e-2 if case == "bf16" else 1e-5, atol=2e-2 if case == "bf16" else 1e-6)


def test_add_per_grad_gives_nan_at_the_non_finite_positions_only(monkeypatch):
    monkeypatch.setattr(per.functional, "PER_GRAD_BLOCK_ROWS", 8)
    gen = torch.Generator().manual_seed(8)
    h, go = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    h[1, 0, 2, 3], h[2, 1, 0, 0] = float("nan"), float("-inf")
    theta = per.sample_directions(2, 16, generator=gen)
    got = per.functional.add_per_grad(go, h, theta, 1.0)
    bad = torch.zeros(3, 4, 4, dtype=torch.bool)
    bad[1, 2, 3] = bad[2, 0, 0] = True
    assert got.isnan().all(dim=1).eq(bad).all() and got.isnan().any(dim=1).eq(bad).all()
    finite = _added_through_points(go, h.nan_to_num(0.0, 0.0, 0.0), theta, 1.0)
    torch.testing.assert_close(got.double().permute(0, 2, 3, 1)[~bad], finite.permute(0, 2, 3, 1)[~bad],
                               rtol=1e-5, atol=1e-6)


def test_add_per_grad_checks_its_arguments():
    h = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="d = 4"):
        per.functional.add_per_grad(h, h, per.sample_directions(5, 8), 1.0)
    with pytest.raises(ValueError, match="valid: sum, mean"):
        per.functional.add_per_grad(h, h, per.sample_directions(4, 8), 1.0, reduction="avg")


def test_no_points_have_an_empty_gradient_and_a_zero_penalty_under_both_reductions():
    theta = per.sample_directions(8, 16)
    for reduction in per.functional.REDUCTIONS:
        got = per.per_grad(torch.zeros(0, 8), theta, reduction=reduction)
        assert got.shape == (0, 8)
        for loss in (per.per_loss(torch.zeros(0, 8), theta, reduction=reduction),
                     per.functional.l1_penalty(torch.zeros(0, 8), reduction=reduction),
                     per.functional.l2_penalty(torch.zeros(0, 8), reduction=reduction)):
            assert loss.item() == 0.0


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "mean"}])
def test_per_grad_reads_points_that_require_grad_detached_on_every_path(kwargs, monkeypatch):
    x, theta = torch.randn(40, 6, requires_grad=True), per.sample_directions(6, 32)
    want = per.per_grad(x.detach(), theta, **kwargs)
    for compiled in ("0", "1"):          # the eager CPU path and PER_CPU_COMPILE's
        monkeypatch.setenv("PER_CPU_COMPILE", compiled)
        got = per.per_grad(x, theta, **kwargs)
        assert not got.requires_grad
        torch.testing.assert_close(got, want)


def _gradient_statistics(draw, x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """`k` draws of `(g, p) = draw()` -> `(k, 12)`: gradient rows' components along `u` (in
    the points' span) and `w` (orthogonal to it), two rows' norms and inner product, a
    projection on the last direction, a per-point mean of `phi`, a point's sum of squared
    projections, and that times its squared gradient norm."""
    rows = []
    for _ in range(k):
        g, p = draw()
        rows.append(torch.stack([g[0] @ u, g[2] @ u, g[0] @ w, g[2] @ w, g[1] @ w, g[0].norm(), g[2].norm(),
                                 g[0] @ g[2], p[0, -1], per.phi(p[2]).mean(), p[2].square().sum(),
                                 g[0].square().sum() * p[0].square().sum()]))
    return torch.stack(rows)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_grad_subspace_has_the_distribution_of_explicit_directions(reduction):
    # Small enough that every part of the construction shows: d = N + s, the smallest the
    # route takes, so Bartlett's chi^2 degrees of freedom run from 12 down to 1; two points
    # are collinear (a rank-deficient cloud). Each of these mistakes fails it with a KS
    # p-value of 2e-8 to 1e-144: dropping the "-k" of the degrees of freedom or adding 1 to
    # them, dropping Bartlett's off-diagonal or scaling it by 1.1, not projecting the
    # complement's frame off the points' span, not orthonormalizing it, or orthonormalizing
    # it with the Gram matrix of the unprojected draw. Correct: p >= 0.06 here.
    gen = torch.Generator().manual_seed(0)
    n, d, s = 3, 15, 12
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    x[1] = 2 * x[0]
    u = x[0] / x[0].norm()
    w = torch.randn(d, dtype=torch.float64, generator=gen)
    basis = torch.linalg.qr(x.T).Q
    w -= basis @ (basis.T @ w)
    w /= w.norm()

    def explicit():
        theta = per.sample_directions(d, s, generator=gen, dtype=torch.float64)
        return per.per_grad(x, theta, reduction=reduction), per.functional.project(x, theta)

    def subspace():
        return per.per_grad_subspace(x, s, reduction=reduction, generator=gen)

    gen.manual_seed(1)
    first = explicit()[0]
    gen.manual_seed(1)
    assert not torch.equal(subspace()[0], first)        # the implicit route, not the fallback
    k = 4000
    ref, got = (_gradient_statistics(f, x, u, w, k) for f in (explicit, subspace))
    for j in range(ref.shape[1]):
        assert scipy.stats.ks_2samp(ref[:, j].numpy(), got[:, j].numpy()).pvalue > 1e-4, j


def test_per_grad_subspace_shapes_dtypes_and_reductions():
    x = torch.randn(4, 300)       # N = 4 <= s / 4 = 4: the implicit route
    for dtype, grad_dtype in [(torch.float32, torch.float32), (torch.float64, torch.float64),
                              (torch.bfloat16, torch.bfloat16)]:
        grad, p = per.per_grad_subspace(x.to(dtype), 16)
        assert grad.shape == (4, 300) and grad.dtype == grad_dtype
        assert p.shape == (4, 16) and p.dtype == per.functional.compute_dtype(x.to(dtype))
    # The same random numbers for the same seed: "mean" is "sum" / N.
    total, p_sum = per.per_grad_subspace(x, 16, generator=torch.Generator().manual_seed(3))
    mean, p_mean = per.per_grad_subspace(x, 16, reduction="mean", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mean, total / 4)
    torch.testing.assert_close(p_mean, p_sum)
    # A point's projections are bounded by its norm (unit directions).
    assert bool((p.abs() <= x.norm(dim=1, keepdim=True) * (1 + 1e-5)).all())


@pytest.mark.parametrize("n, d, s", [(5, 300, 16),     # N > s / 4
                                     (4, 19, 16)])     # N + s > d
def test_per_grad_subspace_draws_explicit_directions_where_they_are_cheaper(n, d, s):
    x = torch.randn(n, d)
    grad, p = per.per_grad_subspace(x, s, generator=torch.Generator().manual_seed(1))
    theta = per.sample_directions(d, s, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grad, per.per_grad(x, theta))
    torch.testing.assert_close(p, per.functional.project(x, theta))


def test_per_grad_subspace_of_huge_finite_points_draws_explicitly():
    x = torch.full((4, 300), 3e36)       # finite, but its sum of squares overflows float32 (as its QR would)
    grad, p = per.per_grad_subspace(x, 16, generator=torch.Generator().manual_seed(2))
    theta = per.sample_directions(300, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(grad, per.per_grad(x, theta))
    assert bool(grad.isfinite().all())


def test_per_grad_subspace_gives_nan_rows_for_non_finite_points():
    x = torch.randn(4, 300)
    x[1, 7], x[3, 0] = float("nan"), float("inf")
    grad, _ = per.per_grad_subspace(x, 16)
    assert bool(grad[[1, 3]].isnan().all()) and bool(grad[[0, 2]].isfinite().all())


def test_per_grad_subspace_checks_its_arguments():
    with pytest.raises(ValueError, match="rank 2"):
        per.per_grad_subspace(torch.randn(2, 3, 4), 8)
    with pytest.raises(ValueError, match="valid: sum, mean"):
        per.per_grad_subspace(torch.randn(2, 30), 8, reduction="avg")
    with pytest.raises(ValueError, match="num_slices"):
        per.per_grad_subspace(torch.randn(2, 30), 0)


@pytest.mark.parametrize("reduction", per.REDUCTIONS)
def test_traced_cpu_paths_are_the_eager_ones(reduction):
    """Traced by torch.compile (one graph, no break), `per_grad` and `add_per_grad` call
    the eager CPU paths as the custom operators `per::per_grad_cpu` and
    `per::add_per_grad_cpu`: the same numbers, NaN rows and the redo included."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=gen)
    x[5, 2], x[7] = float("nan"), 0.0                # a NaN row; a dead point
    x[9] = 1e30                                       # overflowing projections: redone
    theta = per.sample_directions(16, 64, generator=gen)
    h = torch.randn(2, 16, 8, 8, generator=gen).clamp_min(0)
    g = torch.randn(2, 16, 8, 8, generator=gen)
    traced_grad = torch.compile(lambda x, t: per.per_grad(x, t, reduction=reduction),
                                fullgraph=True, backend="aot_eager")
    traced_add = torch.compile(lambda g, h, t: per.functional.add_per_grad(g, h, t, 0.5, reduction=reduction),
                               fullgraph=True, backend="aot_eager")
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(traced_grad(x, theta), per.per_grad(x, theta, reduction=reduction), **same)
    torch.testing.assert_close(traced_add(g, h, theta), per.functional.add_per_grad(g, h, theta, 0.5, reduction=reduction),
                               **same)
