"""GPU tests of the one-kernel residual add + RMSNorm: ``zephyr_plugins.norm_kernel`` (Triton, no
permutation) and ``zephyr::add_rms_norm_permuted`` (CUDA, output in an act-order layer's row order).

Against the model's plain ``add_rms_norm`` (the arithmetic the CPU runs) on
fresh random data, in the activation dtype: the sum bit for bit, the
normalized row within a last-bit rounding; hidden sizes of Mistral (4096),
SmolLM2 (576) and one that is no power of two (960); decode rows and prefill
chunks; inside a CUDA graph; and the ``ModelOps`` wiring (compiled ops use it
on CUDA without a permutation, the compiled version otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_helpers import cuda_with_kernels, poison_allocator  # noqa: E402

from zephyr_plugins import model_ops, norm_kernel  # noqa: E402

pytestmark = pytest.mark.gpu


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def _inputs(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    h = (torch.randn(shape, generator=g, device="cuda") * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g, device="cuda") + 0.5).to(dtype)
    return x, h, w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (8, 1, 4096), (3, 1, 576), (2, 5, 960), (1, 300, 4096)])
def test_matches_plain_add_rms_norm(dtype, shape):
    _cuda()
    x, h, w = _inputs(shape, dtype, seed=shape[-1] + shape[0])
    assert norm_kernel.available(x, w)
    want_s, want_y = model_ops.add_rms_norm(x, h, w, 1e-5)
    got_s, got_y = norm_kernel.add_rms_norm(x, h, w, 1e-5)
    torch.cuda.synchronize()
    assert got_s.shape == want_s.shape and got_y.shape == want_y.shape and got_y.dtype == dtype
    assert torch.equal(got_s, want_s)  # the residual sum: one rounding, the same
    # rsqrt and the order of the sum may differ in the last fp32 bit, which can move each of the two
    # roundings (the normalized value, then the product with the weight) by one unit.
    diff = (got_y.float() - want_y.float()).abs()
    ulp = want_y.float().abs() * (2 * 2**-10 if dtype == torch.float16 else 2 * 2**-7) + 1e-6
    assert bool((diff <= ulp).all()), float((diff / ulp).max())
    assert float((got_y != want_y).float().mean()) < 0.01


def test_graph_replay_equals_eager():
    _cuda()
    x, h, w = _inputs((4, 1, 4096), torch.float16, seed=3)
    eager = norm_kernel.add_rms_norm(x, h, w, 1e-5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        norm_kernel.add_rms_norm(x, h, w, 1e-5)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = norm_kernel.add_rms_norm(x, h, w, 1e-5)
    x.copy_(torch.randn_like(x))  # new inputs in the captured buffers
    g.replay()
    want = norm_kernel.add_rms_norm(x, h, w, 1e-5)
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert not torch.equal(out[1], eager[1])


def test_model_ops_route():
    cuda_with_kernels()
    ops = model_ops.ModelOps(compile=True)
    x, h, w = _inputs((2, 1, 576), torch.float16, seed=5)
    got = ops.add_rms_norm(x, h, w, 1e-5)
    want = norm_kernel.add_rms_norm(x, h, w, 1e-5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    perm = torch.randperm(576, device="cuda")
    s, y = ops.add_rms_norm(x, h, w, 1e-5, perm)  # permuted: the CUDA kernel
    ws, wy = torch.ops.zephyr.add_rms_norm_permuted(x, h, w, 1e-5, perm)
    assert torch.equal(s, ws) and torch.equal(y, wy)
    ws, wy = model_ops.add_rms_norm(x, h, w, 1e-5, perm)
    assert torch.equal(s, ws)
    assert float((y.float() - wy.float()).abs().max()) <= 2 * 2**-10 * float(wy.float().abs().max())
    odd = torch.randperm(572, device="cuda")  # 572 is no multiple of 8: the compiled version serves it
    xo, ho, wo = _inputs((1, 1, 572), torch.float16, seed=6)
    assert torch.equal(ops.add_rms_norm(xo, ho, wo, 1e-5, odd)[0], model_ops.add_rms_norm(xo, ho, wo, 1e-5, odd)[0])
    assert not norm_kernel.available(x.float(), w.float())  # fp32: the compiled version serves it
    assert not norm_kernel.available(x, w[:100])  # a weight that does not fit the rows
    assert not norm_kernel.available(x[:0], w)  # no rows


def _ulps_ok(got, want, dtype):
    diff = (got.float() - want.float()).abs()
    ulp = want.float().abs() * (2 * 2**-10 if dtype == torch.float16 else 2 * 2**-7) + 1e-6
    return bool((diff <= ulp).all()) and float((got != want).float().mean()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (8, 1, 4096), (3, 1, 576), (2, 5, 960), (1, 1, 16384), (1, 1, 8)])
def test_permuted_kernel_matches_plain_add_rms_norm(dtype, shape):
    from zephyr_plugins.kernel_ops import add_rms_norm_permuted

    cuda_with_kernels()
    x, h, w = _inputs(shape, dtype, seed=shape[-1] + 3 * shape[0])
    perm = torch.randperm(shape[-1], device="cuda", generator=torch.Generator(device="cuda").manual_seed(shape[-1]))
    want_s, want_y = model_ops.add_rms_norm(x, h, w, 1e-5, perm)
    poison_allocator()
    got_s, got_y = add_rms_norm_permuted(x, h, w, 1e-5, perm)
    torch.cuda.synchronize()
    assert got_s.shape == x.shape and got_y.shape == x.shape and got_y.dtype == dtype
    assert torch.equal(got_s, want_s)
    assert _ulps_ok(got_y, want_y, dtype)
    # the permutation really is applied: the identity gives the unpermuted row
    ident = torch.arange(shape[-1], device="cuda")
    assert _ulps_ok(add_rms_norm_permuted(x, h, w, 1e-5, ident)[1], model_ops.add_rms_norm(x, h, w, 1e-5)[1], dtype)


def test_permuted_kernel_graph_opcheck_and_refusals():
    from zephyr_plugins.kernel_ops import add_rms_norm_permuted

    cuda_with_kernels()
    x, h, w = _inputs((4, 1, 4096), torch.float16, seed=9)
    perm = torch.randperm(4096, device="cuda")
    eager = add_rms_norm_permuted(x, h, w, 1e-5, perm)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        add_rms_norm_permuted(x, h, w, 1e-5, perm)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = add_rms_norm_permuted(x, h, w, 1e-5, perm)
    x.copy_(torch.randn_like(x))
    g.replay()
    want = add_rms_norm_permuted(x, h, w, 1e-5, perm)
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1]) and not torch.equal(out[1], eager[1])
    torch.library.opcheck(torch.ops.zephyr.add_rms_norm_permuted.default, (x[:2], h[:2], w, 1e-5, perm))
    for words, args in {
        "multiples of 8": (x[..., :100].contiguous(), h[..., :100].contiguous(), w[:100], perm[:100]),
        "int64": (x, h, w, perm.int()),
        "one shape": (x, h[:2], w, perm),
        "aligned": (x.view(-1)[4:4100].view(1, 1, 4096), h[:1], w, perm),
    }.items():
        with pytest.raises(ValueError, match=words):
            add_rms_norm_permuted(*args[:3], 1e-5, args[3])
