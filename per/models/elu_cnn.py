"""The "deep ELU network": Clevert et al. 2015's 11-layer CIFAR CNN, as used by VCL and PER.

Stacks (layers x units x kernel), Clevert's original widths (docs/protocols.md):
[1x192x5], [1x192x1, 1x240x3], [1x240x1, 1x260x2], [1x260x1, 1x280x2],
[1x280x1, 1x300x2], [1x300x1], [1x{num_classes}x1]. 'same' padding (for the
even kernel 2, one extra zero row/column at the bottom/right, as the VCL
code's Conv2dSame and PyTorch's padding="same" do), conv biases (init 0, weights
PyTorch default, as in avirambh/vcl_pytorch), 2x2 max-pool stride 2 after each
of the first five stacks (32 -> 1), dropout .1/.2/.3/.4/.5 after stacks 2-6,
final 1x1 conv -> logits. norm="bn": conv -> BN (eps 1e-3, as in the VCL code)
-> activation.

PER paper: "an extra scalar bias after ReLU/LeakyReLU" (Fixup style): with
those activations each hidden layer adds a learnable scalar `act_bias` (init 0)
after the activation, and the post site follows it; with ELU the post site
follows the ELU. Leaky slope (`leaky_slope`, config `model.leaky_slope`)
default 0.01, our choice: the Table 2 protocol is Littwin & Wolf's (avirambh/vcl_pytorch),
whose `--activation lrelu` selects `nn.LeakyReLU` with PyTorch's default slope
0.01, but its ELU-11 builder itself only builds ELUs, so no source fixes it;
Clevert et al.'s LReLU comparison (alpha 0.1) is the other candidate.

Sites: hidden layer i (1..10) is submodule `layer{i}` with post site
`layer{i}.site` and pre site `layer{i}.pre_site` (conv output, or BN output
with norm="bn": the activation's input, where VCL acts). The classifier conv
has no site. Parameter names: every bias (conv, BN, act_bias) contains "bias".
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from . import register
from ..schema import NORMS
from ..sites import Site

ACTIVATIONS = ("relu", "leaky_relu", "elu")
# (out_channels, kernel) of the 10 hidden conv layers.
HIDDEN = ((192, 5), (192, 1), (240, 3), (240, 1), (260, 2), (260, 1), (280, 2), (280, 1),
          (300, 2), (300, 1))
POOL_AFTER = (1, 3, 5, 7, 9)  # last layer of stacks 1-5
DROPOUT_AFTER = {3: 0.1, 5: 0.2, 7: 0.3, 9: 0.4, 10: 0.5}  # last layer of stacks 2-6


class ConvAct(nn.Module):
    """pad -> conv -> [BN] -> pre_site -> activation -> [+ act_bias] -> site.

    x: (B, c_in, H, W) -> (B, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, activation: str, norm: str,
                 leaky_slope: float) -> None:
        super().__init__()
        # 'same' padding; an even kernel gets the extra zero row/column at the bottom/right.
        if kernel % 2:
            self.pad: nn.Module = nn.Identity()
            self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        else:
            self.pad = nn.ZeroPad2d((kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2))
            self.conv = nn.Conv2d(c_in, c_out, kernel)
        nn.init.zeros_(self.conv.bias)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3) if norm == "bn" else nn.Identity()
        self.pre_site = Site("pre")
        if activation == "relu":
            self.act = nn.ReLU()
        elif activation == "leaky_relu":
            self.act = nn.LeakyReLU(leaky_slope)
        else:
            self.act = nn.ELU()
        self.act_bias = nn.Parameter(torch.zeros(1)) if activation != "elu" else None
        self.site = Site()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.pre_site(self.bn(self.conv(self.pad(x)))))
        if self.act_bias is not None:
            h = h + self.act_bias
        return self.site(h)


class EluCnn(nn.Sequential):
    """11-layer CNN. x: (B, 3, 32, 32) -> logits (B, num_classes).

    Children in order: layer1, pool1, layer2, layer3, pool3, drop3, ..., layer10,
    drop10, classifier.
    """

    def __init__(self, activation: str = "elu", norm: str = "none", num_classes: int = 10,
                 leaky_slope: float = 0.01) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = 3
        for i, (c_out, kernel) in enumerate(HIDDEN, start=1):
            layers[f"layer{i}"] = ConvAct(c_in, c_out, kernel, activation, norm, leaky_slope)
            if i in POOL_AFTER:
                layers[f"pool{i}"] = nn.MaxPool2d(2, stride=2)
            if i in DROPOUT_AFTER:
                layers[f"drop{i}"] = nn.Dropout(DROPOUT_AFTER[i])
            c_in = c_out
        layers["classifier"] = nn.Conv2d(c_in, num_classes, 1)
        nn.init.zeros_(layers["classifier"].bias)
        super().__init__(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 32, 32) -> (B, num_classes)."""
        return super().forward(x).flatten(1)


@register("elu_cnn11", task="cifar")
def elu_cnn11(activation: str = "elu", norm: str = "none", num_classes: int = 10,
              leaky_slope: float = 0.01) -> EluCnn:
    return EluCnn(activation, norm, num_classes, leaky_slope)
