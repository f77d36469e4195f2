"""GPU tests of the CUDA backend (``-m gpu``; skipped cleanly without CUDA).

Every op against the fp32 reference on fresh random data, with the caching
allocator's memory poisoned with NaN before each call (so any output element
or split-K partial the kernel forgets to write shows up), at the Mistral-7B
shapes and awkward ones, for the six seed layouts with and without act-order,
symmetric and asymmetric, fp16 and bf16; ``torch.library.opcheck``; CUDA-graph
capture and replay.

Tolerances (relative mean error vs fp32, measured on an H100 80GB HBM3):
fp16 <= 1e-3, bf16 <= 1e-2.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_helpers import TOL, cuda_with_kernels, poison_allocator  # noqa: E402
from zk_random import random_gptq_layer  # noqa: E402

from zephyr_plugins.config import GPTQConfig  # noqa: E402
from zephyr_plugins.quant_linear import QuantLinear  # noqa: E402
from zephyr_plugins.reference import dequantize  # noqa: E402

pytestmark = pytest.mark.gpu

MISTRAL = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
AWKWARD = [(576, 1536), (704, 200)]  # g128: partial last group; N not a multiple of 64
ALL_M = [1, 2, 3, 5, 7, 8, 16, 17, 33, 64, 128, 257, 1024]
# (bits, group_size, act_order): the six seed layouts, then their in-order twins.
SEED = [(4, 128, True), (4, 32, True), (4, 64, True), (8, -1, True), (8, 128, True), (8, 32, True)]
LAYOUTS = SEED + [(b, g, False) for b, g, _ in SEED]


@functools.lru_cache(maxsize=8)
def _layer(k, n, bits, gs, act, sym, dtype, seed=0):
    """A prepared QuantLinear on the GPU plus its fp32 dequantized weight."""
    dev = cuda_with_kernels()
    t = random_gptq_layer(k, n, bits, gs, act, sym, seed=seed, device=dev)
    cfg = GPTQConfig(bits=bits, group_size=gs, desc_act=act, sym=sym)
    layer = QuantLinear(k, n, cfg, device=dev)
    layer.load_checkpoint_tensors(**t)
    kernel = layer.prepare(dtype, backend="cuda")
    assert kernel.name == "cuda"
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, cfg.zero_offset)
    return layer, w, t


def _check(layer, w, m, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(1000 + seed + m)
    x = torch.randn(m, layer.in_features, generator=gen, device="cuda").to(dtype)
    poison_allocator()
    y = layer(x)
    ref = x.float() @ w
    assert y.dtype == dtype and y.shape == (m, layer.out_features)
    assert torch.isfinite(y).all(), "output has NaN/inf (unwritten elements?)"
    err = ((y.float() - ref).abs().mean() / ref.abs().mean()).item()
    assert err <= TOL[dtype], f"relative mean error {err:.2e} > {TOL[dtype]:.0e}"
    return err


@pytest.mark.parametrize("m", ALL_M)
@pytest.mark.parametrize("k,n", MISTRAL + AWKWARD[:1])
def test_main_layout_full_grid(k, n, m):
    """4-bit g128 act-order (the seed's main branch), fp16: every M at every shape."""
    layer, w, _ = _layer(k, n, 4, 128, True, True, torch.float16)
    _check(layer, w, m, torch.float16)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096)])
