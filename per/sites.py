"""Sites: explicit, named points in a model whose activations a regularizer sees.

A model places `Site()` modules where docs/method.md says (after each
nonlinearity, and after the scalar bias that follows it where the model has one;
`Site(role="pre")` on pre-activations for VCL). A site is the identity in the
forward pass; a `Regularizer` attaches to it to add its penalty, and
`capture_sites` records its activations for monitoring. Site names are the
module names in `model.named_modules()`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

ROLES = ("post", "pre")


class Site(nn.Module):
    """Identity marker for one regularized activation.

    Args:
        role: "post" for activations after a nonlinearity (PER, L1, L2 act here)
            or "pre" for pre-activations (VCL acts here, as in its reference).

    Input: one tensor of shape `(B, d)`, `(B, C, H, W)` or a sequence `(T, B, d)`; see
    `per.to_points` for how each becomes a point cloud. Any rank-3 input is read as a
    sequence, so a Conv1d output `(B, C, L)` would give `B*C` points in R^L: reshape it
    to `(B, C, L, 1)` first for `C`-dimensional points. A site called more than once per
    forward is regularized at every call; its tracked statistics are the mean over the calls
    whose backward ran.
    Its output must not be modified in place while a regularizer is attached (on either
    path, and under VCL, the activation is saved for the backward pass).
    """

    def __init__(self, role: str = "post") -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"unknown site role {role!r}; valid: {', '.join(ROLES)}")
        self.role = role
        # Set by a Regularizer: fn(site_name, h) -> h (may wrap h for the backward pass).
        self.penalty_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.site_name = ""
        # Set by `capture_sites`: activations seen while capturing (detached).
        self.captured: list[torch.Tensor] | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"Site {self.site_name or '(unattached)'} takes a tensor, got "
                            f"{type(h).__name__}; for a module that returns a tuple such as "
                            "nn.LSTM, place the site on its output tensor (out, _ = lstm(x))")
        if self.captured is not None:
            self.captured.append(h.detach())
        if self.penalty_fn is not None:
            h = self.penalty_fn(self.site_name, h)
        return h

    def extra_repr(self) -> str:
        return f"role={self.role!r}"

    def __getstate__(self) -> dict:
        """Copies and pickles of a model leave its regularizer behind (`copy.deepcopy` would
        otherwise clone a hidden, still-attached Regularizer): attach one to the copy."""
        return {**super().__getstate__(), "penalty_fn": None, "site_name": "", "captured": None}


def list_sites(model: nn.Module, role: str | None = None) -> dict[str, Site]:
    """All sites of `model` by name, in forward-definition order; `role` filters."""
    if role is not None and role not in ROLES:
        raise ValueError(f"unknown site role {role!r}; valid: {', '.join(ROLES)}")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Site) and (role is None or m.role == role)}


@contextlib.contextmanager
def capture_sites(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the activations of the named sites during the forward passes in the block.

    Yields a dict name -> list of detached tensors (one per forward call).
    """
    sites = list_sites(model)
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise ValueError(f"unknown sites {unknown}; valid: {', '.join(sites)}")
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for n in names:
        sites[n].captured = out[n]
    try:
        yield out
    finally:
        for n in names:
            sites[n].captured = None
