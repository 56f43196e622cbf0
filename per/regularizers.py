"""Activation regularizers attached to a model's sites: PER, L1, L2 and VCL.

Objective (docs/method.md): `task_loss + lam * sum over sites of L_site`. With
`reduction="sum"` (default, the paper's Algorithm 1) `L_site` sums over the site's `N`
points (`per.to_points`), so each point's gradient is `lam * g_i` with no `1/N`; with
`reduction="mean"` (the `1/b` of eq. 5/6) it is their mean. Logged per-site penalties
are always per-point means, comparable across sites, runs and reductions.

Two equivalent paths for PER/L1/L2:
- "backward" (paper Algorithm 1): the site is an identity whose backward adds
  `lam * dL_site/dh` in closed form; no autograd graph is built for the penalty and
  `penalty()` is zero.
- "autograd": the site computes `L_site` with autograd and `penalty()` returns
  `lam * sum L_site` to add to the task loss.
Both draw each site's directions in the forward pass from the global torch RNG, so
with the same seed, run eagerly, they use the same directions and give the same gradients
(a compiled model may draw its sites' directions in another order)
(`sampling="subspace"` draws them in the backward instead: same distribution, other numbers).

The backward path adds its gradient to what reaches the site, so it must know the factor
the penalty carries in the loss given to `backward()` (a GradScaler's scale; over k
accumulated micro-batches `1/k` under reduction="mean", 1 under "sum", whose penalty
sums over points): `begin_step(loss_scale=...)`.

Example:
    reg = Regularizer(model, "per", lam=1e-4)
    for step, (x, y) in enumerate(loader):
        reg.begin_step(track=step % 100 == 0)
        loss = F.cross_entropy(model(x), y) + reg.penalty()
        loss.backward()
        stats = reg.site_stats()
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from per.functional import (
    add_per_grad, check_layout, check_reduction, compute_dtype, from_points, l1_penalty, l2_penalty,
    per_grad, per_grad_subspace, per_loss, phi, point_dim, sample_directions, subspace_applies, to_points)
from per.schema import GRAD_RATIO_PREFIX, PENALTY_PREFIX, REGULARIZED
from per.sites import Site, list_sites

KINDS = REGULARIZED      # the methods with a lambda: l1, l2, per, vcl
PATHS = ("backward", "autograd")
SAMPLINGS = ("explicit", "subspace")
_ROLE = {"per": "post", "l1": "post", "l2": "post", "vcl": "pre"}


def _site_value(kind: str, x: torch.Tensor, directions: torch.Tensor | None,
                reduction: str) -> torch.Tensor:
    """`L_site` of `x: (N, d)`: PER, L1 `sum ||x_i||_1` or L2 `sum ||x_i||^2`, summed over
    the points or averaged (`reduction`)."""
    if kind == "per":
        return per_loss(x, directions, reduction=reduction, check_finite=False)
    return (l1_penalty if kind == "l1" else l2_penalty)(x, reduction=reduction)


def _site_grad(kind: str, x: torch.Tensor, directions: torch.Tensor | None,
               reduction: str) -> torch.Tensor:
    """`dL_site/dx` in closed form, `x: (N, d)` -> `(N, d)` in `x`'s dtype:
    PER `per_grad`, L1 `sign(x)`, L2 `2x`; divided by `N` for "mean"."""
    if kind == "per":
        return per_grad(x, directions, reduction=reduction)
    grad = x.sign() if kind == "l1" else 2 * x
    return grad / x.shape[0] if reduction == "mean" else grad


def sampling_conflict(sampling: str, kind: str, path: str, share_directions: bool) -> str | None:
    """Why `sampling` cannot serve this regularizer (a message), or None if it can."""
    if sampling not in SAMPLINGS:
        return f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLINGS)}"
    if sampling == "subspace" and (kind != "per" or path != "backward" or share_directions):
        return ("sampling='subspace' draws PER's directions inside the backward pass: it needs "
                f"kind='per', path='backward' and share_directions=False, got kind={kind!r}, "
                f"path={path!r}, share_directions={share_directions!r}")
    return None


class _AddPenaltyGrad(torch.autograd.Function):
    """Identity on `h`; backward returns `grad_output + lam * dL_site/dh` (Algorithm 1).
    PER with `directions=None` (`sampling="subspace"`) draws `num_slices` directions in the
    backward: implicitly (`per_grad_subspace`) where `subspace_applies`, else a matrix.

    On a tracked step `probe` is a `(3,)` leaf that requires grad, and the backward returns
    the site's statistics as its gradient: `probe.grad += [L_site per point, grad ratio, 1]`
    (in the probe's dtype and on its device; the 1 counts the calls). No state is written,
    here or in the forward, so torch.compile traces tracked steps as one graph too.

    `scale` (a loss scale other than 1, `Regularizer.begin_step`) is a 0-d tensor, so that a
    compiled step takes each new value as data (a float would be specialized or lifted);
    the penalty's gradient and the ratio are multiplied by it."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, directions: torch.Tensor | None, probe: torch.Tensor | None,
                scale: torch.Tensor | None, kind: str, lam: float, layout: str, reduction: str,
                num_slices: int) -> torch.Tensor:
        ctx.save_for_backward(h, directions, scale)
        ctx.kind, ctx.lam, ctx.layout, ctx.reduction = kind, lam, layout, reduction
        ctx.num_slices = num_slices
        ctx.probe_like = (probe.dtype, probe.device) if probe is not None else None
        return h.view_as(h)

    @staticmethod
    @once_differentiable     # the closed form has no graph: create_graph=True needs path="autograd"
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # This is where lambda acts on the backward path: lam * g_i joins dL/dh_i.
        h, directions, scale = ctx.saved_tensors
        track = ctx.needs_input_grad[2]
        none = (None,) * 6
        if ctx.kind == "per" and directions is None:
            d = point_dim(h.shape, ctx.layout)
            if not subspace_applies(h.numel() // d if d else 0, d, ctx.num_slices):
                directions = sample_directions(d, ctx.num_slices, device=h.device, dtype=compute_dtype(h))
        implicit = ctx.kind == "per" and directions is None
        if ctx.kind == "per" and not implicit and not track and scale is None:
            grad = add_per_grad(grad_output, h, directions, ctx.lam, layout=ctx.layout,
                                reduction=ctx.reduction)
            return grad, None, None, *none
        x = to_points(h, ctx.layout)
        if implicit:
            points_grad, projections = per_grad_subspace(x, ctx.num_slices, reduction=ctx.reduction)
            value = lambda: phi(projections).mean()
        else:
            points_grad = _site_grad(ctx.kind, x, directions, ctx.reduction)
            value = lambda: _site_value(ctx.kind, x, directions, "mean")
        site_grad = from_points(points_grad, h.shape, ctx.layout)
        lam = ctx.lam
        if scale is not None:
            # lam * scale * g in the scale's float32/float64, never in a bf16/fp16 site's
            # dtype: an fp16 gradient times GradScaler's 65536 overflows before lam shrinks it.
            site_grad, lam = site_grad.to(scale.dtype) * (lam * scale), 1.0
        stats = None
        if track:
            ratio = lam * site_grad.float().norm() / grad_output.float().norm()
            dtype, device = ctx.probe_like
            one = torch.ones((), dtype=dtype, device=ratio.device)
            stats = torch.stack([value().to(dtype), ratio.to(dtype), one]).to(device)
        grad = torch.add(grad_output, site_grad.to(grad_output.dtype), alpha=lam)
        return grad, None, stats, *none


class _GradNormProbe(torch.autograd.Function):
    """Identity on `h` (the autograd path and VCL on tracked steps); backward adds
    `[penalty, penalty_grad_norm / ||grad_output||, 1]` to `stats[name]`, in the penalty's
    dtype, as `_AddPenaltyGrad` does to its probe."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, penalty: torch.Tensor, penalty_grad_norm: torch.Tensor,
                stats: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        ctx.penalty, ctx.penalty_grad_norm, ctx.stats, ctx.name = penalty, penalty_grad_norm, stats, name
        # A copy, not a view, so that the probe's output is a tensor of its own.
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ratio = ctx.penalty_grad_norm / grad_output.float().norm()
        row = torch.stack([ctx.penalty, ratio.to(ctx.penalty.dtype), torch.ones_like(ctx.penalty)])
        ctx.stats[ctx.name] = ctx.stats.get(ctx.name, 0) + row
        return grad_output, None, None, None, None


class Regularizer(nn.Module):
    """One regularizer acting on the sites of one role in `model` (all, or those named;
    docs/method.md).

    Args:
        model: a model containing `per.Site` modules; kept by reference (not a submodule).
        kind: one of `KINDS`. PER/L1/L2 act on "post" sites, VCL on "pre" sites.
        lam: the one coefficient for all sites (>= 0).
        layout: how a 4-D site becomes points, one of `LAYOUTS` (see `per.to_points`).
        num_slices: PER directions per site and call (`s`, paper: 256).
        reduction: PER/L1/L2 over a site's points, one of `REDUCTIONS`: "sum" (Algorithm 1,
            default) or "mean" (eq. 5/6). VCL ignores it.
        path: "backward" (Algorithm 1, gradient injected in backward) or "autograd"
            (penalty returned by `penalty()`); VCL always uses autograd.
        share_directions: draw one direction matrix per distinct `d` per step and reuse it
            across the sites of that `d` (speed option); default: independent per site and call.
        sampling: how PER draws its directions, one of `SAMPLINGS`. "explicit" (default): a
            `(d, num_slices)` matrix per site in the forward pass, the same on both paths.
            "subspace" (CPU speed option for the flatten layout, backward path only): drawn
            in each backward, implicitly where it is cheaper (`per.functional.subspace_applies`),
            with the same distribution of gradients (`per.functional.per_grad_subspace`), but
            not the same numbers; elsewhere as a matrix, in the backward.
        vcl_chunk: VCL chunk size (reference: 5); each batch needs `2 * vcl_chunk` examples.
        sites: names of the sites to act on (`per.list_sites(model)`); default: every site
            of the kind's role. Regularizers on disjoint sites of one model can coexist.

    The penalty acts only while `torch.is_grad_enabled()` and `model.training`.
    Call `begin_step()` before each training forward. A site's activation is saved for
    the backward pass (on either path, and by VCL), so it must not be modified in place
    afterwards. Activation checkpointing: the backward path works under both kinds; the autograd path needs
    `use_reentrant=False` (a reentrant checkpoint runs the forward without grad, so no
    term is made; the recompute in backward warns).
    """

    def __init__(self, model: nn.Module, kind: str, lam: float, *, layout: str = "channels",
                 num_slices: int = 256, reduction: str = "sum", path: str = "backward",
                 share_directions: bool = False, sampling: str = "explicit", vcl_chunk: int = 5,
                 sites: list[str] | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown regularizer kind {kind!r}; valid: {', '.join(KINDS)}")
        check_layout(layout)
        check_reduction(reduction)
        if isinstance(num_slices, bool) or not isinstance(num_slices, numbers.Integral) or num_slices < 1:
            raise ValueError(f"num_slices must be an integer >= 1, got {num_slices!r}")
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; valid: {', '.join(PATHS)}")
        if conflict := sampling_conflict(sampling, kind, path, share_directions):
            raise ValueError(conflict)
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(vcl_chunk, bool) or not isinstance(vcl_chunk, numbers.Integral) or vcl_chunk < 2:
            raise ValueError(f"vcl_chunk must be an integer >= 2 (a variance needs 2 samples), "
                             f"got {vcl_chunk!r}")
        available = list_sites(model, _ROLE[kind])
        if not available:
            raise ValueError(f"model has no Site(role={_ROLE[kind]!r}) for regularizer {kind!r}")
        if sites is not None:
            if isinstance(sites, str) or not sites:
                raise ValueError(f"sites must be a non-empty list of site names, got {sites!r}")
            unknown = [n for n in sites if n not in available]
            if unknown:
                raise ValueError(f"sites {unknown} are not Site(role={_ROLE[kind]!r}) sites of the "
                                 f"model, which regularizer {kind!r} needs; valid: {', '.join(available)}")
        chosen = {n: site for n, site in available.items() if sites is None or n in sites}
        attached = [n for n, s in chosen.items() if s.penalty_fn is not None]
        if attached:
            raise ValueError(f"sites {attached} already have a regularizer; "
                             "call its remove() first")
        self.__dict__["model"] = model  # a reference, not a registered submodule
        self.kind, self.lam, self.layout, self.num_slices = kind, float(lam), layout, int(num_slices)
        self.reduction = reduction
        self.path = "autograd" if kind == "vcl" else path
        self.share_directions, self.sampling, self.vcl_chunk = share_directions, sampling, vcl_chunk
        self.site_names: list[str] = list(chosen)
        self._sites: dict[str, Site] = chosen
        self.betas = nn.ParameterDict()  # VCL: site name ('.' -> '__') -> beta (h.shape[1:])
        self._materializing = False
        self._track = False
        self._scale: torch.Tensor | None = None        # begin_step's loss_scale (0-d), None for 1
        self._terms: list[torch.Tensor] = []           # lam * L_site, autograd path
        self._made: set[str] = set()                   # sites that made a term since begin_step
        self._stats: dict[str, torch.Tensor] = {}      # site -> (3,) sums, autograd path and VCL
        self._probes: dict[str, torch.Tensor] = {}     # site -> (3,) statistics leaf, backward path
        self._shared: dict[int, torch.Tensor] = {}     # d -> directions, share_directions
        self._device = torch.device("cpu")
        for name, site in chosen.items():
            site.penalty_fn, site.site_name = self._apply, name

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, lam={self.lam}, layout={self.layout!r}, "
                f"num_slices={self.num_slices}, reduction={self.reduction!r}, path={self.path!r}, "
                f"sampling={self.sampling!r}, sites={len(self.site_names)}")

    def begin_step(self, track: bool = False, loss_scale: float = 1.0) -> None:
        """Start a training step: reset accumulators; `track` computes per-site statistics.

        `loss_scale`: the factor the penalty carries in the loss given to `backward()`
        this step, i.e. what the autograd path's `penalty()` is multiplied by
        (`scaler.get_scale()` under a `torch.amp.GradScaler`; for k accumulated
        micro-batches as one batch, `1/k` under reduction="mean" and 1 under "sum",
        whose penalty sums over points). The backward path multiplies the gradient it
        adds by it, as autograd does with `penalty()`'s term; the logged `grad_ratio` is
        then the unscaled one on both paths.

        Raises:
            ValueError: `loss_scale` is not a finite number > 0.
        Warns when terms of the autograd path were never handed out by `penalty()`
        (it was called before the forward, or not at all): those penalties are lost.
        """
        if (isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real)
                or not math.isfinite(loss_scale) or loss_scale <= 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        if self._terms:
            warnings.warn(f"{len(self._terms)} penalty term(s) of the last step were never added to a "
                          "loss: call reg.penalty() after the model's forward and add it to the loss",
                          stacklevel=2)
        self._track = track
        self._terms = []
        self._made = set()
        self._stats = {}
        self._shared = {}
        self._probes = {}
        # Tensors made here, outside any compiled forward.
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else self._device
        dtype = torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32
        self._scale = None if loss_scale == 1 else torch.tensor(float(loss_scale), dtype=dtype, device=device)
        if track and self.path == "backward":
            self._probes = {name: torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
                            for name in self.site_names}

    def penalty(self) -> torch.Tensor:
        """0-d tensor to add to the task loss: `lam * sum_sites L_site` over the training
        forwards since the last `penalty()` or `begin_step()` (0 on the backward path). It
        hands each term out once, so accumulating gradients over micro-batches works as on
        the backward path: one `penalty()` per micro-batch loss."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros((), device=self._device)
        return torch.stack(terms).sum()

    def site_stats(self) -> dict[str, torch.Tensor]:
        """After backward of a tracked step: `penalty/<site>` (`L_site` as a per-point mean,
        whatever the reduction; not scaled by lam) and
        `grad_ratio/<site>` (`||lam dL_site/dh|| / ||d(downstream loss)/dh||`), 0-d device
        tensors (no sync). Empty if the step was not tracked. Only calls whose backward ran
        count (the site's input required grad and its output reached the loss): a site
        called more than once (in one forward, or over micro-batches) reports the mean over
        those, one backward per forward assumed. Each call's backward adds its statistics
        and a count of 1 to a `(3,)` sum; on the backward path that sum is a probe's
        gradient, which a plain `loss.backward()` fills (not `torch.autograd.grad` or
        `backward(inputs=...)` without the probes)."""
        if not self._track:
            return {}
        sums = {**self._stats, **{name: p.grad for name, p in self._probes.items() if p.grad is not None}}
        stats = {}
        for name, (penalty, ratio, calls) in sums.items():
            stats[PENALTY_PREFIX + name], stats[GRAD_RATIO_PREFIX + name] = penalty / calls, ratio / calls
        return stats

    def materialize(self, forward_fn: Callable[[], Any]) -> None:
        """VCL: run `forward_fn()` once under no_grad to create the betas (init 1, on the
        activations' device). Call after moving the model to its device and before building
        the optimizer. No-op for other kinds."""
        if self.kind != "vcl":
            return
        self._materializing = True
        try:
            with torch.no_grad():
                forward_fn()
        finally:
            self._materializing = False

    def remove(self) -> None:
        """Detach from the model's sites (those another regularizer has since taken stay its)."""
        for site in self._sites.values():
            if site.penalty_fn == self._apply:
                site.penalty_fn, site.site_name = None, ""

    def _apply(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """`Site.penalty_fn`: `h` of shape `(B, d)`, `(B, C, H, W)` or `(T, B, d)` -> same."""
        if self._materializing:
            self._vcl_beta(name, h, create=True)
            return h
        if not (torch.is_grad_enabled() and self.model.training):
            return h
        self._device = h.device
        if self.kind == "vcl":
            return self._apply_vcl(name, h)
        # The backward path needs only `d` here; the points are built in its backward.
        d = point_dim(h.shape, self.layout)
        explicit = self.kind == "per" and self.sampling == "explicit"
        directions = self._directions(d, h) if explicit else None
        if self.path == "backward":
            probe = self._probes.get(name) if h.requires_grad else None   # no gradient, no statistics
            return _AddPenaltyGrad.apply(h, directions, probe, self._scale, self.kind, self.lam,
                                         self.layout, self.reduction, self.num_slices)
        x = to_points(h, self.layout)
        value = _site_value(self.kind, x, directions, self.reduction)
        self._add_term(name, self.lam * value)
        if not self._track:
            return h
        with torch.no_grad():
            per_point = value.detach() / (x.shape[0] if self.reduction == "sum" else 1)
            grad_norm = self._scaled(self.lam * _site_grad(self.kind, x, directions, self.reduction).float().norm())
        return _GradNormProbe.apply(h, per_point, grad_norm, self._stats, name)

    def _directions(self, d: int, h: torch.Tensor) -> torch.Tensor:
        """`(d, num_slices)` directions from the global RNG, fresh per call (or shared per `d`)."""
        if self.share_directions and d in self._shared:
            return self._shared[d]
        directions = sample_directions(d, self.num_slices, device=h.device, dtype=compute_dtype(h))
        if self.share_directions:
            self._shared[d] = directions
        return directions

    def _vcl_beta(self, name: str, h: torch.Tensor, create: bool = False) -> nn.Parameter:
        """The per-unit beta of a VCL site, `h.shape[1:]`; created (init 1) when `create`."""
        if h.dim() not in (2, 4):
            raise ValueError(f"VCL site {name!r} needs activations of rank 2 (B, d) or "
                             f"4 (B, C, H, W), got shape {tuple(h.shape)}")
        key = name.replace(".", "__")
        if create and key not in self.betas:
            self.betas[key] = nn.Parameter(torch.ones(h.shape[1:], device=h.device, dtype=compute_dtype(h)))
        if key not in self.betas:
            raise RuntimeError(f"VCL beta of site {name!r} missing: call materialize() "
                               "before training (and before building the optimizer)")
        return self.betas[key]

    def _apply_vcl(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """VCL (Littwin & Wolf 2018; docs/protocols.md) on pre-activations `h: (B, ...)`:
        `L = mean over units of (1 - var(h[:c]) / (var(h[c:2c]) + beta))^2`, var over the batch."""
        beta = self._vcl_beta(name, h)
        c = self.vcl_chunk
        if h.shape[0] < 2 * c:
            raise ValueError(f"VCL needs a batch of at least 2 * vcl_chunk = {2 * c} examples, "
                             f"got {h.shape[0]} at site {name!r}")
        hf = h.to(compute_dtype(h))
        var1, var2 = hf[:c].var(dim=0), hf[c:2 * c].var(dim=0)
        value = (1 - var1 / (var2 + beta)).square().mean()
        self._add_term(name, self.lam * value)
        if not (self._track and h.requires_grad):
            return h
        (grad,) = torch.autograd.grad(self.lam * value, h, retain_graph=True)
        return _GradNormProbe.apply(h, value.detach(), self._scaled(grad.float().norm()), self._stats, name)

    def _scaled(self, norm: torch.Tensor) -> torch.Tensor:
        """A penalty gradient's norm times this step's loss scale (it is compared with the
        scaled gradient reaching the site)."""
        return norm if self._scale is None else norm * self._scale.to(norm.device, norm.dtype)

    def _add_term(self, name: str, term: torch.Tensor) -> None:
        """Keep site `name`'s `term` for `penalty()`, unless this forward runs inside a
        backward pass: an activation checkpoint's recompute, whose first forward made it
        (a reentrant checkpoint's first forward ran without grad and made none: warns)."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            self._terms.append(term)
            self._made.add(name)
        elif name not in self._made:
            warnings.warn(f"site {name!r} ran its forward without grad, then again inside backward (a "
                          "reentrant activation checkpoint): path='autograd' adds no penalty there; use "
                          "use_reentrant=False or path='backward'", stacklevel=2)