def test_fused_limit_rows(bits, k, n):
    """The layer at the largest M its fused path serves (on Hopper the WS limit, ws_max_m: 640 rows
    for Mistral's qkv and 1024 for o on a 132-SM card; else FUSED_MAX_M) and one row past it
    (dequantize + cuBLAS)."""
    from zephyr_plugins.backends import cuda as cuda_backend

    layer, w, _ = _layer(k, n, bits, 128, True, False, torch.float16)
    limit = layer._kernel._fused_max_m
    if _wgmma_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert limit == cuda_backend.ws_max_m(bits, n, sms)
        if sms == 132 and not os.environ.get("ZEPHYR_CUDA_FUSED_MAX_M_WS" + ("_8BIT" if bits == 8 else "")):
            assert limit == {6144: 640, 4096: 1024}[n]
    else:
        assert limit == cuda_backend.FUSED_MAX_M
    for m in (limit, limit + 1):
        _check(layer, w, m, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_layouts(bits, gs, act, sym, dtype):
    """Every layout, sym/asym, fp16/bf16, at a Mistral shape and the awkward ones."""
    cases = [((4096, 4096), [1, 16, 33, 257]), (AWKWARD[0], [3, 17, 64]), (AWKWARD[1], [2, 128])]
    for (k, n), ms in cases:
        layer, w, _ = _layer(k, n, bits, gs, act, sym, dtype)
        for m in ms:
            _check(layer, w, m, dtype)


@pytest.mark.parametrize("k,n", [(4096, 6144), AWKWARD[0]])
@pytest.mark.parametrize("bits,gs", [(4, 128), (8, 128), (4, 32)])
def test_forward_permuted_equals_forward(k, n, bits, gs):
    """An act-order layer fed x already in its row order (input_permutation) gives forward(x) bit for bit."""
    layer, _, _ = _layer(k, n, bits, gs, True, True, torch.float16)
    perm = layer.input_permutation()
    assert perm is not None and perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(k))
    gen = torch.Generator(device="cuda").manual_seed(7)
    for m in (1, 16, 40, 100, 200):  # GEMV, GEMV, tiled kernel (32 / 64-row tiles), dequantize + cuBLAS
        x = torch.randn(m, k, generator=gen, device="cuda").half()
        assert torch.equal(layer.forward_permuted(x[:, perm].contiguous()), layer(x)), m
    in_order, _, _ = _layer(k, n, bits, gs, False, True, torch.float16)
    assert in_order.input_permutation() is None  # nothing to fold without act-order
    one_group, _, _ = _layer(k, n, 8, -1, True, True, torch.float16)
    assert one_group.input_permutation() is None  # act-order with one group reads x in order


@pytest.mark.parametrize("bits,gs,act", SEED[:1] + SEED[3:4] + [(4, 128, False)])
def test_unrepack_on_gpu(bits, gs, act):
    from zephyr_plugins.backends.cuda import unrepack_layer

    layer, _, t = _layer(4096, 6144, bits, gs, act, False, torch.float16)
    back = unrepack_layer(layer, layer._kernel.spec)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], t[key]), key


