"""Regularizer: backward path == autograd path == closed forms; modes, stats, VCL, bad input."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import per
from per.functional import from_points

SLICES = 16


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), per.Site(), nn.Linear(5, 5), nn.Tanh(),
                         per.Site(), nn.Linear(5, 2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), per.Site(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), per.Site(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


def _seq() -> nn.Module:  # acts on (T, B, d): Linear maps the last dimension
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), per.Site(), nn.Linear(5, 5), nn.Tanh(),
                         per.Site(), nn.Linear(5, 2))


def _vcl_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), per.Site("pre"), nn.ELU(),
                         nn.Conv2d(4, 4, 3, padding=1), per.Site("pre"), nn.ELU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


CASES = {  # name -> (model factory, input shape, layout)
    "mlp": (_mlp, (8, 6), "channels"),
    "cnn_channels": (_cnn, (3, 3, 5, 5), "channels"),
    "cnn_flatten": (_cnn, (3, 3, 5, 5), "flatten"),
    "seq": (_seq, (4, 3, 4), "channels"),
}


def _input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _grads(model: nn.Module, x: torch.Tensor, reg: per.Regularizer | None, seed: int = 2,
           track: bool = False) -> list[torch.Tensor]:
    """Parameter gradients of `mean(out^2) + penalty` after one seeded step."""
    model.zero_grad()
    torch.manual_seed(seed)
    if reg is not None:
        reg.begin_step(track=track)
    loss = model(x).square().mean()
    if reg is not None:
        loss = loss + reg.penalty()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _reference_grads(model: nn.Module, x: torch.Tensor, kind: str, lam: float, layout: str,
                     seed: int = 2, reduction: str = "sum") -> list[torch.Tensor]:
    """The objective written out with the functional API, no Regularizer involved."""
    sites = per.list_sites(model, "post")
    terms = []

    def penalize(name: str, h: torch.Tensor) -> torch.Tensor:
        pts = per.to_points(h, layout)
        if kind == "per":
            terms.append(per.per_loss(pts, per.sample_directions(pts.shape[1], SLICES),
                                      reduction=reduction))
        else:
            fn = per.l1_penalty if kind == "l1" else per.l2_penalty
            terms.append(fn(pts, reduction=reduction))
        return h

    for site in sites.values():
        site.penalty_fn = penalize
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x)
    (out.square().mean() + lam * torch.stack(terms).sum()).backward()
    for site in sites.values():
        site.penalty_fn = None
    return [p.grad.clone() for p in model.parameters()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-5,
           atol: float = 1e-7) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", per.REDUCTIONS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["per", "l1", "l2"])
def test_backward_and_autograd_paths_match_reference(kind, case, reduction):
    factory, shape, layout = CASES[case]
    model, x, lam = factory(), _input(shape), 0.3
    want = _reference_grads(model, x, kind, lam, layout, reduction=reduction)
    assert not torch.allclose(want[0], _grads(model, x, None)[0])  # the penalty matters
    for path in per.regularizers.PATHS:
        reg = per.Regularizer(model, kind, lam, layout=layout, num_slices=SLICES, path=path,
                              reduction=reduction)
        _close(_grads(model, x, reg), want)
        reg.remove()


class _TwiceSite(nn.Module):
    """One site called on two tensors per forward (a shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.site = per.Site()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.site(a) * 2 + self.site(b)


@pytest.mark.parametrize("kind", ["per", "l2"])
def test_site_stats_are_the_mean_over_a_sites_calls_on_both_paths(kind):
    """A site called twice per forward, or over two micro-batches, reports the mean of its
    calls' statistics, on both paths alike."""
    a, b = _input((6, 4)), _input((6, 4)) * 3
    stats = {}
    for path in per.regularizers.PATHS:
        model = _TwiceSite()
        reg = per.Regularizer(model, kind, 0.3, num_slices=SLICES, path=path)
        torch.manual_seed(4)
        reg.begin_step(track=True)
        (model(a.clone().requires_grad_(), b.clone().requires_grad_()).square().sum() + reg.penalty()).backward()
        stats[path] = reg.site_stats()
        # Two micro-batches of one call each give the mean of the two penalties too.
        torch.manual_seed(4)
        reg.begin_step(track=True)
        for x in (a, b):
            (model.site(x.clone().requires_grad_()).square().sum() + reg.penalty()).backward()
        torch.testing.assert_close(reg.site_stats()["penalty/site"], stats[path]["penalty/site"])
    torch.testing.assert_close(stats["backward"], stats["autograd"])
    torch.manual_seed(4)
    first = per.sample_directions(4, SLICES)
    second = per.sample_directions(4, SLICES)
    if kind == "per":
        want = (per.per_loss(a, first, reduction="mean") + per.per_loss(b, second, reduction="mean")) / 2
    else:
        want = (per.l2_penalty(a, reduction="mean") + per.l2_penalty(b, reduction="mean")) / 2
    torch.testing.assert_close(stats["backward"]["penalty/site"], want)
    if kind == "l2":   # lam ||2h|| / ||dL/dh|| per call, dL/dh = 4 out and 2 out
        out = 2 * a + b
        want = (0.3 * (2 * a).norm() / (4 * out).norm() + 0.3 * (2 * b).norm() / (2 * out).norm()) / 2
        torch.testing.assert_close(stats["backward"]["grad_ratio/site"], want)


@pytest.mark.parametrize("kind", ["l2", "vcl"])
def test_site_stats_count_only_calls_whose_backward_ran(kind):
    """A call on an input without gradient, or whose output never reaches the loss, adds no
    statistics and no count, on both paths alike (VCL: its own path)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    a, frozen = _input((10, 4)), _input((10, 4)).relu()
    stats = {}
    for path in per.regularizers.PATHS:
        site = nn.Sequential(per.Site("pre" if kind == "vcl" else "post"))
        reg = per.Regularizer(site, kind, 0.3, path=path, vcl_chunk=5)
        if kind == "vcl":
            reg.materialize(lambda: site(a))
        reg.begin_step(track=True)
        used = site(lin(a).relu())
        site(frozen)                                 # input without gradient
        site(lin(a).tanh())                          # output never used
        (used.square().sum() + reg.penalty()).backward()
        stats[path] = reg.site_stats()
        reg.begin_step(track=True)
        (site(lin(a).relu()).square().sum() + reg.penalty()).backward()
        torch.testing.assert_close(stats[path], reg.site_stats())   # the used call alone
    torch.testing.assert_close(stats["backward"], stats["autograd"])


def test_tracked_micro_batches_compile_once():
    """Tracked steps leave no Python state to the traced forward: with three micro-batches per
    step, a compiled model compiles two graphs (tracked, untracked), with eager's statistics."""
    import torch._dynamo
    model = _cnn()
    stats = []
    for compiled in (False, True):
        reg = per.Regularizer(model, "l2", 0.3)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for step in range(4):
            reg.begin_step(track=step % 2 == 0)
            for k in range(3):
                run(_input((2, 3, 5, 5)) * (k + 1)).square().mean().backward()
            if step == 2:
                stats.append(reg.site_stats())
        reg.remove()
    assert torch._dynamo.utils.counters["frames"]["total"] == 2
    torch.testing.assert_close(stats[1], stats[0])


def test_tracked_stats_keep_float64_and_skip_sites_without_gradient():
    model = nn.Sequential(per.Site()).double()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    reg.begin_step(track=True)
    out = model(_input((6, 4)).double())              # no gradient reaches the site
    assert not out.requires_grad and reg.site_stats() == {}
    model = nn.Sequential(nn.Linear(4, 4), per.Site()).double()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    reg.begin_step(track=True)
    model(_input((6, 4)).double()).sum().backward()
    assert {v.dtype for v in reg.site_stats().values()} == {torch.float64}


@pytest.mark.parametrize("shape, layout", [((7, 3), "channels"), ((2, 3, 4, 5), "channels"),
                                           ((2, 3, 4, 5), "flatten"), ((5, 2, 3), "channels")])
@pytest.mark.parametrize("kind", ["per", "l1", "l2"])
@pytest.mark.parametrize("path", ["backward", "autograd"])
@pytest.mark.parametrize("reduction", per.REDUCTIONS)
@pytest.mark.parametrize("track", [False, True])   # tracked steps also compute the site's stats
def test_site_gradient_is_closed_form(track, reduction, path, kind, shape, layout):
    # d(task)/dh = w, so h.grad = w + lam * g with Algorithm 1's per-point g_i
    # ((1/s) sum_k erf(p_ik/sqrt2) theta_k, sign(h), 2h) and, for "mean", g / N.
    model, lam = nn.Sequential(per.Site()), 0.7
    h = _input(shape).requires_grad_()
    w = torch.randn(shape)
    reg = per.Regularizer(model, kind, lam, layout=layout, num_slices=SLICES, path=path,
                          reduction=reduction)
    torch.manual_seed(3)
    reg.begin_step(track=track)
    ((model(h) * w).sum() + reg.penalty()).backward()
    pts = per.to_points(h.detach(), layout)
    torch.manual_seed(3)
    theta = per.sample_directions(pts.shape[1], SLICES)
    grad = {"per": lambda: torch.erf(pts @ theta / 2 ** 0.5) @ theta.T / SLICES,
            "l1": lambda: pts.sign(),
            "l2": lambda: 2 * pts}[kind]()
    if reduction == "mean":
        grad = grad / pts.shape[0]
    torch.testing.assert_close(h.grad, w + lam * from_points(grad, h.shape, layout),
                               rtol=1e-5, atol=1e-6)


def test_seeded_runs_are_reproducible_and_paths_consume_the_same_rng():
    model, x = _cnn(), _input((3, 3, 5, 5))
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    a, state_a = _grads(model, x, reg, seed=5), torch.get_rng_state()
    b = _grads(model, x, reg, seed=5)
    c = _grads(model, x, reg, seed=6)
    _close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], c[0])
    reg.remove()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES, path="autograd")
    _grads(model, x, reg, seed=5)
    assert torch.equal(torch.get_rng_state(), state_a)


