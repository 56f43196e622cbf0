"""CIFAR models: parameter counts, forward/backward, Fixup init, site placement."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from per.models import create
from per.models.resnet import FixupBlock
from per.sites import capture_sites, list_sites


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_backward(model: nn.Module, batch: int = 4, num_classes: int = 10) -> torch.Tensor:
    x = torch.randn(batch, 3, 32, 32)
    y = torch.arange(batch) % num_classes
    out = model(x)
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    return out


# akamaster/pytorch_resnet_cifar10 (option A) counts for 10 classes: README 0.27M / 0.85M / 1.7M.
@pytest.mark.parametrize("name,count", [("resnet20", 269_722), ("resnet56", 853_018),
                                        ("resnet110", 1_727_962)])
def test_resnet_bn_param_counts(name: str, count: int) -> None:
    assert n_params(create(name, norm="bn")) == count


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet56", 27), ("resnet110", 54)])
def test_resnet_fixup_param_counts(name: str, blocks: int) -> None:
    # Fixup = BN model - BN affine params + 5 scalars per block + stem/head biases.
    bn = create(name, norm="bn")
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in bn.modules()
                    if isinstance(m, nn.BatchNorm2d))
    assert n_params(create(name, norm="none")) == n_params(bn) - bn_affine + 5 * blocks + 2


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet56", 27), ("resnet110", 54)])
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_resnet_site_counts(name: str, blocks: int, norm: str) -> None:
    model = create(name, norm=norm)
    assert len(list_sites(model, "post")) == 1 + 2 * blocks
    assert len(list_sites(model, "pre")) == 1 + 2 * blocks


def test_resnet_site_names() -> None:
    bn = list(list_sites(create("resnet20", norm="bn"), "post"))
    assert bn[:3] == ["stem_site", "layer1.0.act1_site", "layer1.0.out_site"]
    assert bn[-1] == "layer3.2.out_site"
    fixup = list(list_sites(create("resnet20", norm="none"), "post"))
    assert fixup[:3] == ["layer1.0.in_site", "layer1.0.act1_site", "layer1.1.in_site"]
    assert fixup[-1] == "head_site"
    for model in (create("resnet20", norm="bn"), create("resnet20", norm="none")):
        pre = list(list_sites(model, "pre"))
        assert pre[:3] == ["stem_pre_site", "layer1.0.act1_pre_site", "layer1.0.out_pre_site"]


def test_resnet_bad_args() -> None:
    with pytest.raises(ValueError, match="none, bn"):
        create("resnet20", norm="gn")
    with pytest.raises(ValueError, match="6n\\+2"):
        from per.models.resnet import CifarResNet
        CifarResNet(21)


def test_resnet_bn_forward_backward() -> None:
    torch.manual_seed(0)
    model = create("resnet20", norm="bn", num_classes=100)
    forward_backward(model, num_classes=100)
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name


def test_shortcuts_follow_their_references() -> None:
    """Option A pads planes//4 zero channels on each side; Fixup appends zeros after x + bias1a."""
    x = torch.randn(2, 16, 8, 8)
    bn_block = create("resnet20", norm="bn").layer2[0]
    s = bn_block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert (s[:, :8] == 0).all() and (s[:, 24:] == 0).all()
    fixup_block = create("resnet20", norm="none").layer2[0]
    s = fixup_block.shortcut(x, x + 0.5)
    assert torch.equal(s[:, :16], x[:, :, ::2, ::2] + 0.5) and (s[:, 16:] == 0).all()
    y = torch.randn(2, 32, 4, 4)
    assert create("resnet20", norm="none").layer2[1].shortcut(y, y + 0.5) is y


def test_resnet_bn_sites_after_relu() -> None:
    torch.manual_seed(0)
    model = create("resnet20", norm="bn")
    post, pre = list(list_sites(model, "post")), list(list_sites(model, "pre"))
    with capture_sites(model, post + pre) as acts:
        model(torch.randn(4, 3, 32, 32))
    assert all(acts[n][0].min() >= 0 for n in post)
    assert all(acts[n][0].min() < 0 for n in pre)


