"""CIFAR ResNets (depth 6n+2): He et al. 2016 with BN, or Fixup without normalization.

`norm="bn"` follows akamaster/pytorch_resnet_cifar10 `resnet.py`: conv-BN-ReLU,
option-A shortcut (`x[:, :, ::2, ::2]` zero-padded by planes//4 channels on each
side), `kaiming_normal_` (fan-in) on conv and linear weights, default BN init.

`norm="none"` follows hongyi-zhang/Fixup `cifar/models/fixup_resnet_cifar.py`:
bias-free convs, scalar biases `bias1a, bias1b, bias2a, bias2b` (init 0) and a
scalar `scale` (init 1) per block, stem bias `bias1`, head bias `bias2`; block
conv1 ~ N(0, sqrt(2 / (C_out*3*3)) * L^-0.5) with L = number of blocks, conv2 = 0,
fc = 0; stride-2 shortcut = `(x + bias1a)[:, :, ::2, ::2]` (AvgPool2d(1, 2)) with
zero channels concatenated after. Every Fixup scalar's parameter name contains
`bias` or `scale`, so a training loop can select "bias and scale parameters"
(lr/10 in Fixup's protocol) by name.

Sites (docs/method.md), 1 + 2*blocks of each role:
- post, BN: `stem_site` after the stem ReLU; per block `act1_site` after the
  first ReLU and `out_site` after the block's final ReLU.
- post, Fixup: after each ReLU and after the scalar bias that follows it.
  Per block `in_site` on `x + bias1a` (the previous ReLU's output plus this
  block's bias: it feeds conv1 and the downsampling shortcut; the identity
  shortcut uses raw `x`, as in Fixup's code) and `act1_site` on
  `relu(...) + bias2a`; `head_site` on the last block's final ReLU output plus
  the head bias `bias2`. Fixup adds `bias2` after the average pooling; a scalar
  commutes with the average, so it is added before pooling here (same logits).
- pre (for VCL), both norms: on the input of each ReLU: `stem_pre_site`, per block
  `act1_pre_site` and `out_pre_site` (residual sum before the final ReLU).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from ..schema import NORMS
from ..sites import Site


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + option-A shortcut, ReLU. x: (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1_pre_site = Site("pre")
        self.act1_site = Site()
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.out_pre_site = Site("pre")
        self.out_site = Site()
        self.pad = c_out // 4 if stride != 1 or c_in != c_out else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: identity, or subsample and zero-pad channels on both sides."""
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1_site(F.relu(self.act1_pre_site(self.bn1(self.conv1(x)))))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.out_site(F.relu(self.out_pre_site(out)))


class FixupBlock(nn.Module):
    """Fixup basic block. x: (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.in_site = Site()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.act1_pre_site = Site("pre")
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.act1_site = Site()
        self.conv2 = _conv3x3(c_out, c_out)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.out_pre_site = Site("pre")
        self.downsample = stride != 1 or c_in != c_out

    def shortcut(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Identity on the raw input x, or subsample h = x + bias1a and append zero channels."""
        if not self.downsample:
            return x
        s = h[:, :, ::2, ::2]
        return torch.cat((s, torch.zeros_like(s)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_site(x + self.bias1a)
        out = self.act1_site(F.relu(self.act1_pre_site(self.conv1(h) + self.bias1b)) + self.bias2a)
        out = self.conv2(out) * self.scale + self.bias2b + self.shortcut(x, h)
        return F.relu(self.out_pre_site(out))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: depth = 6n+2, three stages of n blocks, widths 16/32/64.

    x: (B, 3, 32, 32) -> logits (B, num_classes).
    """

    def __init__(self, depth: int, norm: str = "bn", num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        self.norm = norm
        n = (depth - 2) // 6
        fixup = norm == "none"
        block = FixupBlock if fixup else BasicBlock

        self.conv1 = _conv3x3(3, 16)
        if fixup:
            self.bias1 = nn.Parameter(torch.zeros(1))
        else:
            self.bn1 = nn.BatchNorm2d(16)
        self.stem_pre_site = Site("pre")
        if not fixup:
            self.stem_site = Site()
        c_in = 16
        for stage, width in enumerate((16, 32, 64), start=1):
            blocks = [block(c_in if i == 0 else width, width, 2 if stage > 1 and i == 0 else 1)
                      for i in range(n)]
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            c_in = width
        if fixup:
            self.bias2 = nn.Parameter(torch.zeros(1))
            self.head_site = Site()
        self.fc = nn.Linear(64, num_classes)
        self._init_weights(num_blocks=3 * n)

    def _init_weights(self, num_blocks: int) -> None:
        if self.norm == "bn":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight)
            return
        for m in self.modules():
            if isinstance(m, FixupBlock):
                w = m.conv1.weight
                std = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) * num_blocks ** -0.5
                nn.init.normal_(w, mean=0.0, std=std)
                nn.init.zeros_(m.conv2.weight)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 32, 32) -> (B, num_classes)."""
        if self.norm == "none":
            x = F.relu(self.stem_pre_site(self.conv1(x) + self.bias1))
            x = self.layer3(self.layer2(self.layer1(x)))
            # Fixup's fc(avgpool(x) + bias2), with bias2 added before pooling so the site sees it.
            x = self.head_site(x + self.bias2)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        x = self.stem_site(F.relu(self.stem_pre_site(self.bn1(self.conv1(x)))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register("resnet20", task="cifar")
def resnet20(norm: str = "bn", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, norm, num_classes)


@register("resnet56", task="cifar")
def resnet56(norm: str = "bn", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, norm, num_classes)


@register("resnet110", task="cifar")
def resnet110(norm: str = "bn", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, norm, num_classes)