@pytest.mark.parametrize("kind", ["per", "l2"])
def test_bf16_autocast_both_paths(kind):
    model, x = _cnn(), _input((3, 3, 5, 5))
    want = _reference_grads(model, x, kind, 0.3, "channels")
    # Tracked steps (the site's gradient through `per_grad`) and untracked ones (the training
    # loop's 49 of 50: `add_per_grad` into the incoming gradient).
    for path, track in itertools.product(per.regularizers.PATHS, (True, False)):
        reg = per.Regularizer(model, kind, 0.3, num_slices=SLICES, path=path)
        with per.capture_sites(model, reg.site_names) as seen, \
                torch.autocast("cpu", dtype=torch.bfloat16):
            got = _grads(model, x, reg, track=track)
        assert all(v[0].dtype == torch.bfloat16 for v in seen.values())
        stats = reg.site_stats()
        assert not track or all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())
        for g, r in zip(got, want, strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, r, rtol=0.05, atol=0.03 * r.abs().max().item())
        reg.remove()


@pytest.mark.parametrize("path", ["backward", "autograd"])
def test_inactive_in_eval_mode_and_under_no_grad(path):
    model, x = _mlp(), _input((8, 6))
    plain = _grads(model, x, None)
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES, path=path)
    model.eval()
    got, after = _grads(model, x, reg, seed=2, track=True), torch.get_rng_state()
    torch.manual_seed(2)
    assert torch.equal(after, torch.get_rng_state())  # no directions drawn
    _close(got, plain, rtol=0, atol=0)
    assert reg.penalty().item() == 0 and reg.site_stats() == {}
    model.train()
    for no_grad_mode in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(2)
        state = torch.get_rng_state()
        with no_grad_mode():
            reg.begin_step(track=True)
            model(x)
        assert torch.equal(torch.get_rng_state(), state)  # no directions drawn
        assert reg.penalty().item() == 0 and reg.site_stats() == {}


