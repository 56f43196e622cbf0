"""The fused Triton `per_grad` kernel (per/_triton.py) against the plain path: on CPU under
Triton's interpreter (`TRITON_INTERPRET=1` must be set before triton decorates the kernel,
so those checks run in a fresh interpreter), and the compiled kernel where CUDA exists."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import per
from per import models
from runner_utils import restored_backend_flags


def _interpreter_broken() -> bool:
    """triton < 3.7's interpreter calls int() on a 1-element array (a kernel's `range` over a
    runtime bound), which numpy >= 2.4 refuses (triton-lang/triton#9171; fixed in 3.7)."""
    try:
        import triton
    except ImportError:
        return False            # the tests themselves say what is missing
    import numpy

    def version(module) -> tuple[int, ...]:
        return tuple(int(part) for part in module.__version__.split(".")[:2])
    return version(triton) < (3, 7) and version(numpy) >= (2, 4)


_interpreter_works = pytest.mark.skipif(_interpreter_broken(),
                                        reason="triton < 3.7's interpreter fails under numpy >= 2.4")


# Runs in a subprocess with TRITON_INTERPRET=1; prints "ok" when every check passed.
_INTERPRETED_CHECKS = textwrap.dedent("""
    import math
    import torch
    import torch.nn as nn
    import per
    import per.functional as F
    from per._triton import per_grad_fused

    def plain(x, theta, reduction):
        return F._per_grad_blocked(x, theta, 1 / (theta.shape[1] * (x.shape[0] if reduction == "mean" else 1)), 64)

    gen = torch.Generator().manual_seed(0)
    tol = {torch.float32: (1e-5, 1e-7), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 4e-3)}
    # N not a multiple of the 64-point block, N < block, d not a power of 2, s not a multiple of 64.
    for n, d, s in [(150, 16, 64), (20, 5, 100), (70, 33, 40)]:
        for dtype in tol:
            for reduction in ("sum", "mean"):
                x = torch.randn(n, d, generator=gen).to(dtype)
                theta = per.sample_directions(d, s, generator=gen)
                scale = 1 / (s * (n if reduction == "mean" else 1))
                got = per_grad_fused(x, theta, scale)
                assert got.dtype == dtype and got.shape == (n, d)
                rtol, atol = tol[dtype]
                # Against the float32 formula on the same (rounded) inputs.
                want = plain(x.float(), theta, reduction)
                torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * s * scale)
    x = torch.randn(40, 12, generator=gen)
    theta = per.sample_directions(12, 64, generator=gen)
    torch.testing.assert_close(per_grad_fused(x.T.contiguous().T, theta, 0.5),
                               per_grad_fused(x, theta, 0.5))
    # The products' modes can be named (the interpreter computes each in float32).
    for precision in ("ieee", "tf32", "tf32x3"):
        torch.testing.assert_close(per_grad_fused(x, theta, 0.5, precision), per_grad_fused(x, theta, 0.5))
    try:
        per_grad_fused(x, theta, 0.5, "fp64")
        raise AssertionError("an unknown precision was accepted")
    except ValueError as e:
        assert "valid: ieee, tf32, tf32x3" in str(e)

    # The Regularizer's backward path (Algorithm 1) through the kernel equals the autograd path.
    F._use_fused_kernel = lambda x: x.dtype != torch.float64
    # Traced, the kernel is the custom operator per::per_grad_fused: one graph, the same numbers.
    traced = torch.compile(lambda x, t: per.per_grad(x, t), fullgraph=True, backend="aot_eager")
    x = torch.randn(150, 16, generator=gen)
    theta = per.sample_directions(16, 64, generator=gen)
    torch.testing.assert_close(traced(x, theta), per_grad_fused(x, theta, 1 / 64), rtol=0, atol=0)
    def grads(path):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), per.Site(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), per.Site(),
                              nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
        reg = per.Regularizer(model, "per", 1e-2, num_slices=64, path=path)
        torch.manual_seed(1)
        reg.begin_step()
        x = torch.randn(4, 3, 6, 6)
        (model(x).square().mean() + reg.penalty()).backward()
        return [p.grad for p in model.parameters()]
    for a, b in zip(grads("backward"), grads("autograd")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    print("ok")
""")


@_interpreter_works
def test_kernel_under_triton_interpreter_matches_plain_path():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECKS], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


_BENCH_MODES = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "scripts")
    import bench
    import per.functional as F
    F._use_fused_kernel = lambda x: x.dtype != torch.float64
    import torch
    out = sys.argv[1]
    assert bench.main(["--tiny", "--device", "cpu", "--only", "per_grad", "--out", out]) == 0
    rows = [json.loads(line) for line in open(out)]
    modes = [r for r in rows if r["candidate"].startswith("fused triton, ")]
    assert sorted(r["candidate"] for r in modes) == sorted(
        f"fused triton, {p}" for p in ("ieee", "tf32", "tf32x3") for _ in range(3))
    assert all(0 <= r["rel_error_vs_float64"] < 1e-5 for r in modes), modes
    print("ok")