def test_opcheck():
    from zephyr_plugins.kernel_ops import gptq_dequantize  # noqa: F401 - schemas

    layer, _, t = _layer(576, 1536, 4, 128, True, False, torch.float16)
    x = torch.randn(5, 576, device="cuda", dtype=torch.float16)
    args = (x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks, 4, 128, 1536)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemm_repacked.default, args)
    dargs = (t["qweight"], t["qzeros"], t["scales"].half(), t["g_idx"], 4, 1)
    torch.library.opcheck(torch.ops.zephyr.gptq_dequantize.default, dargs)
    zk = (layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm)
    torch.library.opcheck(torch.ops.zephyr.gptq_dequantize_repacked.default, (*zk, 4, 128))
    big = torch.randn(100, 576, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.zephyr.gptq_linear.default, (big, *args[1:], 32, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_dequantize_repacked_equals_reference(bits, gs, act, sym, dtype):
    """The zk-layout dequantize kernel (the large-M path) equals the pure-torch reference bit for bit."""
    from zephyr_plugins.repack import dequantize_repacked_reference

    for k, n in [(4096, 6144), AWKWARD[0], AWKWARD[1]]:
        layer, _, _ = _layer(k, n, bits, gs, act, sym, dtype)
        zk = (layer._zk_qweight, layer._zk_scales, layer._zk_zeros)
        for perm in (layer._zk_perm, layer._zk_no_perm):  # checkpoint row order, repacked order
            poison_allocator()
            got = torch.ops.zephyr.gptq_dequantize_repacked(*zk, perm, bits, gs)
            want = dequantize_repacked_reference(*zk, bits, gs, perm).to(dtype)
            assert torch.equal(got, want), (k, n, perm.numel())


@pytest.mark.parametrize("m", [1, 8, 16, 48, 100, 300])
def test_cuda_graph_replay(m):
    layer, w, _ = _layer(4096, 4096, 4, 128, True, True, torch.float16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    eager = layer(x).clone()
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer(static_x)  # warm-up on the side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = layer(static_x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, layer(x2))


def _gemv(layer, x, block_warps=0, splits=0):
    from zephyr_plugins.kernel_ops import gptq_gemv_repacked

    spec = layer._kernel.spec
    return gptq_gemv_repacked(
        x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks,
        spec.bits, spec.group_size, spec.out_features, block_warps, splits,
    )  # fmt: skip


def _check_out(y, x, w, dtype):
    ref = x.float() @ w
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[1])
    assert torch.isfinite(y).all(), "output has NaN/inf (unwritten elements?)"
    err = ((y.float() - ref).abs().mean() / ref.abs().mean()).item()
    assert err <= TOL[dtype], f"relative mean error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_gemv_every_m(bits, gs, act, sym, dtype):
    """The GEMV op itself, M = 1..8 and 9..32 (2 and 4 x tiles), every layout, poisoned outputs and workspaces."""
    for k, n in [(4096, 4096)] + AWKWARD:
        layer, w, _ = _layer(k, n, bits, gs, act, sym, dtype)
        for m in list(range(1, 9)) + [9, 13, 16, 17, 24, 31, 32]:
            gen = torch.Generator(device="cuda").manual_seed(2000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            poison_allocator()
            _check_out(_gemv(layer, x), x, w, dtype)


@pytest.mark.parametrize("bits,gs,act", [(4, 128, True), (8, 32, True), (4, 64, False), (8, -1, True)])
def test_gemv_forced_plans(bits, gs, act):
    """Every launch plan (warps per block x splits, uneven last slices included) gives the same answer."""
    for k, n in [(14336, 4096), (704, 200)]:
        layer, w, _ = _layer(k, n, bits, gs, act, False, torch.float16)
        for m in (5, 12, 29):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            planned = _gemv(layer, x)
            _check_out(planned, x, w, torch.float16)
            for bw in (4, 8, 16) if m <= 8 else (4, 8):  # 16-warp blocks serve one x tile (M <= 8) only
                for sp in (1, 2, 3, 7, 64):
                    poison_allocator()
                    y = _gemv(layer, x, bw, sp)
                    _check_out(y, x, w, torch.float16)
                    _assert_same_sums(y, planned)


def _assert_same_sums(y, planned):
    """Two plans of one op: the same column sums in another order, so equal up to fp32 rounding of the
    partial sums, which grows with their size: the tolerance scales with the output's mean magnitude
    (a fixed 2e-3 failed once in ~10 runs: 8-bit g-1 asym, K = 14336, one element of 532,480 off by
    2.2e-3). A missing or doubled slice moves elements by a sizeable fraction of that magnitude."""
    scale = planned.float().abs().mean().item()
    torch.testing.assert_close(y, planned, rtol=2e-3, atol=2e-3 * max(scale, 1.0))


def _tiled(layer, x, splits=0, kernel=2):
    from zephyr_plugins.kernel_ops import gptq_gemm_repacked

    spec = layer._kernel.spec
    return gptq_gemm_repacked(
        x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks,
        spec.bits, spec.group_size, spec.out_features, kernel, splits,
    )  # fmt: skip


def _wgmma_available() -> bool:
    """The tiled kernel's wgmma variant (kernel=3) runs here: an sm_90 card and a build with sm_90a."""
    from zephyr_plugins.kernel_build import wgmma_available

    cuda_with_kernels()
    return wgmma_available()


# The tiled kernel on mma.sync (2), its wgmma variant (3) and its warp-specialized wgmma variant (4;
# both skipped where unavailable).
TILED = [pytest.param(2, id="mma"), pytest.param(3, id="wgmma"), pytest.param(4, id="ws")]


def _need(kernel):
    if kernel >= 3 and not _wgmma_available():
        pytest.skip("the wgmma kernel needs an sm_90 card and an sm_90a build")


@pytest.mark.parametrize("kernel", TILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_tiled_every_layout(bits, gs, act, sym, dtype, kernel):
    """The tiled kernel itself (1, 2 and 4 m16 tiles per row tile, partial row tiles, several row tiles,
    a partial last column group), every layout, poisoned outputs and workspaces."""
    _need(kernel)
    for k, n in [(4096, 4096)] + AWKWARD:
        layer, w, _ = _layer(k, n, bits, gs, act, sym, dtype)
        for m in (1, 16, 17, 33, 64, 65, 100, 128, 257):
            gen = torch.Generator(device="cuda").manual_seed(3000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            poison_allocator()
            _check_out(_tiled(layer, x, kernel=kernel), x, w, dtype)


@pytest.mark.parametrize("kernel", TILED)
@pytest.mark.parametrize("bits,gs,act", [(4, 128, True), (8, 32, True), (4, 64, False), (8, -1, True)])
def test_tiled_forced_splits(bits, gs, act, kernel):
    """Every split along K (uneven last slices included) gives the same answer as the planned one."""
    _need(kernel)
    for k, n in [(14336, 4096), (704, 200)]:
        layer, w, _ = _layer(k, n, bits, gs, act, False, torch.float16)
        for m in (40, 64, 130):
            gen = torch.Generator(device="cuda").manual_seed(5000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").half()
            planned = _tiled(layer, x, kernel=kernel)
            _check_out(planned, x, w, torch.float16)
            for sp in (1, 2, 3, 4, 7, 8, 64):
                poison_allocator()
                y = _tiled(layer, x, sp, kernel)
                _check_out(y, x, w, torch.float16)
                _assert_same_sums(y, planned)


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_dispatch_at_m32(bits):
    """M = 16-32 in a layer: the GEMV kernel up to the backend's gemv_max_m for the layer (24 rows for
    4-bit, 32 for 8-bit; 16 for layers above GEMV_LARGE_LAYER weights where the WS kernel runs), the
    tiled kernel above, for a small and a large layer."""
    from zephyr_plugins.backends import cuda as cb
    from zephyr_plugins.kernel_build import wgmma_available

    for k, n in ((4096, 4096), (4096, 17408)):
        layer, w, _ = _layer(k, n, bits, 128, True, True, torch.float16)
        limit = cb.gemv_max_m(bits, k, n, wgmma_available())
        gen = torch.Generator(device="cuda").manual_seed(6000 + bits)
        for m in (16, 17, 24, 25, 32):
            x = torch.randn(m, k, generator=gen, device="cuda").half()
            gemv, tiled = _gemv(layer, x), _tiled(layer, x, kernel=0)
            assert not torch.equal(gemv, tiled)  # they sum in different orders, which tells the paths apart
            assert torch.equal(layer(x), gemv if m <= limit else tiled), (k, n, m, limit)


@pytest.mark.parametrize("kernel", TILED)
def test_tiled_opcheck(kernel):
    _need(kernel)
    layer, _, _ = _layer(576, 1536, 4, 128, True, False, torch.float16)
    for m in (40, 130):
        x = torch.randn(m, 576, device="cuda", dtype=torch.float16)
        args = (x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks, 4, 128,
                1536, kernel, 0)  # fmt: skip
        torch.library.opcheck(torch.ops.zephyr.gptq_gemm_repacked.default, args)


@pytest.mark.parametrize("kernel", [3, 4])
def test_wgmma_refused_where_unavailable(kernel):
    """kernel=3 or 4 on a card or build without wgmma: a clear error, not a crash."""
    if _wgmma_available():
        pytest.skip("wgmma is available here")
    layer, _, _ = _layer(576, 1536, 4, 128, True, False, torch.float16)
    with pytest.raises(RuntimeError, match="wgmma"):
        _tiled(layer, torch.randn(40, 576, device="cuda", dtype=torch.float16), kernel=kernel)


def test_gemv_opcheck_and_rejects_large_m():
    layer, _, _ = _layer(576, 1536, 4, 128, True, False, torch.float16)
    x = torch.randn(3, 576, device="cuda", dtype=torch.float16)
    args = (x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks, 4, 128, 1536)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemv_repacked.default, args)
    x = torch.randn(20, 576, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemv_repacked.default, (x,) + args[1:])
    with pytest.raises(ValueError, match="M <= 32"):
        _gemv(layer, torch.randn(33, 576, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="16 warps only for M <= 8"):
        _gemv(layer, torch.randn(9, 576, device="cuda", dtype=torch.float16), 16, 1)


def _assert_graph_replays_eagerly(op, static_x, w):
    """`op(static_x)` captured in a CUDA graph (after a warm-up on a side stream, as torch.cuda.graphs
    recommends): replays give the eager result bit for bit, then again twice over new inputs, each
    also checked against the reference x @ w."""
    eager = op(static_x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = op(static_x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, op(static_x))
        _check_out(static_y, static_x, w, static_x.dtype)


@pytest.mark.parametrize("kernel", TILED)
def test_tiled_graph_replay_split(kernel):
    """The tiled kernels in a CUDA graph on split plans (partials + self-resetting locks): bit for bit
    with eager calls, replayed over new inputs."""
    _need(kernel)
    layer, w, _ = _layer(14336, 4096, 4, 128, True, False, torch.float16)
    static_x = torch.randn(70, 14336, device="cuda", dtype=torch.float16)
    _assert_graph_replays_eagerly(lambda x: _tiled(layer, x, 5, kernel), static_x, w)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 32])
def test_gemv_graph_replay_split(m):
    """Graph replay on a split plan (partials + self-resetting locks), bit for bit, twice over new inputs."""
    layer, w, _ = _layer(14336, 4096, 8, 128, True, False, torch.float16)
    static_x = torch.randn(m, 14336, device="cuda", dtype=torch.float16)
    bw = 16 if m <= 8 else (8 if m <= 16 else 4)
    _assert_graph_replays_eagerly(lambda x: _gemv(layer, x, bw, 7), static_x, w)


def test_bad_arguments_raise_cleanly():
    """Bad arguments to the kernel wrappers raise ValueError naming the problem, before the extension.

    In a subprocess: a failing check inside the extension itself ended the whole process
    (SIGSEGV) on the H100 image, which is why the wrappers check everything first.
    """
    cuda_with_kernels()
    code = textwrap.dedent(
        """
        import torch
        from zephyr_plugins.kernel_build import ensure_built
        ok, why = ensure_built()
        assert ok, why
        from zephyr_plugins import kernel_ops as ko
        dev = "cuda"
        x = torch.randn(3, 256, device=dev, dtype=torch.float16)
        qweight = torch.zeros(4, 16, 128, dtype=torch.int32, device=dev)  # Np = 256, Kp = 256, 4-bit
        scales = torch.ones(2, 256, dtype=torch.float32, device=dev)  # wrong dtype: must be float16
        empty = torch.empty(0, device=dev, dtype=torch.float16)
        perm = torch.empty(0, dtype=torch.int32, device=dev)
        locks = torch.zeros(4, dtype=torch.int32, device=dev)
        for op in (ko.gptq_gemv_repacked, ko.gptq_gemm_repacked):
            try:
                op(x, qweight, scales, empty, perm, locks, 4, 128, 256)
                print("NO ERROR")
            except ValueError as exc:
                print("RAISED:", exc)
        try:
            ko.gptq_dequantize(torch.zeros(32, 256, dtype=torch.int32, device=dev),
                               torch.zeros(2, 32, dtype=torch.int32, device=dev), scales,
                               torch.zeros(256, dtype=torch.int32, device=dev), 4, 1)
            print("NO ERROR")
        except ValueError as exc:
            print("RAISED:", exc)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("RAISED", "NO ERROR"))]
    assert len(lines) == 3 and all("scales must be" in ln for ln in lines), r.stdout[-2000:]


def test_torch_compile():
    layer, w, _ = _layer(4096, 4096, 8, 128, True, True, torch.float16)
    compiled = torch.compile(lambda t: layer(t), fullgraph=True)
    for m in (4, 12, 48):  # the GEMV kernel (1 and 2 x tiles) and the fused kernel
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert torch.equal(compiled(x), layer(x))


def test_compiled_layer_is_one_op_dispatched_at_run_time():
    """Traced by torch.compile, a layer is one zephyr::gptq_linear call: no branch on M is baked into the
    graph (vLLM traces once, at its largest batch, and does not re-check guards), and the same graph
    gives each M the kernel of that M."""
    layer, _, _ = _layer(4096, 4096, 4, 128, True, True, torch.float16)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda t: layer(t), backend=recording_backend, dynamic=True, fullgraph=True)
    for m in (300, 2, 40):  # traced at 300 (dequantize + cuBLAS); 2 is the GEMV kernel, 40 the fused one
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert torch.equal(compiled(x), layer(x)), m
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("gptq_linear" in t for t in targets), targets
    assert not any("dequantize" in t or "gemv" in t or "matmul" in t for t in targets), targets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_long_8bit_layer(dtype):
    """8-bit gate_up-sized layer: the shape that takes the prefetching kernel variant."""
    layer, w, _ = _layer(4096, 28672, 8, 128, True, False, dtype)
    for m in (1, 7, 8, 16):
        _check(layer, w, m, dtype)


def test_forced_prefetch_variant_in_subprocess():
    """ZEPHYR_CUDA_PREFETCH=1 (read once per process) on the awkward and Mistral shapes."""
    import os
    import subprocess

    cuda_with_kernels()
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import test_kernels_gpu as t
for k, n in [(576, 1536), (704, 200), (14336, 4096)]:
    for bits, gs, act in [(4, 128, True), (8, 32, True), (4, 64, False)]:
        layer, w, _ = t._layer(k, n, bits, gs, act, False, torch.bfloat16)
        for m in (1, 5, 16):
            t._check(layer, w, m, torch.bfloat16)
print("ok")
"""
    env = {**os.environ, "ZEPHYR_CUDA_PREFETCH": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


_GX_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_kernels_gpu as t
outs = {{}}
for k, n in [(4096, 4096), (14336, 4096), (704, 200)]:
    for bits, gs, act, sym, dtype in [(4, 128, True, True, torch.float16), (8, 128, True, False, torch.float16),
                                      (4, 32, True, False, torch.bfloat16), (8, -1, True, True, torch.bfloat16),
                                      (4, 64, False, True, torch.float16)]:
        layer, w, _ = t._layer(k, n, bits, gs, act, sym, dtype)
        for m in (1, 2, 3, 5, 8, 9):
            gen = torch.Generator(device="cuda").manual_seed(7000 + m)
            buf = torch.randn(m * k + 1, generator=gen, device="cuda").to(dtype)
            for name, x in (("aligned", buf[:-1].view(m, k)), ("misaligned", buf[1:].view(m, k))):
                for bw, sp in ((0, 0), (4, 3), (8, 1), (16, 2)):
                    if bw == 16 and m > 8:
                        continue
                    t.poison_allocator()
                    y = t._gemv(layer, x, bw, sp)
                    t._check_out(y, x, w, dtype)
                    outs[(k, n, bits, gs, act, m, name, bw, sp)] = y.cpu()
torch.save(outs, sys.argv[1])
print("ok", len(outs))
"""


def test_gemv_gather_in_kernel_equals_gather_kernel(tmp_path):
    """x staged by the GEMV kernel itself (GX: act-order, in order, K not a multiple of 128, misaligned x)
    gives bit for bit what the kernel gives on x read in place or on a copy gathered by gather_pad_kernel:
    the same x values meet the same weights in the same order. ZEPHYR_GEMV_GX_MAX_M and
    ZEPHYR_GEMV_GX_INORDER_MAX_M (read once per process): 0 turns GX off, 8 puts M <= 8 on it (the
    defaults, for 4-bit weights only: act-order M = 1, in order M <= 4); every plan, both dtypes, poisoned workspaces."""
    import os

    cuda_with_kernels()
    code = _GX_CODE.format(here=str(Path(__file__).resolve().parent))
    results = {}
    for gx in ("0", "8"):
        path = tmp_path / f"gx{gx}.pt"
        env = {**os.environ, "ZEPHYR_GEMV_GX_MAX_M": gx, "ZEPHYR_GEMV_GX_INORDER_MAX_M": gx}
        res = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
        results[gx] = torch.load(path)
    assert results["0"].keys() == results["8"].keys() and len(results["0"]) > 100
    for key, y in results["0"].items():
        assert torch.equal(y, results["8"][key]), f"GX and gathered x differ at {key}"


_WS_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_kernels_gpu as t
n_checked = 0
for k, n in [(4096, 4096), (14336, 4096), (704, 200)]:
    for bits, gs, act, sym, dtype in [(4, 128, True, True, torch.float16), (8, 128, True, False, torch.float16),
                                      (4, 32, True, False, torch.bfloat16), (8, -1, True, True, torch.bfloat16),
                                      (4, 64, False, True, torch.float16)]:
        layer, w, _ = t._layer(k, n, bits, gs, act, sym, dtype)
        for m in (1, 17, 33, 64, 65, 129, 200, 257):
            gen = torch.Generator(device="cuda").manual_seed(8000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            t.poison_allocator()
            planned = t._tiled(layer, x, 0, 4)
            t._check_out(planned, x, w, dtype)
            for sp in (2, 4, 7, 8):
                t.poison_allocator()
                y = t._tiled(layer, x, sp, 4)
                t._check_out(y, x, w, dtype)
                if dtype == torch.float16:  # bf16 rounding of the same sums in another order moves ~2^-8
                    t._assert_same_sums(y, planned)
            n_checked += 3
print("ok", n_checked)
"""


def test_ws_every_row_tile():
    """The WS kernel (kernel=4) on each of its row tiles, forced through ZEPHYR_TILED_MT and ZEPHYR_WS_WGS
    (read once per process): 32 and 64 rows with one MMA warpgroup (32 rows: 2 blocks per SM) or two
    splitting the columns, and 128 rows (8: always two), with splits along K, partial row tiles and a
    partial last column group, both dtypes, 4 and 8 bits."""
    import os

    _need(4)
    code = _WS_CODE.format(here=str(Path(__file__).resolve().parent))
    for mt, wgs in (("2", "1"), ("4", "1"), ("8", "2"), ("2", "2"), ("4", "2")):
        env = {**os.environ, "ZEPHYR_TILED_MT": mt, "ZEPHYR_WS_WGS": wgs}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        why = f"ZEPHYR_TILED_MT={mt} ZEPHYR_WS_WGS={wgs}: " + res.stderr[-6000:]
        assert res.returncode == 0 and "ok" in res.stdout, why


_WS_SUM_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_kernels_gpu as t
outs, allocs = [], []
for k, n, bits, gs, act, sym, dtype in [(4096, 4096, 4, 128, True, True, torch.float16),
                                        (14336, 4096, 8, 128, True, False, torch.bfloat16),
                                        (704, 200, 4, 32, True, False, torch.float16)]:
    layer, w, _ = t._layer(k, n, bits, gs, act, sym, dtype)
    for m in (40, 130, 257):
        gen = torch.Generator(device="cuda").manual_seed(9000 + m)
        x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
        for sp in (2, 4, 8):
            t.poison_allocator()
            a0 = torch.cuda.memory_stats()["allocation.all.allocated"]
            y = t._tiled(layer, x, sp, 4)
            allocs.append(torch.cuda.memory_stats()["allocation.all.allocated"] - a0)
            t._check_out(y, x, w, dtype)
            outs.append(y.cpu())
torch.save((outs, allocs), {path!r})
print("ok", len(outs))
"""


def test_ws_cluster_sum_same_bits(tmp_path):
    """WS splits of 2, 4 and 8 sum the slices through the shared memory of the tile's thread-block cluster;
    with ZEPHYR_WS_CLUSTER_SUM=0 (read once per process) through partials in global memory. Both add the
    slices in the same order, so the outputs are the same bits (64- and 128-row tiles, both dtypes). The
    cluster sum allocates no partials: each call's allocation count shows which path ran, so the test
    fails if the clusters are never used (splits of 2 always fit at once here)."""
    import os

    _need(4)
    outs, allocs = {}, {}
    for flag in ("1", "0"):
        path = tmp_path / f"ws_sum_{flag}.pt"
        code = _WS_SUM_CODE.format(here=str(Path(__file__).resolve().parent), path=str(path))
        env = {**os.environ, "ZEPHYR_WS_CLUSTER_SUM": flag}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and "ok" in res.stdout, f"ZEPHYR_WS_CLUSTER_SUM={flag}: " + res.stderr[-6000:]
        outs[flag], allocs[flag] = torch.load(path)
    assert len(outs["1"]) == len(outs["0"]) == 27
    for i, (a, b) in enumerate(zip(outs["1"], outs["0"])):
        assert torch.equal(a, b), i
    # Calls in (layer, m, split) order; split 2 is every third, from the first.
    assert all(c <= p for c, p in zip(allocs["1"], allocs["0"])), allocs
    assert all(c < p for c, p in zip(allocs["1"][::3], allocs["0"][::3])), allocs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_ws_gather_paths(dtype):
    """The WS kernel's x tiles come through shared memory (gather_tiles_smem_kernel: x 16-byte aligned,
    K % 8 == 0; up to 8 rows per block, 4 at K = 14336) or else one unit per thread
    (gather_tiles_kernel): an x one element off alignment and an 8-bit layer with K % 8 != 0 take the
    second, and give the reference's answer, and the same bits as the first on the same values."""
    _need(4)
    for bits, gs, act, k, n in [(4, 128, True, 4096, 4096), (8, 128, True, 14336, 4096), (4, 64, False, 576, 1536),
                                (8, -1, True, 708, 200)]:
        layer, w, _ = _layer(k, n, bits, gs, act, False, dtype)
        for m in (40, 130):
            gen = torch.Generator(device="cuda").manual_seed(7000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            shifted = torch.empty(m * k + 1, device="cuda", dtype=dtype)[1:].view(m, k)
            shifted.copy_(x)
            assert shifted.data_ptr() % 16 != 0
            poison_allocator()
            y = _tiled(layer, x, kernel=4)
            _check_out(y, x, w, dtype)
            poison_allocator()
            assert torch.equal(_tiled(layer, shifted, kernel=4), y), (bits, gs, act, k, n, m)


def test_prepared_layer_holds_one_copy_and_saves_the_checkpoint():
    """On the GPU the prepared layer frees the checkpoint's qweight and rebuilds it bit for bit on demand."""
    dev = cuda_with_kernels()
    t = random_gptq_layer(4096, 6144, 4, 128, True, False, seed=21, device=dev)
    layer = QuantLinear(4096, 6144, GPTQConfig(bits=4, group_size=128, desc_act=True, sym=False), device=dev)
    layer.load_checkpoint_tensors(**{k: v.clone() for k, v in t.items()})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer.prepare(torch.float16, backend="cuda")
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert not layer.holds_qweight
    assert grown < 0.1 * t["qweight"].numel() * 4, grown  # the repacked copy replaced the checkpoint's
    sd = layer.state_dict()
    assert list(sd) == ["qweight", "qzeros", "scales", "g_idx"]
    for key in sd:
        assert torch.equal(sd[key], t[key]), key
    x = torch.randn(300, 4096, device=dev, dtype=torch.float16)
    y = layer(x)
    layer.to("cpu")
    assert layer.holds_qweight and torch.equal(layer.qweight, t["qweight"].cpu())
    layer.to(dev)
    assert torch.equal(layer(x), y) and not layer.holds_qweight
