"""``zephyr::gptq_gemv_swiglu``: the SwiGLU of a fused gate/up projection in the GEMV kernel's epilogue.

Checked against the unfused GEMV on the same launch plan (same column sums, so the only difference is
the activation's fp32 arithmetic, rounded once), against the fp32 product of the dequantized weight on
the planned launch, with scattered output columns, with x already in the layer's row order, inside a
CUDA graph (the split's semaphores reset themselves), and in the runtime's decode steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_helpers import TOL, poison_allocator  # noqa: E402
from test_kernels_gpu import _gemv, _layer  # noqa: E402 - pytest puts tests/gpu on sys.path

pytestmark = pytest.mark.gpu

# (bits, group_size, act_order): g128 act-order and in order, a small group, one group.
LAYOUTS = [(4, 128, True), (4, 128, False), (4, 32, True), (8, 128, True), (8, -1, False)]
# Mistral's gate/up (F = 14336) and a small layer with a partial last group (K = 576, F = 768).
SHAPES = [(4096, 28672), (576, 1536)]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _swiglu(layer, x, out_index=None, block_warps=0, splits=0, perm=None):
    from zephyr_plugins.kernel_ops import gptq_gemv_swiglu

    spec = layer._kernel.spec
    return gptq_gemv_swiglu(
        x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm if perm is None else perm,
        layer._zk_locks, spec.bits, spec.group_size, spec.out_features, out_index, block_warps, splits,
    )  # fmt: skip


def _act(y, f):
    """silu(gate) * up of a [M, 2F] product, in fp32, rounded once."""
    return (F.silu(y[:, :f].float()) * y[:, f:].float()).to(y.dtype)


def _assert_one_rounding(got, want):
    """Equal up to one rounding of the output type (the activation's fp32 arithmetic may differ in its
    last bit from torch's, which moves a result across a rounding boundary now and then)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all(), "output has NaN/inf (unwritten elements?)"
    tol = ULP[want.dtype] * want.float().abs() + 1e-6
    bad = ((got.float() - want.float()).abs() > tol).sum().item()
    assert bad == 0, f"{bad} of {want.numel()} elements differ by more than one rounding"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_swiglu_equals_unfused_on_the_same_plan(bits, gs, act, sym, dtype):
    """Each half of a block sums its columns as an unfused launch of half the warps does: forced plans
    (8 and 16 warps, unsplit and split along K, uneven last slices) give silu(gate) * up of that launch's
    output, for one and two x tiles."""
    for k, n in SHAPES:
        layer, _, _ = _layer(k, n, bits, gs, act, sym, dtype)
        for m in (1, 3, 8, 9, 16):
            gen = torch.Generator(device="cuda").manual_seed(3000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            for bw in (8, 16) if m <= 8 else (8,):
                for sp in (1, 2, 3, 7):
                    poison_allocator()
                    got = _swiglu(layer, x, block_warps=bw, splits=sp)
                    want = _act(_gemv(layer, x, bw // 2, sp), n // 2)
                    _assert_one_rounding(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=[f"u{b}g{g}{'act' if a else ''}" for b, g, a in LAYOUTS])
def test_swiglu_planned_against_fp32(bits, gs, act, dtype):
    """The planned launch against silu(gate) * up of the fp32 product with the dequantized weight."""
    for k, n in SHAPES:
        layer, w, _ = _layer(k, n, bits, gs, act, False, dtype)
        f = n // 2
        for m in (1, 2, 4, 5, 8, 12, 16):
            gen = torch.Generator(device="cuda").manual_seed(4000 + m)
            x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
            poison_allocator()
            got = _swiglu(layer, x)
            y = x.float() @ w
            ref = F.silu(y[:, :f]) * y[:, f:]
            assert got.shape == (m, f) and torch.isfinite(got).all()
            err = ((got.float() - ref).abs().mean() / ref.abs().mean()).item()
            assert err <= 2 * TOL[dtype], f"M={m}: relative mean error {err:.2e}"


def test_swiglu_scatter_and_permuted_input():
    """``out_index`` scatters output columns (down's row order); x given in the layer's own row order
    (permuted by its producer) gives the same bits as x in the checkpoint's order."""
    layer, _, _ = _layer(4096, 28672, 4, 128, True, True, torch.float16)
    perm = layer.input_permutation()
    f = 14336
    idx = torch.randperm(f, generator=torch.Generator().manual_seed(5)).cuda()
    for m in (1, 4, 7, 16):  # GX (x staged by the kernel) at the fewest rows, the gather kernel above
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        plain = _swiglu(layer, x)
        scattered = torch.empty_like(plain)
        scattered[:, idx] = plain
        poison_allocator()
        assert torch.equal(_swiglu(layer, x, out_index=idx), scattered), m
        xp = x[:, perm].contiguous()
        assert torch.equal(layer.forward_swiglu(xp, permuted=True), plain), m
        assert torch.equal(layer.forward_swiglu(x), plain), m
        assert torch.equal(layer.forward_swiglu(xp, permuted=True, out_index=idx), scattered), m


def test_swiglu_where_not_served():
    """The backend says None (the caller runs the layer and silu_mul) above 16 rows and where the halves
    are not whole column blocks; the op itself refuses such arguments with a clear error."""
    layer, _, _ = _layer(4096, 28672, 4, 128, True, True, torch.float16)
    assert layer.forward_swiglu(torch.randn(17, 4096, device="cuda", dtype=torch.float16)) is None
    odd, _, _ = _layer(576, 1536 + 64, 4, 128, True, True, torch.float16)  # F = 800: not whole 64-column blocks
    assert odd.forward_swiglu(torch.randn(1, 576, device="cuda", dtype=torch.float16)) is None
    with pytest.raises(ValueError, match="multiple of 128"):
        _swiglu(odd, torch.randn(1, 576, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="M <= 16"):
        _swiglu(layer, torch.randn(17, 4096, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="out_index"):
        _swiglu(layer, torch.randn(1, 4096, device="cuda", dtype=torch.float16),
                out_index=torch.arange(100, device="cuda"))  # fmt: skip


def test_swiglu_graph_replay_with_split():
    """Captured in a CUDA graph and replayed, split along K (the semaphores reset themselves)."""
    layer, _, _ = _layer(576, 1536, 8, 128, True, False, torch.float16)
    x = torch.randn(3, 576, device="cuda", dtype=torch.float16)
    eager = _swiglu(layer, x, block_warps=8, splits=3).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _swiglu(layer, x, block_warps=8, splits=3)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = _swiglu(layer, x, block_warps=8, splits=3)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def test_opcheck_swiglu():
    layer, _, _ = _layer(576, 1536, 4, 128, True, False, torch.float16)
    x = torch.randn(5, 576, device="cuda", dtype=torch.float16)
    idx = torch.randperm(768, device="cuda")
    args = (x, layer._zk_qweight, layer._zk_scales, layer._zk_zeros, layer._zk_perm, layer._zk_locks, 4, 128, 1536)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemv_swiglu.default, args)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemv_swiglu.default, (*args, idx))


def test_runtime_decode_uses_fused_swiglu(tmp_path, monkeypatch):
    """The runtime's decode steps take the fused SwiGLU (fused gate/up layers, batch <= 16) and match the
    unfused steps (layer, then silu_mul) to rounding; prefill keeps the unfused path."""
    from zephyr_plugins.assets import tiny_mistral, write_rtn_checkpoint
    from zephyr_plugins.config import GPTQConfig
    from zephyr_plugins.model_ops import ModelOps
    from zephyr_plugins.quant_linear import QuantLinear
    from zephyr_plugins.runtime import Zephyr

    folder = write_rtn_checkpoint(tiny_mistral(seed=3), str(tmp_path / "ckpt"), GPTQConfig(bits=4, group_size=128))
    llm = Zephyr.from_pretrained(folder, device="cuda", dtype=torch.float16, max_batch_size=4, max_seq_len=128,
                                 cuda_graphs=False)  # fmt: skip
    assert llm.fused_swiglu and llm.model.ops.fused_swiglu
    served = []
    real = QuantLinear.forward_swiglu

    def spy(self, x, permuted=False, out_index=None):
        out = real(self, x, permuted, out_index)
        served.append((x.reshape(-1, x.shape[-1]).shape[0], out is not None))
        return out

    monkeypatch.setattr(QuantLinear, "forward_swiglu", spy)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32000, (3, 20), generator=g).cuda()
    pad = torch.tensor([0, 2, 5]).cuda()
    llm.model(tokens, 0, pad, kv_len=128)
    assert served and all(not ok for _, ok in served), served  # 60 rows: unfused
    served.clear()
    fused_ops = llm.model.ops
    unfused_ops = ModelOps(fused_ops.compile, fused_ops.fused_decode, fused_ops.permuted_inputs, False)
    for step in range(6):
        nxt = torch.randint(3, 32000, (3, 1), generator=g).cuda()
        llm.model.ops = unfused_ops
        want = llm.model(nxt, 20 + step, pad, kv_len=128).clone()  # writes the cache slot ...
        llm.model.ops = fused_ops
        got = llm.model(nxt, 20 + step, pad, kv_len=128)  # ... which this step rewrites with the same k, v
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 1e-2, (step, rel)
    assert served and all(m == 3 and ok for m, ok in served), served