""")


@_interpreter_works
def test_bench_times_each_mode_of_the_kernel_under_the_interpreter(tmp_path):
    """bench's per_grad section, where the fused kernel runs, times each products' mode and
    reports its error against float64 (here on CPU under Triton's interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _BENCH_MODES, str(tmp_path / "bench.jsonl")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


def test_fused_kernel_keeps_float32_accuracy_where_tf32_is_off(monkeypatch):
    from per import _triton
    assert _triton.default_precision(tensor_cores=True, allow_tf32=True) == "tf32"      # tf32, bf16 runs
    assert _triton.default_precision(tensor_cores=True, allow_tf32=False) == "tf32x3"   # fp32: float32 accuracy
    assert _triton.default_precision(tensor_cores=False, allow_tf32=True) == "ieee"     # no TF32 hardware
    assert not _triton.has_tf32_tensor_cores(torch.device("cpu"))                       # the interpreter

    def asked(capability, hip):     # a fresh answer for a pretended GPU (the function caches)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        monkeypatch.setattr(torch.version, "hip", hip)
        _triton.has_tf32_tensor_cores.cache_clear()
        return _triton.has_tf32_tensor_cores(torch.device("cuda", 0))
    try:
        assert asked((9, 0), None)                  # H100/H200
        assert not asked((9, 0), "6.2")             # ROCm: no tf32x3
        assert not asked((7, 0), None)              # V100
    finally:
        _triton.has_tf32_tensor_cores.cache_clear()


def test_cpu_tensors_use_the_plain_path():
    assert not per.functional._use_fused_kernel(torch.zeros(4, 3))


def test_a_cuda_build_without_triton_takes_the_plain_path(monkeypatch):
    from types import SimpleNamespace
    site = SimpleNamespace(is_cuda=True, dtype=torch.float32, shape=(4, 16))    # a CUDA tensor's answers
    monkeypatch.delenv("PER_TRITON", raising=False)
    monkeypatch.setattr(per.functional, "HAS_TRITON", True)
    assert per.functional._use_fused_kernel(site)
    monkeypatch.setattr(per.functional, "HAS_TRITON", False)
    assert not per.functional._use_fused_kernel(site)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_fresh_directions():
    """Under trainer.compile=reduce-overhead PER's directions come from Inductor's generator
    inside the captured graph: each replay must draw new ones."""
    torch._dynamo.reset()
    draw = torch.compile(lambda x: per.sample_directions(16, 8, device=x.device) + x, mode="reduce-overhead")
    zeros = torch.zeros(16, 8, device="cuda")
    draws = [draw(zeros).clone() for _ in range(5)]       # warm-up, recording, then replays
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert all(torch.allclose(d.norm(dim=0), torch.ones(8, device="cuda")) for d in draws)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", per.REDUCTIONS)
def test_fused_kernel_on_cuda_matches_plain_path_and_trains(dtype, reduction, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32 * 32 * 32 + 5, 16, device="cuda", generator=gen).to(dtype)
    theta = per.sample_directions(16, 256, generator=gen, device="cuda")
    assert per.functional._use_fused_kernel(x)
    fused = per.per_grad(x, theta, reduction=reduction)
    monkeypatch.setenv("PER_TRITON", "0")
    assert not per.functional._use_fused_kernel(x)
    plain = per.per_grad(x.float(), theta, reduction=reduction)
    scale = 1.0 if reduction == "sum" else 1.0 / x.shape[0]
    torch.testing.assert_close(fused.float(), plain, rtol=2e-2, atol=2e-3 * scale)
    monkeypatch.delenv("PER_TRITON")

    def grads(path: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = models.create("resnet20", norm="none").cuda()
        reg = per.Regularizer(model, "per", 1e-3, path=path, reduction=reduction)
        torch.manual_seed(1)
        reg.begin_step()
        images = torch.randn(8, 3, 32, 32, device="cuda")
        (nn.functional.cross_entropy(model(images), torch.arange(8, device="cuda"))
         + reg.penalty()).backward()
        return [p.grad for p in model.parameters()]

    with restored_backend_flags(ieee=True):   # TF32 off: the kernel takes float32-accurate products (tf32x3)
        for a, b in zip(grads("backward"), grads("autograd"), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_kernel_modes_on_cuda_against_float64():
    """Each products' mode of the kernel on float32 points, against the float64 formula:
    "ieee" and "tf32x3" at float32 accuracy, "tf32" at TF32's (10-bit mantissa products)."""
    from per._triton import per_grad_fused
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32 * 32 * 32 + 5, 16, device="cuda", generator=gen)
    theta = per.sample_directions(16, 256, generator=gen, device="cuda")
    want = per.functional._per_grad_blocked(x.double(), theta.double(), 1 / 256, x.shape[0])
    errors = {p: ((per_grad_fused(x, theta, 1 / 256, p).double() - want).norm() / want.norm()).item()
              for p in ("ieee", "tf32", "tf32x3")}
    with restored_backend_flags(ieee=True):     # TF32 off, as an fp32 run: the default mode
        errors["default, TF32 off"] = ((per_grad_fused(x, theta, 1 / 256).double() - want).norm()
                                       / want.norm()).item()
    print(f"relative error against float64: {errors}")
    assert errors["ieee"] < 1e-5 and errors["tf32x3"] < 1e-5 and errors["tf32"] < 1e-2
    assert errors["default, TF32 off"] < 1e-5                  # float32 accuracy, not TF32's


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_compiled_per_model_is_one_graph(device):
    """torch.compile traces a PER model whole, its sites' backward included (on CUDA the fused
    kernel as the custom op `per::per_grad_fused`), on plain and on tracked steps (statistics
    as probe gradients): no graph break, so reduce-overhead captures one CUDA graph instead of
    one per site."""
    torch.manual_seed(0)
    model = models.create("resnet20", norm="none").to(device)
    reg = per.Regularizer(model, "per", 1e-3)
    for track in (False, True):
        reg.begin_step(track=track)
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32, device=device))
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