def test_fixup_init_and_gradients() -> None:
    torch.manual_seed(0)
    model = create("resnet20", norm="none")
    for name, p in model.named_parameters():
        if name.endswith("conv2.weight") or name.startswith("fc."):
            assert (p == 0).all(), name
        if "bias" in name.rsplit(".", 1)[-1] and p.numel() == 1:
            assert p.item() == 0, name
        if name.endswith("scale"):
            assert p.item() == 1, name
    out = forward_backward(model)
    assert (out == 0).all()  # fc = 0
    # At init the zero fc blocks every gradient except its own.
    for name, p in model.named_parameters():
        nonzero = bool((p.grad != 0).any())
        assert nonzero == name.startswith("fc."), name
    # Away from the zero init every parameter receives a gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p == 0).all():
                p.normal_(0, 0.1)
    model.zero_grad()
    forward_backward(model)
    for name, p in model.named_parameters():
        assert (p.grad != 0).any(), name


def test_fixup_scalar_names() -> None:
    model = create("resnet56", norm="none")
    scalars = [n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.numel() == 1]
    assert len(scalars) == 5 * 27 + 2
    assert all("bias" in n or "scale" in n for n in scalars)
    assert not any(p.numel() > 1 and ("bias" in n or "scale" in n)
                   for n, p in model.named_parameters() if not n.startswith("fc."))


def test_fixup_residual_branches_zero_at_init() -> None:
    """With conv2 = 0 and bias2b = 0 each block outputs relu(shortcut), whatever the other scalars."""
    torch.manual_seed(0)
    model = create("resnet20", norm="none")
    blocks = [m for m in model.modules() if isinstance(m, FixupBlock)]
    with torch.no_grad():
        for b in blocks:
            b.bias1a.fill_(0.3)
            b.bias1b.fill_(-0.2)
            b.bias2a.fill_(0.1)
            b.scale.fill_(2.0)
    seen: list[tuple[FixupBlock, torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))) for b in blocks]
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == 9 and sum(b.downsample for b, _, _ in seen) == 2
    for b, x, out in seen:
        assert torch.equal(out, F.relu(b.shortcut(x, x + b.bias1a)))


def test_fixup_sites_after_scalar_bias() -> None:
    torch.manual_seed(0)
    model = create("resnet20", norm="none")
    blocks = dict((n, m) for n, m in model.named_modules() if isinstance(m, FixupBlock))
    with torch.no_grad():
        for i, b in enumerate(blocks.values()):
            b.bias1a.fill_(0.1 * (i + 1))
            b.bias2a.fill_(-0.05 * (i + 1))
            b.conv2.weight.normal_(0, 0.05)
        model.bias2.fill_(-0.07)
    post = list(list_sites(model, "post"))
    with capture_sites(model, post) as acts:
        model(torch.randn(4, 3, 32, 32))
    for name, b in blocks.items():
        # in_site = relu output + bias1a; act1_site = relu output + bias2a (minimum reached at 0).
        assert torch.isclose(acts[f"{name}.in_site"][0].min(), b.bias1a)
        assert torch.isclose(acts[f"{name}.act1_site"][0].min(), b.bias2a)
    assert torch.isclose(acts["head_site"][0].min(), model.bias2)


def test_fixup_head_site_sees_bias2_and_logits_match_reference() -> None:
    """Fixup's head is fc(avgpool(relu_out) + bias2); the head site sees relu_out + bias2."""
    torch.manual_seed(0)
    model = create("resnet20", norm="none")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p == 0).all():
                p.normal_(0, 0.1)   # away from the zero init, bias2 and fc included
    last_relu: list[torch.Tensor] = []
    model.layer3[-1].register_forward_hook(lambda m, i, o: last_relu.append(o.detach()))
    with torch.no_grad(), capture_sites(model, ["head_site"]) as acts:
        logits = model(torch.randn(4, 3, 32, 32))
        (relu_out,) = last_relu
        expected = model.fc(F.adaptive_avg_pool2d(relu_out, 1).flatten(1) + model.bias2)
    assert model.bias2.item() != 0 and (relu_out == 0).any()
    torch.testing.assert_close(acts["head_site"][0], relu_out + model.bias2)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