@pytest.mark.parametrize("path", ["backward", "autograd"])
def test_lam_scales_the_penalty_gradient(path):
    model, x = _mlp(), _input((8, 6))
    plain = _grads(model, x, None)
    deltas = []
    for lam in (0.1, 0.2):
        reg = per.Regularizer(model, "per", lam, num_slices=SLICES, path=path)
        deltas.append([g - p for g, p in zip(_grads(model, x, reg), plain)])
        reg.remove()
    _close([2 * d for d in deltas[0]], deltas[1], rtol=1e-4, atol=1e-7)


def test_site_stats_match_between_paths_and_closed_form():
    model, x = _cnn(), _input((3, 3, 5, 5))
    stats = {}
    for path in per.regularizers.PATHS:
        reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES, path=path)
        _grads(model, x, reg)
        assert reg.site_stats() == {}
        _grads(model, x, reg, track=True)
        stats[path] = reg.site_stats()
        reg.remove()
    names = per.list_sites(model)
    assert set(stats["backward"]) == {f"{k}/{n}" for k in ("penalty", "grad_ratio") for n in names}
    for key, value in stats["backward"].items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0
        torch.testing.assert_close(value, stats["autograd"][key])
    # Single site: d(task)/dh = w, so grad_ratio = lam ||dL/dh|| / ||w||, penalty = per_loss.
    site_model, h, w = nn.Sequential(per.Site()), torch.randn(6, 4), torch.randn(6, 4)
    reg = per.Regularizer(site_model, "per", 0.3, num_slices=SLICES)
    torch.manual_seed(4)
    reg.begin_step(track=True)
    (site_model(h.requires_grad_()) * w).sum().backward()
    torch.manual_seed(4)
    directions = per.sample_directions(4, SLICES)
    # penalty/<site> is the per-point mean whatever the reduction; the gradient is the sum's.
    torch.testing.assert_close(reg.site_stats()["penalty/0"],
                               per.per_loss(h.detach(), directions, reduction="mean"))
    torch.testing.assert_close(reg.site_stats()["grad_ratio/0"],
                               0.3 * per.per_grad(h.detach(), directions).norm() / w.norm())


