"""PER (Joo, Kang, Kim, ICLR 2020): activation regularization by matching N(0, I) in W1.

The library: the PER loss and gradient (`per_loss`, `per_grad`), the L1/L2 baselines,
the sliced-W1 monitor, and `Regularizer`, which attaches PER/L1/L2/VCL to a model's
`Site`s. `per.models` and `per.training` are imported explicitly, not from here.
"""
from per.functional import (
    LAYOUTS, REDUCTIONS, l1_penalty, l2_penalty, per_grad, per_grad_subspace, per_loss, phi, sample_directions,
    to_points)
from per.regularizers import KINDS, Regularizer
from per.sites import Site, capture_sites, list_sites
from per.wasserstein import sliced_wasserstein_normal, w1_normal_1d

__all__ = [
    "sample_directions", "phi", "per_loss", "per_grad", "per_grad_subspace", "l1_penalty", "l2_penalty",
    "to_points", "LAYOUTS", "REDUCTIONS", "sliced_wasserstein_normal", "w1_normal_1d",
    "Site", "list_sites", "capture_sites", "Regularizer", "KINDS",
]