@pytest.mark.parametrize("norm", ["none", "bn"])
def test_elu_cnn_forward_backward(activation: str, norm: str) -> None:
    torch.manual_seed(0)
    model = create("elu_cnn11", activation=activation, norm=norm)
    forward_backward(model)
    for name, p in model.named_parameters():
        if norm == "bn" and name == "layer1.act_bias":
            # Reaches BN only through max-pool and a 1x1 conv (no padding, no dropout):
            # a per-channel constant that BN subtracts, so its gradient is zero up to rounding.
            assert p.grad.abs().max() < 1e-4, name
        else:
            assert (p.grad != 0).any(), name
    has_bias = [n for n, _ in model.named_parameters() if n.endswith("act_bias")]
    assert len(has_bias) == (0 if activation == "elu" else 10)
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == (
        10 if norm == "bn" else 0)


def test_elu_cnn_options() -> None:
    assert create("elu_cnn11", num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    # Default 0.01: nn.LeakyReLU() in the VCL code that defines the Table 2 protocol.
    assert create("elu_cnn11", activation="leaky_relu").layer1.act.negative_slope == 0.01
    leaky = create("elu_cnn11", activation="leaky_relu", leaky_slope=0.1)
    slopes = [m.negative_slope for m in leaky.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 10
    with pytest.raises(ValueError, match="relu, leaky_relu, elu"):
        create("elu_cnn11", activation="tanh")
    with pytest.raises(ValueError, match="none, bn"):
        create("elu_cnn11", norm="ln")


def _hidden_site_names(role: str) -> list[str]:
    """The deep ELU net's site names of hidden layers 1..10 in order (`post`: after the
    activation and its scalar bias; `pre`: before the activation)."""
    return [f"layer{i}.{'site' if role == 'post' else 'pre_site'}" for i in range(1, 11)]


def test_elu_cnn_sites_and_paper_counts() -> None:
    """PER's quoted overheads: BN '2.5K' = 2,544 channels, VCL '350K' = sum of C*H*W = 350,460."""
    model = create("elu_cnn11", norm="bn")
    assert sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == 2_544
    post, pre = _hidden_site_names("post"), _hidden_site_names("pre")
    assert post == list(list_sites(model, "post")) and len(post) == 10
    assert pre == list(list_sites(model, "pre")) and len(pre) == 10
    assert post[2] == "layer3.site"
    with capture_sites(model, pre) as acts:
        model(torch.randn(2, 3, 32, 32))
    shapes = [acts[n][0].shape[1:] for n in pre]
    assert [s[1] for s in shapes] == [32, 16, 16, 8, 8, 4, 4, 2, 2, 1]
    assert sum(s.numel() for s in shapes) == 350_460


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_elu_cnn_post_site_after_scalar_bias(activation: str) -> None:
    torch.manual_seed(0)
    model = create("elu_cnn11", activation=activation).eval()
    if activation == "relu":
        with torch.no_grad():
            model.layer3.act_bias.fill_(0.25)
    names = _hidden_site_names("post")
    with capture_sites(model, names) as acts:
        model(torch.randn(2, 3, 32, 32))
    low = acts["layer3.site"][0].min()
    if activation == "relu":
        assert low == 0.25
    else:
        assert -1 < low < 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_elu_cnn_same_padding() -> None:
    model = create("elu_cnn11")
    for layer in (model.layer1, model.layer5):  # kernels 5 and 2
        x = torch.randn(2, layer.conv.in_channels, 8, 8)
        ref = F.conv2d(x, layer.conv.weight, layer.conv.bias, padding="same")
        assert torch.allclose(layer.conv(layer.pad(x)), ref, atol=1e-5)