@pytest.mark.parametrize("path", ["backward", "autograd"])
def test_share_directions_switch(path):
    model, h = nn.Sequential(per.Site(), per.Site()), torch.randn(6, 4, requires_grad=True)
    for share in (False, True):
        reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES, path=path,
                              share_directions=share)
        torch.manual_seed(7)
        reg.begin_step(track=True)
        (model(h).sum() + reg.penalty()).backward()
        stats = reg.site_stats()
        assert torch.equal(stats["penalty/0"], stats["penalty/1"]) == share
        torch.manual_seed(7)
        per.sample_directions(4, SLICES)  # one draw per step when shared, two otherwise
        one_draw = torch.get_rng_state()
        assert torch.equal(_rng_after_step(model, h, reg), one_draw) == share
        reg.remove()


def _rng_after_step(model: nn.Module, h: torch.Tensor, reg: per.Regularizer) -> torch.Tensor:
    torch.manual_seed(7)
    reg.begin_step()
    model(h)
    return torch.get_rng_state()


def test_regularizer_holds_no_model_parameters_and_remove_detaches():
    model = _mlp()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    assert list(reg.parameters()) == [] and reg.site_names == ["2", "5"]
    with pytest.raises(ValueError, match="already"):
        per.Regularizer(model, "l2", 0.3)
    reg.remove()
    assert all(s.penalty_fn is None for s in per.list_sites(model).values())
    per.Regularizer(model, "l2", 0.3).remove()


def _np_vcl(h: np.ndarray, beta: np.ndarray, c: int = 5) -> float:
    v1, v2 = h[:c].var(axis=0, ddof=1), h[c:2 * c].var(axis=0, ddof=1)
    return float(((1 - v1 / (v2 + beta)) ** 2).mean())


def test_vcl_value_betas_and_gradients():
    model = nn.ModuleDict({"body": _vcl_cnn()})
    x = _input((12, 3, 5, 5))
    reg = per.Regularizer(model, "vcl", 0.5, path="backward")  # VCL always uses autograd
    assert reg.site_names == ["body.1", "body.4"]
    reg.begin_step()
    with pytest.raises(RuntimeError, match="materialize"):
        model.body(x)
    reg.materialize(lambda: model.body(x))
    assert set(reg.betas) == {"body__1", "body__4"}
    assert all(torch.equal(b, torch.ones(4, 5, 5)) for b in reg.betas.values())
    with torch.no_grad():
        for b in reg.betas.values():
            b.uniform_(0.5, 2.0)
    reg.begin_step(track=True)
    with per.capture_sites(model, reg.site_names) as seen:
        out = model.body(x)
    betas = {n: reg.betas[n.replace(".", "__")].detach().double().numpy() for n in reg.site_names}
    want = sum(_np_vcl(seen[n][0].double().numpy(), betas[n]) for n in reg.site_names)
    penalty = reg.penalty()
    assert penalty.item() == pytest.approx(0.5 * want, rel=1e-5)
    (out.square().mean() + penalty).backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in reg.betas.values())
    stats = reg.site_stats()
    assert set(stats) == {f"{k}/body.{i}" for k in ("penalty", "grad_ratio") for i in (1, 4)}
    assert all(torch.isfinite(v) and v > 0 for v in stats.values())
    reg.begin_step()
    with pytest.raises(ValueError, match="at least 2 \\* vcl_chunk = 10"):
        model.body(x[:9])


def test_vcl_rejects_sequences():
    model = nn.Sequential(nn.Linear(4, 5), per.Site("pre"), nn.Tanh())
    reg = per.Regularizer(model, "vcl", 0.5)
    with pytest.raises(ValueError, match="rank 2"):
        reg.materialize(lambda: model(torch.randn(3, 12, 4)))


