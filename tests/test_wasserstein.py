"""Exact 1-D W1 and sliced W1 to the standard normal, against scipy/POT, and PER's bounds."""
from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch

import per


def _samples(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    return {
        "normal": lambda: rng.normal(0.3, 1.5, n),
        "uniform": lambda: rng.uniform(-1, 3, n),
        "exponential": lambda: rng.exponential(2.0, n),
        "bimodal": lambda: np.concatenate([rng.normal(-2, .3, n // 2),
                                           rng.normal(2, .3, n - n // 2)]),
        "two_atoms": lambda: np.repeat([-1.0, 0.5], [n // 3, n - n // 3]),
        "atom_at_zero": lambda: np.zeros(n),
        "atom_far": lambda: np.full(n, 4.0),
    }[name]()


DISTRIBUTIONS = ["normal", "uniform", "exponential", "bimodal", "two_atoms", "atom_at_zero",
                 "atom_far"]


def _quad_w1_normal(x: np.ndarray) -> float:
    """int_0^1 |F_emp^{-1}(u) - Phi^{-1}(u)| du by adaptive quadrature, split at the
    empirical quantile steps i/N and at the kinks Phi(x_(i))."""
    a = np.sort(x)
    n = len(a)
    total = 0.0
    for i in range(n):
        lo, hi = i / n, (i + 1) / n
        kink = scipy.special.ndtr(a[i])
        pts = [kink] if lo < kink < hi else None
        val, _ = scipy.integrate.quad(lambda u: abs(a[i] - scipy.special.ndtri(u)), lo, hi,
                                      points=pts, limit=200, epsabs=1e-13, epsrel=1e-12)
        total += val
    return total


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_w1_normal_1d_matches_quadrature(name):
    x = _samples(name, 25, np.random.default_rng(0))
    got = per.w1_normal_1d(torch.tensor(x)).item()
    assert got == pytest.approx(_quad_w1_normal(x), rel=1e-8, abs=1e-10)


def test_w1_of_point_mass_is_phi():
    # A point mass at c has a single coupling with N(0, 1): W1 = E|c - Z| = phi(c).
    for c in (-2.0, 0.0, 0.7):
        x = torch.full((10,), c, dtype=torch.float64)
        assert per.w1_normal_1d(x).item() == pytest.approx(
            per.phi(torch.tensor(c, dtype=torch.float64)).item(), rel=1e-12)


def test_float32_w1_is_as_accurate_as_its_input_at_large_n():
    # Each cell's terms are O(1) and their sum O(1/N): summed in float32 the estimate was off
    # by 5e-3 (relative) at N = 1e5 and 4e-2 at 1e6; the cells are now summed in float64.
    x = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = per.w1_normal_1d(x).item()
    assert per.w1_normal_1d(x.float()).item() == pytest.approx(ref, rel=1e-6)
    points = x.view(-1, 4)
    directions = per.sample_directions(4, 40, generator=torch.Generator().manual_seed(1),
                                       dtype=torch.float64)
    sliced = per.sliced_wasserstein_normal(points, directions=directions).item()
    sliced_f32 = per.sliced_wasserstein_normal(points.float(), directions=directions.float()).item()
    assert sliced_f32 == pytest.approx(sliced, rel=1e-5)


def test_w1_normal_1d_dtype_and_rank():
    assert per.w1_normal_1d(torch.randn(10)).dtype == torch.float32
    assert per.w1_normal_1d(torch.randn(10).bfloat16()).dtype == torch.float32
    assert per.w1_normal_1d(torch.randn(10, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(N,\)"):
        per.w1_normal_1d(torch.randn(10, 2))
    with pytest.raises(ValueError, match="at least one sample"):
        per.w1_normal_1d(torch.zeros(0))
    with pytest.raises(ValueError, match="at least one sample"):
        per.sliced_wasserstein_normal(torch.zeros(0, 3))


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_per_loss_bounds_w1_in_1d(name):
    # Lemma 1: L_per(nu) >= W1(nu, N(0,1)); in 1-D the directions are +-1 and phi is even.
    x = torch.tensor(_samples(name, 400, np.random.default_rng(1)))[:, None]
    loss = per.per_loss(x, num_slices=8, reduction="mean").item()
    w1 = per.w1_normal_1d(x[:, 0]).item()
    assert loss >= w1 - 1e-12
    if name.startswith("atom"):  # a point mass attains the bound
        assert loss == pytest.approx(w1, rel=1e-12)


def test_w1_normal_1d_agrees_with_scipy_on_a_large_normal_sample():
    # |W1(x, Y_M) - W1(x, N(0,1))| <= W1(Y_M, N(0,1)) ~ 0.9 / sqrt(M) ~ 1e-3 for M = 1e6;
    # the margin 5e-3 is five times that.
    rng = np.random.default_rng(2)
    y = rng.standard_normal(1_000_000)
    for name in ("uniform", "exponential", "two_atoms"):
        x = _samples(name, 300, rng)
        got = per.w1_normal_1d(torch.tensor(x)).item()
        assert abs(got - scipy.stats.wasserstein_distance(x, y)) < 5e-3


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_per_loss_bounds_sliced_w1(name):
    # Corollary 2, slice by slice: with the same directions, L_per (mean over points, as
    # SW1's empirical measure) >= SW1 exactly, with equality for a point mass: there both
    # are mean_k E|<x, theta_k> - Z|.
    rng = np.random.default_rng(3)
    x = torch.tensor(np.stack([_samples(name, 200, rng) for _ in range(4)], axis=1))
    x = x @ torch.tensor(rng.normal(size=(4, 4)))  # correlate the coordinates
    directions = per.sample_directions(4, 512, generator=torch.Generator().manual_seed(4),
                                       dtype=torch.float64)
    bound = per.per_loss(x, directions, reduction="mean").item()
    sw1 = per.sliced_wasserstein_normal(x, directions=directions).item()
    if name.startswith("atom"):
        assert bound == pytest.approx(sw1, rel=1e-12)
    else:
        assert bound >= sw1 - 1e-12


def test_sliced_w1_agrees_with_pot():
    # POT's p=1 result is the mean over projections of the per-slice W1 (checked in
    # ot 0.9.7: (sum projected_emd / n_projections) ** (1/p)). Against a sample Y of
    # M = 5e4 points of N(0, I), each slice differs by at most W1(<Y, theta>, N(0,1))
    # ~ 0.9 / sqrt(M) = 4e-3; margin 1.5e-2.
    rng = np.random.default_rng(5)
    x = rng.exponential(1.0, size=(500, 3)) - 0.5
    y = rng.standard_normal((50_000, 3))
    directions = per.sample_directions(3, 64, generator=torch.Generator().manual_seed(6),
                                       dtype=torch.float64)
    ours = per.sliced_wasserstein_normal(torch.tensor(x), directions=directions).item()
    same_dirs = ot.sliced_wasserstein_distance(x, y, projections=directions.numpy(), p=1)
    assert abs(ours - same_dirs) < 1.5e-2
    # Independent directions: add 5 standard errors of the mean over 64 random slices.
    pot, log = ot.sliced_wasserstein_distance(x, y, n_projections=64, p=1, seed=0, log=True)
    slice_sd = np.std(log["projected_emds"])
    assert abs(ours - pot) < 1.5e-2 + 5 * math.sqrt(2) * slice_sd / math.sqrt(64)


def test_sliced_w1_generator_and_dtypes():
    x = torch.randn(50, 3)
    a = per.sliced_wasserstein_normal(x, num_slices=16, generator=torch.Generator().manual_seed(7))
    b = per.sliced_wasserstein_normal(x, num_slices=16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert per.sliced_wasserstein_normal(x.double(), num_slices=4).dtype == torch.float64
    # N(0, I) samples are close to N(0, I): W1 of 20k samples is O(1/sqrt(N)) ~ 0.01, and
    # the mean over slices is the mean of each slice's exact 1-D W1.
    big = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(8))
    directions = per.sample_directions(3, 32, generator=torch.Generator().manual_seed(9))
    sw1 = per.sliced_wasserstein_normal(big, directions=directions).item()
    assert 0 < sw1 < 0.03
    slices = [per.w1_normal_1d(big @ directions[:, k]).item() for k in range(32)]
    assert sw1 == pytest.approx(sum(slices) / 32, rel=1e-5)
    with pytest.raises(ValueError, match="num_slices"):
        per.sliced_wasserstein_normal(x, num_slices=0)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        per.sliced_wasserstein_normal(x[0])
