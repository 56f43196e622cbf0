"""`PER_CPU_COMPILE=1`: the CPU blocked path through torch.compile gives the eager path's
gradients (both reductions, through the Regularizer too), and a failing backend is named."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import per
import per.functional as F


@pytest.mark.slow   # the first call compiles (about 15 s)
def test_compiled_blocks_give_the_eager_gradients(monkeypatch):
    calls = []
    compiled = F._compiled_blocked or torch.compile(F._per_grad_blocked, dynamic=False)
    monkeypatch.setattr(F, "_compiled_blocked",
                        lambda x, *args: calls.append(x.shape) or compiled(x, *args))
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(2100, 16, generator=gen), per.sample_directions(16, 256, generator=gen)),
             (torch.randn(70, 33, generator=gen), per.sample_directions(33, 40, generator=gen)),
             (torch.randn(6, 90, generator=gen), per.sample_directions(90, 32, generator=gen))]  # d > N
    for reduction in per.REDUCTIONS:
        for x, theta in cases:
            monkeypatch.delenv("PER_CPU_COMPILE", raising=False)
            eager = F.per_grad(x, theta, reduction=reduction)
            assert not calls
            monkeypatch.setenv("PER_CPU_COMPILE", "1")
            got = F.per_grad(x, theta, reduction=reduction)
            assert calls == [x.shape]     # the whole cloud went through the compiled function
            calls.clear()
            scale = 1 / (x.shape[0] if reduction == "mean" else 1)
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6 * scale)
    x64, theta64 = cases[0][0].double(), cases[0][1].double()    # float64 stays eager
    compiled64 = F.per_grad(x64, theta64)
    assert not calls
    monkeypatch.delenv("PER_CPU_COMPILE")
    assert torch.equal(compiled64, F.per_grad(x64, theta64))
    monkeypatch.setenv("PER_CPU_COMPILE", "1")

    def grads(path: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), per.Site(), nn.Flatten(),
                              nn.Linear(8 * 6 * 6, 2))
        reg = per.Regularizer(model, "per", 1e-2, num_slices=64, path=path)
        torch.manual_seed(1)
        reg.begin_step()
        (model(torch.randn(4, 3, 6, 6)).square().mean() + reg.penalty()).backward()
        return [p.grad for p in model.parameters()]
    for a, b in zip(grads("backward"), grads("autograd")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert calls    # the backward path took the compiled function


def test_a_failing_compile_backend_is_named(monkeypatch):
    def broken(*args):
        raise OSError("no C++ compiler")
    monkeypatch.setattr(F, "_compiled_blocked", broken)
    monkeypatch.setenv("PER_CPU_COMPILE", "1")
    with pytest.raises(RuntimeError, match="PER_CPU_COMPILE=1 needs torch.compile.*no C.. compiler"):
        F.per_grad(torch.randn(8, 4), per.sample_directions(4, 16))
    monkeypatch.setenv("PER_CPU_COMPILE", "0")
    assert F.per_grad(torch.randn(8, 4), per.sample_directions(4, 16)).shape == (8, 4)