def test_regularizer_rejects_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="valid: l1, l2, per, vcl"):
        per.Regularizer(model, "l3", 0.1)
    with pytest.raises(ValueError, match="channels, flatten"):
        per.Regularizer(model, "per", 0.1, layout="pixels")
    with pytest.raises(ValueError, match="num_slices"):
        per.Regularizer(model, "per", 0.1, num_slices=0)
    with pytest.raises(ValueError, match="backward, autograd"):
        per.Regularizer(model, "per", 0.1, path="forward")
    with pytest.raises(ValueError, match="reduction 'avg'; valid: sum, mean"):
        per.Regularizer(model, "per", 0.1, reduction="avg")
    with pytest.raises(ValueError, match="lam"):
        per.Regularizer(model, "per", -0.1)
    with pytest.raises(ValueError, match="no Site\\(role='pre'\\)"):
        per.Regularizer(model, "vcl", 0.1)
    with pytest.raises(ValueError, match="no Site\\(role='post'\\)"):
        per.Regularizer(nn.Linear(2, 2), "per", 0.1)
    site_model = nn.Sequential(per.Site())
    reg = per.Regularizer(site_model, "per", 0.1)
    reg.begin_step()
    with pytest.raises(ValueError, match="rank 2 .* 3 .* 4"):
        site_model(torch.randn(2, 3, 4, 5, 6))


def test_regularizer_rejects_non_numbers():
    for lam in (float("nan"), float("inf"), "1e-4", True):
        with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
            per.Regularizer(_mlp(), "per", lam)
    for slices in (2.5, "256", True):
        with pytest.raises(ValueError, match="num_slices must be an integer >= 1"):
            per.Regularizer(_mlp(), "per", 0.1, num_slices=slices)
    reg = per.Regularizer(_mlp(), "per", np.float32(0.5), num_slices=np.int64(8))
    assert reg.lam == 0.5 and reg.num_slices == 8 and type(reg.num_slices) is int
    with pytest.raises(ValueError, match="floating-point points"):
        per.per_loss(torch.ones(4, 3, dtype=torch.int64))


def test_site_names_a_tuple_input():
    model = nn.Sequential(nn.LSTM(4, 8), per.Site())
    reg = per.Regularizer(model, "per", 1e-3)
    reg.begin_step()
    with pytest.raises(TypeError, match=r"Site 1 takes a tensor, got tuple.*out, _ = lstm\(x\)"):
        model(torch.randn(5, 3, 4))
    with torch.no_grad(), pytest.raises(TypeError, match="takes a tensor"):
        model(torch.randn(5, 3, 4))


@pytest.mark.parametrize("track", [False, True])
def test_in_place_op_after_a_site_on_the_autograd_path(track):
    """The autograd path saves no activation: an in-place ReLU after a site is legal on
    tracked steps as on untracked ones (the grad-norm probe returned a view)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), per.Site(), nn.ReLU(inplace=True), nn.Linear(4, 2))
    reg = per.Regularizer(model, "per", 1.0, path="autograd", num_slices=SLICES)
    reg.begin_step(track=track)
    (model(torch.randn(6, 4)).sum() + reg.penalty()).backward()
    assert bool(reg.site_stats()) == track


def test_gradient_accumulation_over_micro_batches():
    """One penalty() per micro-batch loss: each term is handed out once, and both paths
    give the gradients of the whole batch in two halves."""
    x = _input((8, 6))
    grads = {}
    for p in per.regularizers.PATHS:
        model = _mlp()
        reg = per.Regularizer(model, "per", 0.3, path=p, num_slices=SLICES)
        torch.manual_seed(5)
        reg.begin_step()
        for xb in x.chunk(2):
            (model(xb).square().mean() + reg.penalty()).backward()
        grads[p] = [q.grad.clone() for q in model.parameters()]
    for a, b in zip(grads["backward"], grads["autograd"]):
        torch.testing.assert_close(a, b)


def test_create_graph_on_the_backward_path_is_refused_clearly():
    model = _mlp()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    reg.begin_step()
    loss = model(_input((8, 6))).square().mean()
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        (g,) = torch.autograd.grad(loss, model[0].weight, create_graph=True)
        g.sum().backward()


def test_a_copied_model_leaves_its_regularizer_behind():
    import copy
    model = _mlp()
    reg = per.Regularizer(model, "per", 0.3, num_slices=SLICES)
    twin = copy.deepcopy(model)
    assert all(s.penalty_fn is None for s in per.list_sites(twin).values())
    assert all(s.penalty_fn is not None for s in per.list_sites(model).values())
    per.Regularizer(twin, "l2", 0.1)           # a new one attaches to the copy
    reg.remove()
    assert all(s.penalty_fn is not None for s in per.list_sites(twin).values())


@pytest.mark.parametrize("path", ["backward", "autograd"])
def test_a_regularizer_on_some_sites_leaves_the_others_alone(path):
    """`sites=`: PER on the second site only; the first site's gradient is the task's.
    A second regularizer (L2) can take the first site; each logs its own sites."""
    model = nn.Sequential(per.Site(), nn.Identity(), per.Site())
    h, w = _input((6, 4)).requires_grad_(), torch.randn(6, 4)
    reg = per.Regularizer(model, "per", 0.5, num_slices=SLICES, path=path, sites=["2"])
    assert reg.site_names == ["2"]
    l2 = per.Regularizer(model, "l2", 0.25, path=path, sites=["0"])
    torch.manual_seed(4)
    for r in (reg, l2):
        r.begin_step(track=True)
    ((model(h) * w).sum() + reg.penalty() + l2.penalty()).backward()
    torch.manual_seed(4)
    theta = per.sample_directions(4, SLICES)
    per_g = torch.erf(h.detach() @ theta / 2 ** 0.5) @ theta.T / SLICES
    torch.testing.assert_close(h.grad, w + 0.5 * per_g + 0.25 * 2 * h.detach(), rtol=1e-5, atol=1e-6)
    assert {k.split("/")[-1] for k in reg.site_stats()} == {"2"}
    assert {k.split("/")[-1] for k in l2.site_stats()} == {"0"}


def test_sites_must_name_sites_of_the_kinds_role():
    model = _vcl_cnn()
    with pytest.raises(ValueError, match=r"sites \['1'\] are not Site\(role='post'\).*valid: "):
        per.Regularizer(_mlp(), "per", 0.1, sites=["1"])       # a Tanh, not a site
    with pytest.raises(ValueError, match=r"not Site\(role='pre'\) sites.*valid: 1, 4"):
        per.Regularizer(model, "vcl", 0.1, sites=["1", "nope"])
    for bad in ([], "1"):
        with pytest.raises(ValueError, match="non-empty list of site names"):
            per.Regularizer(model, "vcl", 0.1, sites=bad)
    reg = per.Regularizer(_mlp(), "per", 0.1, sites=["2"])
    with pytest.raises(ValueError, match="already"):
        per.Regularizer(reg.model, "l1", 0.1, sites=["2", "5"])


@pytest.mark.parametrize("track", [False, True])
def test_subspace_sampling_adds_per_grad_subspace_drawn_in_the_backward(track):
    model = nn.Sequential(per.Site())
    h = torch.randn(4, 2, 6, 6, requires_grad=True)     # flatten: 4 points in R^72
    w = torch.randn(4, 2, 6, 6)
    reg = per.Regularizer(model, "per", 0.3, layout="flatten", num_slices=SLICES, sampling="subspace")
    torch.manual_seed(4)
    reg.begin_step(track=track)
    out = model(h)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(4).get_state())  # nothing drawn yet
    (out * w).sum().backward()
    torch.manual_seed(4)
    grad, p = per.per_grad_subspace(per.to_points(h.detach(), "flatten"), SLICES)
    torch.testing.assert_close(h.grad, w + 0.3 * grad.reshape(h.shape))
    stats = reg.site_stats()
    if track:
        torch.testing.assert_close(stats["penalty/0"], per.phi(p).mean())
        torch.testing.assert_close(stats["grad_ratio/0"], 0.3 * grad.norm() / w.norm())
    else:
        assert stats == {}


@pytest.mark.parametrize("shape, layout", [((4, 2, 6, 6), "channels"),   # 144 points in R^2
                                           ((8, 2, 6, 6), "flatten")])   # N = 8 > s / 4
def test_subspace_sampling_draws_a_matrix_in_the_backward_where_it_would_be_slower(shape, layout):
    model = nn.Sequential(per.Site())
    h, w = torch.randn(shape, requires_grad=True), torch.randn(shape)
    per.Regularizer(model, "per", 0.3, layout=layout, num_slices=SLICES, sampling="subspace")
    torch.manual_seed(4)
    (model(h) * w).sum().backward()
    torch.manual_seed(4)
    x = per.to_points(h.detach(), layout)
    theta = per.sample_directions(x.shape[1], SLICES)
    torch.testing.assert_close(h.grad, w + 0.3 * from_points(per.per_grad(x, theta), shape, layout))


def test_subspace_sampling_of_an_empty_point_dimension_raises_the_usual_error():
    model = nn.Sequential(per.Site())
    per.Regularizer(model, "per", 0.3, layout="flatten", num_slices=SLICES, sampling="subspace")
    h = torch.randn(4, 0, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="dimension d must be >= 1"):
        model(h).sum().backward()


@pytest.mark.parametrize("kwargs, match", [
    ({"sampling": "implicit"}, "valid: explicit, subspace"),
    ({"sampling": "subspace", "path": "autograd"}, "path='autograd'"),
    ({"sampling": "subspace", "share_directions": True}, "share_directions=True"),
])
def test_subspace_sampling_rejects_what_it_cannot_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        per.Regularizer(_cnn(), "per", 0.3, **kwargs)
    with pytest.raises(ValueError, match="kind='l2'"):
        per.Regularizer(_cnn(), "l2", 0.3, sampling="subspace")


@pytest.mark.parametrize("path", ["backward", "autograd"])
@pytest.mark.parametrize("kind", ["per", "l2"])
def test_a_scaled_loss_gives_the_gradient_of_the_unscaled_one_times_the_scale(kind, path):
    """GradScaler (scale 2^16) and a loss scale of 1/4: with `begin_step(loss_scale=)`, the
    backward path's penalty is scaled with the task's gradient, as autograd scales the
    autograd path's term; the logged grad ratio is the unscaled one."""
    model, x = _mlp(), _input((8, 6))
    reg = per.Regularizer(model, kind, lam=0.05, num_slices=SLICES, path=path)
    plain = _grads(model, x, reg, track=True)
    ratios = {k: v for k, v in reg.site_stats().items() if k.startswith("grad_ratio")}
    for scale in (2.0 ** 16, 0.25):
        model.zero_grad()
        torch.manual_seed(2)
        reg.begin_step(track=True, loss_scale=scale)
        (scale * (model(x).square().mean() + reg.penalty())).backward()
        for p, g in zip(model.parameters(), plain):
            torch.testing.assert_close(p.grad / scale, g, rtol=1e-5, atol=1e-7)
        for k, v in ratios.items():
            torch.testing.assert_close(reg.site_stats()[k], v, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["per", "l1", "l2"])
def test_an_fp16_site_under_gradscalers_scale_gets_a_finite_gradient_on_both_paths(kind):
    """fp16 activations, GradScaler's initial 2^16: lam * scale * g is small enough for fp16,
    but scale * g alone is not (L1's g is 1). Both paths give the unscaled gradient times the
    scale, finite; the backward path's ratio is the unscaled one."""
    class SiteOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.site = per.Site()

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.site(h)

    h0 = (torch.randn(16, 4) * 3).half()
    scale, lam = 2.0 ** 16, 1e-4
    for path in ("backward", "autograd"):
        reg = per.Regularizer(SiteOnly(), kind, lam=lam, num_slices=SLICES, path=path)
        grads, ratios = [], []
        for loss_scale in (1.0, scale):
            h = h0.clone().requires_grad_()
            torch.manual_seed(3)
            reg.begin_step(track=True, loss_scale=loss_scale)
            out = reg.model(h)
            (loss_scale * (1e-3 * out.float().sum() + reg.penalty())).backward()
            grads.append(h.grad.float())
            ratios.append(reg.site_stats()["grad_ratio/site"])
        assert torch.isfinite(grads[1]).all(), (path, grads[1])
        torch.testing.assert_close(grads[1] / scale, grads[0], rtol=2e-3, atol=1e-6)   # fp16 subnormals
        torch.testing.assert_close(ratios[1], ratios[0], rtol=2e-3, atol=0)


@pytest.mark.parametrize("path", ["backward", "autograd"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulated_micro_batches_give_the_whole_batch_by_the_documented_recipe(reduction, path):
    """k micro-batches as one batch of their union (the README's recipe): the mean task
    loss is divided by k; under `sum` the penalty sums over points, so it is added whole
    (`loss_scale=1`); under `mean` it is divided by k as well (`loss_scale=1/k`). L2:
    no random directions, so the gradients must be equal."""
    x, k = _input((8, 6)), 4
    model = _mlp()
    reg = per.Regularizer(model, "l2", lam=0.05, reduction=reduction, path=path)
    whole = _grads(model, x, reg)
    model.zero_grad()
    scale = 1.0 if reduction == "sum" else 1.0 / k
    reg.begin_step(loss_scale=scale)
    for xb in x.chunk(k):
        (model(xb).square().mean() / k + scale * reg.penalty()).backward()
    for p, g in zip(model.parameters(), whole):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_loss_scale_must_be_a_positive_number():
    reg = per.Regularizer(_mlp(), "per", lam=0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
            reg.begin_step(loss_scale=bad)


def test_a_stale_remove_leaves_the_sites_new_regularizer_attached():
    model = _mlp()
    first = per.Regularizer(model, "per", lam=0.1)
    first.remove()
    second = per.Regularizer(model, "l2", lam=1.0)
    first.remove()
    assert all(s.penalty_fn == second._apply for s in per.list_sites(model).values())


def test_autograd_path_under_activation_checkpointing_equals_the_plain_model():
    """A non-reentrant checkpoint recomputes the sites inside backward: the recompute
    makes no second term (nothing is left over for the next penalty())."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
    model, x = _mlp(), _input((8, 6))
    reg = per.Regularizer(model, "per", lam=0.05, num_slices=SLICES, path="autograd")
    plain = _grads(model, x, reg)
    model.zero_grad()
    torch.manual_seed(2)
    reg.begin_step()
    with set_checkpoint_early_stop(False):
        out = checkpoint(model, x, use_reentrant=False)
        (out.square().mean() + reg.penalty()).backward()
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g)
    assert reg._terms == []


def test_terms_never_handed_out_warn_at_the_next_step():
    model, x = _mlp(), _input((8, 6))
    reg = per.Regularizer(model, "per", lam=0.05, num_slices=SLICES, path="autograd")
    reg.begin_step()
    (reg.penalty() + model(x).square().mean()).backward()      # penalty() before the forward
    with pytest.warns(UserWarning, match="never added to a loss"):
        reg.begin_step()


def test_vcl_chunk_must_be_an_integer():
    for bad in (2.5, "5", True):
        with pytest.raises(ValueError, match="vcl_chunk must be an integer >= 2"):
            per.Regularizer(_vcl_cnn(), "vcl", lam=0.1, vcl_chunk=bad)


def test_vcl_grad_ratio_under_a_scaled_loss_is_the_unscaled_one():
    model, x = _vcl_cnn(), _input((12, 3, 5, 5))
    reg = per.Regularizer(model, "vcl", 0.5)
    reg.materialize(lambda: model(x))
    ratios = []
    for scale in (1.0, 2.0 ** 10):
        model.zero_grad()
        reg.begin_step(track=True, loss_scale=scale)
        (scale * (model(x).square().mean() + reg.penalty())).backward()
        ratios.append({k: v for k, v in reg.site_stats().items() if k.startswith("grad_ratio")})
    assert ratios[0].keys() == ratios[1].keys() and len(ratios[0]) == 2
    for k, v in ratios[0].items():
        torch.testing.assert_close(ratios[1][k], v, rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["backward", "autograd"])
def test_a_compiled_step_takes_each_new_loss_scale_as_data(path):
    """A GradScaler changes its scale now and then: a compiled step must neither fail nor
    recompile for each value (a float argument would), and give the unscaled gradient."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, x = _mlp(), _input((8, 6))
    reg = per.Regularizer(model, "per", lam=0.05, num_slices=SLICES, path=path)
    step = torch.compile(lambda inp: model(inp).square().mean() + reg.penalty(), backend="aot_eager")
    grads, ratios, frames = [], [], []
    for scale in (1.0, 2.0, 4.0, 2.0 ** 16, 0.25):
        model.zero_grad()
        torch.manual_seed(0)                 # the same directions (compiled RNG) each time
        reg.begin_step(track=True, loss_scale=scale)
        (scale * step(x)).backward()
        grads.append([p.grad / scale for p in model.parameters()])
        ratios.append(reg.site_stats())
        frames.append(torch._dynamo.utils.counters["frames"]["total"])
    for g, r in zip(grads[1:], ratios[1:]):
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r, ratios[0], rtol=1e-5, atol=0)
    assert frames[1] == frames[-1]          # compiled for scale 1, then once for any other


def test_autograd_path_under_a_reentrant_checkpoint_warns_that_it_adds_nothing():
    from torch.utils.checkpoint import checkpoint
    model, x = _mlp(), _input((8, 6)).requires_grad_()
    reg = per.Regularizer(model, "per", lam=0.05, num_slices=SLICES, path="autograd")
    reg.begin_step()
    out = checkpoint(model, x, use_reentrant=True)
    with pytest.warns(UserWarning, match="reentrant activation checkpoint"):
        (out.square().mean() + reg.penalty()).backward()


def test_vcl_of_a_float64_model_is_float64():
    model = _vcl_cnn().double()
    x = _input((12, 3, 5, 5)).double()
    reg = per.Regularizer(model, "vcl", 0.5)
    reg.materialize(lambda: model(x))
    assert all(b.dtype == torch.float64 for b in reg.betas.values())
    reg.begin_step()
    model(x)
    penalty = reg.penalty()
    assert penalty.dtype == torch.float64
    with per.capture_sites(model, reg.site_names) as seen:
        reg.begin_step()
        model(x)
    betas = {n: reg.betas[n.replace(".", "__")].detach().numpy() for n in reg.site_names}
    want = sum(_np_vcl(seen[n][0].numpy(), betas[n]) for n in reg.site_names)
    assert reg.penalty().item() == pytest.approx(0.5 * want, rel=1e-12)
