"""CPU tests of the CUDA backend's pure-torch parts (no GPU needed).

The repack round trip, the kernel ops' CPU reference implementations against
:mod:`zephyr_plugins.reference` on fresh random data, the fake
implementations, the backend's declarations, and a compile-only check of the
CUDA sources with the local nvcc (skipped when there is none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zk_random import random_gptq_layer  # noqa: E402

from zephyr_plugins import kernel_ops  # noqa: E402
from zephyr_plugins.backends.base import LayerSpec  # noqa: E402
from zephyr_plugins.backends.cuda import CudaGPTQBackend  # noqa: E402
from zephyr_plugins.reference import dequantize, gptq_gemm_reference  # noqa: E402
from zephyr_plugins.repack import padded_sizes, repack, shuffle_qweight, unrepack, unshuffle_qweight  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
# (bits, group_size, act_order): the six seed layouts and in-order twins.
LAYOUTS = [(4, 128, True), (4, 32, True), (4, 64, True), (8, -1, True), (8, 128, True), (8, 32, True), (4, 128, False),
           (8, 32, False)]  # fmt: skip


def _ids(layouts):
    return [f"u{b}g{g}{'act' if a else ''}" for b, g, a in layouts]


@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=_ids(LAYOUTS))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("zero_offset", [1, 0], ids=["v1", "v2"])
def test_repack_round_trip_bit_for_bit(bits, gs, act, sym, zero_offset):
    k, n = 576, 200  # partial last group at g128, N not a multiple of 64
    t = random_gptq_layer(k, n, bits, gs, act, sym, zero_offset=zero_offset, seed=bits * 100 + max(gs, 0))
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, zero_offset, torch.float16)
    kp, np_ = padded_sizes(k, n)
    assert r.qweight.shape == (np_ // 64, kp // 16, 32 * bits) and r.qweight.dtype == torch.int32
    assert (r.zeros.numel() == 0) == sym
    assert (r.perm.numel() == k) == (act and gs != -1)  # one group: any order is in order
    back = unrepack(r, bits, k, n, zero_offset, torch.float16)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert back[key].dtype == t[key].dtype, key
        assert torch.equal(back[key], t[key]), key


@pytest.mark.parametrize("bits", [4, 8])
def test_shuffle_is_a_bijection(bits):
    q = torch.randint(0, 1 << bits, (256, 128), dtype=torch.int32)
    w = shuffle_qweight(q, bits)
    assert torch.equal(unshuffle_qweight(w, bits), q)
    # Every value lands somewhere: the multiset of values is kept.
    assert torch.equal(torch.sort(unshuffle_qweight(w, bits).flatten()).values, torch.sort(q.flatten()).values)


@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=_ids(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_gemm_repacked_cpu_matches_reference(bits, gs, act, dtype):
    k, n = 704, 136
    t = random_gptq_layer(k, n, bits, gs, act, sym=False, seed=7)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, 1, dtype)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    for m in (1, 3, 17):
        x = torch.randn(m, k).to(dtype)
        y = kernel_ops.gptq_gemm_repacked(x, r.qweight, r.scales, r.zeros, r.perm, locks, bits, gs, n)
        ref = gptq_gemm_reference(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
        assert y.dtype == dtype and y.shape == (m, n)
        err = ((y.float() - ref).abs().mean() / ref.abs().mean()).item()
        assert err <= (1e-3 if dtype == torch.float16 else 1e-2), err


def test_gemv_repacked_cpu_matches_gemm_and_refuses_large_m():
    k, n = 704, 136
    t = random_gptq_layer(k, n, 4, 128, True, sym=False, seed=9)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1, torch.float16)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    args = (r.qweight, r.scales, r.zeros, r.perm, locks, 4, 128, n)
    for m in (1, 8, 9, 32):
        x = torch.randn(m, k).half()
        y = kernel_ops.gptq_gemv_repacked(x, *args)
        assert y.shape == (m, n) and torch.equal(y, kernel_ops.gptq_gemm_repacked(x, *args))
    with pytest.raises(ValueError, match="M <= 32"):
        kernel_ops.gptq_gemv_repacked(torch.randn(33, k).half(), *args)
    with pytest.raises(RuntimeError, match="M <= 32"):  # the op itself, past the wrapper
        torch.ops.zephyr.gptq_gemv_repacked(torch.randn(33, k).half(), *args)
    assert torch.equal(kernel_ops.gptq_gemv_repacked(x[:8], *args, 16, 1), kernel_ops.gptq_gemm_repacked(x[:8], *args))
    with pytest.raises(ValueError, match="16 warps only for M <= 8"):  # 16-warp blocks serve one x tile
        kernel_ops.gptq_gemv_repacked(torch.randn(9, k).half(), *args, 16, 1)
    with pytest.raises(ValueError, match="block_warps must be 0, 4, 8 or 16"):
        kernel_ops.gptq_gemv_repacked(x[:8], *args, 12, 1)


def test_gemv_swiglu_cpu_is_silu_mul_of_the_product():
    """zephyr::gptq_gemv_swiglu on the CPU: silu(gate) * up of the rounded product, in fp32, rounded once,
    scattered by out_index; shapes from the fake implementation; the wrapper's refusals."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    k, n = 704, 256
    t = random_gptq_layer(k, n, 4, 128, True, sym=False, seed=11)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1, torch.float16)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    args = (r.qweight, r.scales, r.zeros, r.perm, locks, 4, 128, n)
    x = torch.randn(5, k).half()
    y = kernel_ops.gptq_gemm_repacked(x, *args)
    want = (torch.nn.functional.silu(y[:, :128].float()) * y[:, 128:].float()).half()
    got = kernel_ops.gptq_gemv_swiglu(x, *args)
    assert got.shape == (5, 128) and torch.equal(got, want)
    idx = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    scattered = kernel_ops.gptq_gemv_swiglu(x, *args, idx)
    assert torch.equal(scattered[:, idx], want)
    with pytest.raises(ValueError, match="M <= 16"):
        kernel_ops.gptq_gemv_swiglu(torch.randn(17, k).half(), *args)
    with pytest.raises(ValueError, match="out_index must be contiguous int64 \\[128\\]"):
        kernel_ops.gptq_gemv_swiglu(x, *args, idx[:64])
    with pytest.raises(ValueError, match=r"out_index values must lie in \[0, 128\), got \[-1, "):
        kernel_ops.gptq_gemv_swiglu(x, *args, torch.where(idx == 0, -1, idx))
    with pytest.raises(ValueError, match=r"out_index values must lie in \[0, 128\), got \[0, 128\]"):
        kernel_ops.gptq_gemv_swiglu(x, *args, torch.where(idx == 5, 128, idx))
    with pytest.raises(ValueError, match="block_warps=16 is served only for M <= 8"):
        kernel_ops.gptq_gemv_swiglu(torch.randn(9, k).half(), *args, None, 16, 1)
    t2 = random_gptq_layer(k, 192, 4, 128, True, sym=False, seed=12)  # F = 96: not whole 64-column blocks
    r2 = repack(t2["qweight"], t2["qzeros"], t2["scales"], t2["g_idx"], 4, 128, 1, torch.float16)
    with pytest.raises(ValueError, match="multiple of 128"):
        kernel_ops.gptq_gemv_swiglu(x, r2.qweight, r2.scales, r2.zeros, r2.perm, locks, 4, 128, 192)
    with FakeTensorMode() as mode:
        fr = [mode.from_tensor(v) for v in (x, r.qweight, r.scales, r.zeros, r.perm, locks)]
        out = torch.ops.zephyr.gptq_gemv_swiglu(*fr, 4, 128, n)
        assert out.shape == (5, 128) and out.dtype == torch.float16


def test_dequantize_cpu_matches_reference():
    t = random_gptq_layer(576, 200, 4, 128, True, False, seed=3)
    w = kernel_ops.gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    ref = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    assert w.dtype == torch.float16 and w.shape == (576, 200)
    assert torch.equal(w, ref.to(torch.float16))


def test_fake_impls_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = random_gptq_layer(576, 200, 4, 128, True, False, seed=3)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1, torch.float16)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 576).half())
        fr = [mode.from_tensor(v) for v in (r.qweight, r.scales, r.zeros, r.perm, locks)]
        y = kernel_ops.gptq_gemm_repacked(fx, *fr, 4, 128, 200)
        assert y.shape == (5, 200) and y.dtype == torch.float16
        y = kernel_ops.gptq_gemv_repacked(fx, *fr, 4, 128, 200)
        assert y.shape == (5, 200) and y.dtype == torch.float16
        y = kernel_ops.gptq_gemm_repacked(mode.from_tensor(torch.randn(100, 576).half()), *fr, 4, 128, 200, 2, 3)
        assert y.shape == (100, 200) and y.dtype == torch.float16
        ft = [mode.from_tensor(t[k]) for k in ("qweight", "qzeros", "scales", "g_idx")]
        w = kernel_ops.gptq_dequantize(*ft, 4, 1)
        assert w.shape == (576, 200) and w.dtype == torch.float16
        y = torch.ops.zephyr.gptq_linear(fx, *fr, 4, 128, 200, 32, 64)
        assert y.shape == (5, 200) and y.dtype == torch.float16
        w = torch.ops.zephyr.gptq_dequantize_repacked(fr[0], fr[1], fr[2], fr[3], 4, 128)
        assert w.shape == padded_sizes(576, 200) and w.dtype == torch.float16


def test_linear_op_cpu_equals_the_repacked_reference():
    """zephyr::gptq_linear (the one op the CUDA backend calls for every M) on the CPU: the reference."""
    t = random_gptq_layer(576, 200, 4, 128, True, False, seed=4)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1, torch.float32)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    x = torch.randn(70, 576)
    got = torch.ops.zephyr.gptq_linear(x, r.qweight, r.scales, r.zeros, r.perm, locks, 4, 128, 200, 32, 64)
    want = x @ dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,gs,act", LAYOUTS, ids=_ids(LAYOUTS))
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_dequantize_repacked_cpu_is_the_checkpoint_weight_in_repacked_order(bits, gs, act, sym):
    """The zk layout dequantized is the checkpoint's weight: rows in repacked order, or in its own with perm."""
    k, n = 576, 200
    t = random_gptq_layer(k, n, bits, gs, act, sym, seed=7 + bits)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, gs, 1, torch.float16)
    want = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1).to(torch.float16)
    kp, np_ = padded_sizes(k, n)
    w = torch.ops.zephyr.gptq_dequantize_repacked(r.qweight, r.scales, r.zeros, r.perm, bits, gs)
    assert w.shape == (kp, np_) and w.dtype == torch.float16
    assert torch.equal(w[:k, :n], want)
    w = torch.ops.zephyr.gptq_dequantize_repacked(r.qweight, r.scales, r.zeros, r.perm[:0], bits, gs)
    rows = r.perm.long() if r.perm.numel() else torch.arange(k)
    assert torch.equal(w[:k, :n], want[rows])
    # Padded columns have scale 0; padded rows hold codes 0 (finite, and x is zero-padded there).
    assert torch.isfinite(w).all() and not w[:, n:].any()


def test_opcheck_cpu():
    t = random_gptq_layer(256, 64, 8, 32, True, False, seed=5)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 8, 32, 1, torch.float16)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    x = torch.randn(3, 256).half()
    torch.library.opcheck(
        torch.ops.zephyr.gptq_gemm_repacked.default, (x, r.qweight, r.scales, r.zeros, r.perm, locks, 8, 32, 64)
    )
    torch.library.opcheck(
        torch.ops.zephyr.gptq_gemv_repacked.default, (x, r.qweight, r.scales, r.zeros, r.perm, locks, 8, 32, 64)
    )
    torch.library.opcheck(  # the tiled kernel, forced split
        torch.ops.zephyr.gptq_gemm_repacked.default, (x, r.qweight, r.scales, r.zeros, r.perm, locks, 8, 32, 64, 2, 2)
    )
    torch.library.opcheck(
        torch.ops.zephyr.gptq_dequantize.default, (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 8, 1)
    )
    torch.library.opcheck(
        torch.ops.zephyr.gptq_dequantize_repacked.default, (r.qweight, r.scales, r.zeros, r.perm, 8, 32)
    )
    torch.library.opcheck(
        torch.ops.zephyr.gptq_linear.default, (x, r.qweight, r.scales, r.zeros, r.perm, locks, 8, 32, 64, 32, 64)
    )


def _spec(**kw):
    base = dict(in_features=4096, out_features=4096, bits=4, group_size=128, sym=True, desc_act=True,
                zero_offset=1, dtype=torch.float16, device_type="cuda", capability=(9, 0))  # fmt: skip
    base.update(kw)
    return LayerSpec(**base)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(device_type="cpu"), "device"),
        (dict(bits=3), "bits=3"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(capability=(7, 5)), "capability"),
        (dict(group_size=48), "group_size=48"),
    ],
)
def test_backend_refuses_with_reason(kw, needle):
    ok, why = CudaGPTQBackend.can_implement(_spec(**kw))
    assert not ok and needle in why


def test_backend_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ok, why = CudaGPTQBackend.can_implement(_spec())
    assert not ok and "CUDA" in why


def test_backend_is_registered_and_import_is_cheap():
    from zephyr_plugins.plugins import kernel_backends

    names = [b.name for b in kernel_backends()]
    assert "cuda" in names and names.index("cuda") < names.index("reference")
    code = "import sys, zephyr_plugins.backends.cuda; assert 'torch.utils.cpp_extension' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(KERNELS.parent)})


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    return nvcc


@pytest.mark.parametrize("arch", ["90a", "80"])
def test_nvcc_compiles_kernels(tmp_path, arch):
    """The heaviest kernel file compiles for sm_90a and, without its wgmma code, for sm_80 (PTX only:
    fast, no ptxas)."""
    nvcc = _nvcc()
    src = KERNELS / "gptq_gemm_f16_u4.cu"
    cmd = [nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=compute_{arch}", "-c", str(src),
           "-o", str(tmp_path / "k.o")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def sm90a_u4(tmp_path_factory):
    """gptq_gemm_f16_u4.cu compiled to sm_90a SASS once: (object path, ptxas' stderr)."""
    nvcc = _nvcc()
    obj = tmp_path_factory.mktemp("sm90a") / "k.o"
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-c",
           str(KERNELS / "gptq_gemm_f16_u4.cu"), "-o", str(obj)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return obj, res.stderr


def test_wgmma_pipeline_not_serialized(sm90a_u4):
    """ptxas keeps the tiled kernel's wgmma asynchronous: no C7515 "wgmma ... serialized" warning
    (it appears when other instructions touch the accumulators inside the pipeline)."""
    assert "C7515" not in sm90a_u4[1], sm90a_u4[1][-3000:]


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found is None:  # the CUDA toolkit here has none; triton's wheel ships one
        try:
            import triton

            cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(cand) if cand.is_file() else None
        except ImportError:
            pass
    if found is None:
        pytest.skip("cuobjdump not found")
    return found


def _sass_above_wait(obj, cuobjdump: str):
    """(function name, its SASS lines before the first griddepcontrol.wait (ACQBULK), or None where it
    has no wait) for every function of the object file."""
    import re

    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, rest = body.partition("\n")
        lines = rest.split("\n")
        wait = next((i for i, line in enumerate(lines) if "ACQBULK" in line), None)
        yield name.strip(), None if wait is None else lines[:wait]


def _torch_include_flags(tmp_path) -> list[str]:
    """-I flags for compiling a torch-facing .cu file: torch's headers, and a shim for the generated
    header a CPU build of torch lacks (it only sets export macros)."""
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    return [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path / 'shim'}"]


def _sm90a_object(tmp_path, source: str, timeout: int = 600):
    """The torch-facing kernel file ``source`` compiled to sm_90a SASS (nvcc and cuobjdump both found, or the
    test skipped, before the compile): (object path, cuobjdump)."""
    nvcc, cuobjdump = _nvcc(), _cuobjdump()
    obj = tmp_path / (Path(source).stem + ".o")
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", *_torch_include_flags(tmp_path),
           "-c", str(KERNELS / source), "-o", str(obj)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return obj, cuobjdump


def test_gemv_weight_loads_stay_above_the_wait(sm90a_u4):
    """In every GEMV kernel variant's sm_90a SASS the first weight unit's 8 streaming loads
    (LDG.E.NA) come before griddepcontrol.wait (ACQBULK), so that they overlap the kernel before; and
    in the variants without GX no other global load does (x is written by the kernel before: reading
    it above the wait would race). ptxas once moved the weight loads below the wait (no branch between
    them), costing ~1 us per launch."""
    import re

    checked = 0
    for name, above in _sass_above_wait(sm90a_u4[0], _cuobjdump()):
        m = re.search(r"gptq_gemv_kernelI6__halfLi4ELb[01]ELb[01]ELi[124]ELb([01])ELb[01]E", name)
        if m is None:
            continue
        assert above is not None, f"{name}: no griddepcontrol.wait"
        weights = sum("LDG.E.NA" in line for line in above)
        others = sum(bool(re.search(r"\bLDG\b", line)) and "LDG.E.NA" not in line for line in above)
        assert weights == 8, f"{name}: {weights} weight loads above the wait"
        if m.group(1) == "0":
            assert others == 0, f"{name}: {others} other loads above the wait"
        checked += 1
    assert checked >= 20, checked


def test_norm_fixed_loads_stay_above_the_wait(tmp_path):
    """In add_rms_norm_permuted's sm_90a SASS (both dtypes) the permutation (4 loads) and the norm weight
    (1) are requested before griddepcontrol.wait (ACQBULK), and nothing else is: x and h are written by
    the kernel before, so reading them above the wait would race. With the wait right after those loads
    (no branch between), ptxas had moved all five below it."""
    import re

    obj, cuobjdump = _sm90a_object(tmp_path, "add_rms_norm.cu")  # ~25 s
    checked = 0
    for name, above in _sass_above_wait(obj, cuobjdump):
        if "add_rms_norm_permuted_kernel" not in name:
            continue
        assert above is not None, f"{name}: no griddepcontrol.wait"
        loads = sum(bool(re.search(r"\bLDG\b", line)) for line in above)
        assert loads == 5, f"{name}: {loads} loads above the wait"
        checked += 1
    assert checked == 2, checked


def test_attention_early_loads_stay_above_the_wait(tmp_path):
    """In decode_attention's sm_90a SASS, every EARLY kernel (the 256-thread blocks of grids that fit on the
    SMs) requests exactly its first step's K and V cache slices before griddepcontrol.wait (ACQBULK): the K
    pieces in mma fragment order (rows per lane x hd / 32) and the V slices (one per pass of the block's
    keys). Nothing else: q, k, v, cos, sin, the slot and the padding are written or may be written by the
    kernel before. The kernels without EARLY load nothing above their wait."""
    import re

    obj, cuobjdump = _sm90a_object(tmp_path, "decode_attention.cu", timeout=900)  # ~50 s
    checked = 0
    for name, above in _sass_above_wait(obj, cuobjdump):
        m = re.search(r"decode_attention_kernelI\w+?Li(\d+)ELi(\d)ELi(\d+)ELb([01])ELb([01])E", name)
        if m is None:
            continue
        hd, gmax, threads, early, cl = (int(v) for v in m.groups())
        assert above is not None, f"{name}: no griddepcontrol.wait"
        loads = sum(bool(re.search(r"\bLDG\b", line)) for line in above)
        step = (64 if gmax <= 4 else 32) * (2 if cl else 1)  # keys per step (the kernel's kStep)
        keys_per_warp = step // (threads // 32)
        want = (2 if keys_per_warp > 8 else 1) * (hd // 32) + step // (threads // (hd // 8)) if early else 0
        assert loads == want, f"{name}: {loads} loads above the wait, want {want}"
        checked += 1
    assert checked == 40, checked  # 2 dtypes x 2 head dims x 10 (group bound, threads, EARLY, cluster)


@pytest.mark.slow
def test_nvcc_compiles_every_source_with_torch_headers(tmp_path):
    """Every .cu file, including the torch-facing launcher, compiles (slow: minutes on 2 cores)."""
    nvcc = _nvcc()
    incs = _torch_include_flags(tmp_path)
    for src in sorted(KERNELS.glob("*.cu")):
        cmd = [nvcc, "-std=c++20", "-gencode=arch=compute_90a,code=compute_90a", *incs, "-c", str(src),
               "-o", str(tmp_path / (src.stem + ".o"))]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{src.name}: {res.stderr[-3000:]}"
    # The diagnostic timeline build (ZEPHYR_KERNEL_TIMELINE=1: kernels/timeline.cuh's stamps compiled in)
    # of the files that carry stamps.
    for name in ("decode_attention.cu", "add_rms_norm.cu", "gptq_gemm_f16_u4.cu"):
        cmd = [nvcc, "-std=c++20", "-DZEPHYR_TIMELINE", "-gencode=arch=compute_90a,code=compute_90a", *incs,
               "-c", str(KERNELS / name), "-o", str(tmp_path / "timeline.o")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{name} with -DZEPHYR_TIMELINE: {res.stderr[-3000:]}"


def test_timeline_build_is_a_build_of_its_own(monkeypatch):
    """ZEPHYR_KERNEL_TIMELINE=1 adds -DZEPHYR_TIMELINE and changes the cache key; unset or 0, the
    default build and its key are untouched."""
    from zephyr_plugins import kernel_build

    monkeypatch.delenv("ZEPHYR_KERNEL_TIMELINE", raising=False)
    base = kernel_build.cache_key()
    assert kernel_build.diagnostic_defines() == []
    monkeypatch.setenv("ZEPHYR_KERNEL_TIMELINE", "1")
    assert kernel_build.diagnostic_defines() == ["-DZEPHYR_TIMELINE"]
    assert kernel_build.cache_key() != base
    monkeypatch.setenv("ZEPHYR_KERNEL_TIMELINE", "0")
    assert kernel_build.diagnostic_defines() == [] and kernel_build.cache_key() == base


def test_wrappers_check_every_argument_first():
    """kernel_ops' wrappers refuse bad arguments with ValueError naming the argument (the extension is never reached)."""
    t = random_gptq_layer(256, 64, 4, 128, True, False, seed=7)
    r = repack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, 1, torch.float16)
    locks = torch.zeros(r.qweight.shape[0], dtype=torch.int32)
    x = torch.randn(3, 256).half()
    good = dict(x=x, qweight=r.qweight, scales=r.scales, zeros=r.zeros, perm=r.perm, locks=locks)
    cases = {
        "scales must be": dict(scales=r.scales.float()),
        "x must be float16 or bfloat16": dict(x=x.float()),
        "x must be a contiguous 2-D": dict(x=x.t()),
        "qweight covers Kp=256 rows but x has K=100": dict(x=torch.randn(3, 100).half()),
        "perm must be empty or int32": dict(perm=torch.zeros(5, dtype=torch.int32)),
        r"int32 \[K=256\], contiguous, .*\(not contiguous\)": dict(perm=torch.zeros(512, dtype=torch.int32)[::2]),
        "locks must be int32": dict(locks=torch.zeros(0, dtype=torch.int32)),
        "zeros must be empty or like scales": dict(zeros=torch.zeros(1, 64).half()),
    }
    for fn in (kernel_ops.gptq_gemm_repacked, kernel_ops.gptq_gemv_repacked):
        assert fn(**good, bits=4, group_size=128, size_n=64).shape == (3, 64)
        for msg, change in cases.items():
            args = {**good, **change}
            with pytest.raises(ValueError, match=msg):
                fn(**args, bits=4, group_size=128, size_n=64)
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            fn(**good, bits=3, group_size=128, size_n=64)
        with pytest.raises(ValueError, match="size_n=300"):
            fn(**good, bits=4, group_size=128, size_n=300)
    # gptq_gemm_repacked's kernel choice: any M for the planned and the tiled kernel, M <= 64 for the small one.
    big = {**good, "x": torch.randn(100, 256).half()}
    for kernel in (0, 2):
        assert kernel_ops.gptq_gemm_repacked(**big, bits=4, group_size=128, size_n=64, kernel=kernel).shape == (100, 64)
    with pytest.raises(ValueError, match="M <= 64"):
        kernel_ops.gptq_gemm_repacked(**big, bits=4, group_size=128, size_n=64, kernel=1)
    for bad in (dict(kernel=5), dict(kernel=-1), dict(splits=-1), dict(splits=257)):
        with pytest.raises(ValueError, match="kernel must be 0, 1, 2, 3 or 4 and splits"):
            kernel_ops.gptq_gemm_repacked(**good, bits=4, group_size=128, size_n=64, **bad)
    with pytest.raises(ValueError, match="qweight must be int32"):
        kernel_ops.gptq_dequantize(t["qweight"][:-1], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    zk = dict(qweight=r.qweight, scales=r.scales, zeros=r.zeros, perm=r.perm)
    assert kernel_ops.gptq_dequantize_repacked(**zk, bits=4, group_size=128).shape == (256, 64)
    dq_cases = {
        "bits must be 4 or 8": (dict(), dict(bits=3)),
        "qweight must be contiguous int32": (dict(qweight=r.qweight.float()), dict()),
        "scales must be contiguous float16/bfloat16": (dict(scales=r.scales.float()), dict()),
        "zeros must be empty or like scales": (dict(zeros=torch.zeros(1, 64).half()), dict()),
        "perm must be empty or int32": (dict(perm=torch.zeros(5, dtype=torch.int32)), dict()),
        "group_size must be -1 or positive": (dict(), dict(group_size=0)),
    }
    for msg, (tensors, ints) in dq_cases.items():
        with pytest.raises(ValueError, match=msg):
            kernel_ops.gptq_dequantize_repacked(**{**zk, **tensors}, **{"bits": 4, "group_size": 128, **ints})


def test_wheel_ships_the_kernel_sources(tmp_path):
    """A built wheel carries kernels/ as zephyr_plugins/kernels, and kernel_build finds it there once installed."""
    import zipfile

    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "whl"), str(root)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "whl").glob("zephyr_plugins-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted(p.name for p in (root / "kernels").iterdir() if p.suffix in (".cu", ".cuh", ".cpp")):
        assert f"zephyr_plugins/kernels/{src}" in names, src
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", "from zephyr_plugins import kernel_build as k; print(k.KERNEL_DIR)"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    assert Path(out) == site / "zephyr_plugins" / "kernels"


def test_layer_drops_qweight_and_rebuilds_it_bit_for_bit(monkeypatch):
    """With a backend that can rebuild it (CUDA's, run here on its CPU ops), QuantLinear frees its qweight."""
    import copy

    import zephyr_plugins.quant_linear as ql
    from zephyr_plugins.config import GPTQConfig

    class CpuZk(CudaGPTQBackend):
        device_types = ("cpu",)

    monkeypatch.setattr(ql, "select_backend", lambda spec, prefer=None: CpuZk)
    monkeypatch.delenv("ZEPHYR_KEEP_CHECKPOINT_WEIGHTS", raising=False)

    def make(seed):
        t = random_gptq_layer(576, 200, 4, 128, True, False, seed=seed)
        layer = ql.QuantLinear(576, 200, GPTQConfig(bits=4, group_size=128, desc_act=True, sym=False))
        layer.load_checkpoint_tensors(**t)
        return layer, t

    layer, t = make(11)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 576).half()
    y = layer(x)  # prepares: repack, then drop qweight
    assert not layer.holds_qweight and "qweight" not in dict(layer.named_buffers())
    sd = layer.state_dict()
    assert list(sd) == list(before) and all(torch.equal(sd[k], before[k]) for k in before)
    assert torch.equal(layer.qweight, t["qweight"])
    assert torch.equal(layer(x), y)

    twin = copy.deepcopy(layer)  # rebuilds from its own copy of the repacked tensors
    assert torch.equal(twin(x), y) and torch.equal(twin.state_dict()["qweight"], t["qweight"])

    layer.to(torch.device("cpu"))  # .to() forgets the kernel: the buffer is back first
    assert layer.holds_qweight and torch.equal(layer._buffers["qweight"], t["qweight"])
    assert torch.equal(layer(x), y) and not layer.holds_qweight

    other, t2 = make(12)
    layer.load_state_dict(other.state_dict())  # new weights on a dropped layer take effect
    want = x.float() @ dequantize(t2["qweight"], t2["qzeros"], t2["scales"], t2["g_idx"], 4, 1)
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2)
    assert torch.equal(layer.state_dict()["qweight"], t2["qweight"])

    layer, t = make(13)
    layer.load_checkpoint_tensors(**make(14)[1])  # replacing the tensors of a dropped layer
    layer(x)
    layer.load_checkpoint_tensors(**t)
    assert layer.holds_qweight and torch.equal(layer.qweight, t["qweight"])

    monkeypatch.setenv("ZEPHYR_KEEP_CHECKPOINT_WEIGHTS", "1")
    kept, _ = make(15)
    kept(x)
    assert kept.holds_qweight


def test_wgmma_available_rule(monkeypatch):
    """kernel_build.wgmma_available: an sm_90 card and ZEPHYR_CUDA_ARCHS with 90a, nothing else."""
    from zephyr_plugins import kernel_build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not kernel_build.wgmma_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, archs, want in [((9, 0), "90a", True), ((9, 0), "80;89;90a", True), ((9, 0), "90", False),
                             ((8, 0), "80;89;90a", False), ((10, 0), "90a", False)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        monkeypatch.setenv("ZEPHYR_CUDA_ARCHS", archs)
        assert kernel_build.wgmma_available() is want, (cap, archs)
        assert kernel_build.wgmma_available(torch.device("cuda", 0)) is want, (cap, archs)
        assert kernel_build.wgmma_available(torch.device("cpu")) is False  # the backend asks for a layer's device


def test_dense_gemv_cpu_fake_opcheck_and_refusals():
    """zephyr::dense_gemv (float layers, decode batches): the CPU path is the fp32 product rounded once,
    the fake gives the shape, opcheck passes, and bad arguments raise ValueError naming the problem."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(5, 96, generator=g).half(), torch.randn(40, 96, generator=g).half()
    want = (x.float() @ w.float().t()).half()
    assert torch.equal(kernel_ops.dense_gemv(x, w), want)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(kernel_ops.dense_gemv(xb, wb), (xb.float() @ wb.float().t()).bfloat16())
    torch.library.opcheck(torch.ops.zephyr.dense_gemv.default, (x, w, 0))
    with FakeTensorMode() as mode:
        y = kernel_ops.dense_gemv(mode.from_tensor(x), mode.from_tensor(w))
        assert y.shape == (5, 40) and y.dtype == torch.float16
    for words, (a, b) in {
        "M=9 rows": (torch.randn(9, 96).half(), w),
        "multiples of 32": (torch.randn(1, 100).half(), torch.randn(4, 100).half()),
        "the same for both": (x, w.bfloat16()),
        "columns": (torch.randn(1, 64).half(), w),
        "2-D": (torch.randn(96).half(), w),
    }.items():
        with pytest.raises(ValueError, match=words):
            kernel_ops.dense_gemv(a, b)
    with pytest.raises(ValueError, match="block_warps"):
        kernel_ops.dense_gemv(x, w, 5)


def test_model_linear_is_plain_on_cpu():
    """model.Linear with the kernel switched on still runs F.linear on the CPU, and the runtime switches
    nothing on there."""
    import torch.nn.functional as F

    from zephyr_plugins.model import Linear
    from zephyr_plugins.runtime import _enable_dense_gemv

    lin = Linear(64, 24, bias=False)
    lin.gemv_rows = 4
    x = torch.randn(2, 1, 64)
    assert torch.equal(lin(x), F.linear(x, lin.weight))
    model = torch.nn.Sequential(lin)
    assert _enable_dense_gemv(model, torch.float16, torch.device("cpu")) == 0


def test_add_rms_norm_permuted_cpu_fake_opcheck_and_refusals():
    """zephyr::add_rms_norm_permuted on the CPU is model_ops.add_rms_norm with the permutation; the fake
    gives two tensors like x; bad arguments raise ValueError naming the problem."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zephyr_plugins import model_ops

    g = torch.Generator().manual_seed(12)
    x, h = torch.randn(3, 1, 64, generator=g).half(), torch.randn(3, 1, 64, generator=g).half()
    w, perm = torch.rand(64, generator=g).half() + 0.5, torch.randperm(64, generator=g)
    s, y = kernel_ops.add_rms_norm_permuted(x, h, w, 1e-5, perm)
    ws, wy = model_ops.add_rms_norm(x, h, w, 1e-5, perm)
    assert torch.equal(s, ws) and torch.equal(y, wy) and y.is_contiguous()
    torch.library.opcheck(torch.ops.zephyr.add_rms_norm_permuted.default, (x, h, w, 1e-5, perm))
    with FakeTensorMode() as mode:
        fs, fy = kernel_ops.add_rms_norm_permuted(*(mode.from_tensor(t) for t in (x, h, w)), 1e-5, mode.from_tensor(perm))
        assert fs.shape == fy.shape == x.shape and fy.dtype == torch.float16
    for words, args in {
        "multiples of 8": (x[..., :60].contiguous(), h[..., :60].contiguous(), w[:60], perm[:60]),
        "int64": (x, h, w, perm.int()),
        "one shape": (x, h[:1], w, perm),
        "one for all": (x, h, w.float(), perm),
        "must be \\[64\\]": (x, h, w[:32], perm),
    }.items():
        with pytest.raises(ValueError, match=words):
            kernel_ops.add_rms_norm_permuted(*args[:3], 1e-5, args[3])


def test_dense_gemv_rows_rule(monkeypatch):
    """Which float layers the runtime sends to zephyr::dense_gemv: small fp16/bf16 ones without a bias,
    K a multiple of 32; the size limit can be moved (for measurements) and a bad value is named."""
    from zephyr_plugins.model import Linear
    from zephyr_plugins.runtime import DENSE_GEMV_ROWS, dense_gemv_rows

    small = Linear(4096, 4096, bias=False, dtype=torch.float16, device="meta")  # 32 MB: Mistral's o
    big = Linear(4096, 6144, bias=False, dtype=torch.float16, device="meta")  # 48 MB: qkv
    assert dense_gemv_rows(small, torch.float16) == DENSE_GEMV_ROWS and dense_gemv_rows(big, torch.float16) == 0
    assert dense_gemv_rows(small, torch.float32) == 0  # the weight's dtype must be the runtime's fp16/bf16
    assert dense_gemv_rows(Linear(100, 8, bias=False, dtype=torch.float16, device="meta"), torch.float16) == 0
    assert dense_gemv_rows(Linear(64, 8, bias=True, dtype=torch.float16, device="meta"), torch.float16) == 0
    monkeypatch.setenv("ZEPHYR_DENSE_GEMV_MAX_MB", "60")
    assert dense_gemv_rows(big, torch.float16) == DENSE_GEMV_ROWS
    monkeypatch.setenv("ZEPHYR_DENSE_GEMV_MAX_MB", "lots")
    with pytest.raises(ValueError, match="ZEPHYR_DENSE_GEMV_MAX_MB"):
        dense_gemv_rows(big, torch.float16)


def test_gemv_max_m_by_layer_size(monkeypatch):
    """The GEMV kernel's row limit per layer: 24 rows for 4-bit and 32 for 8-bit weights, 16 for layers
    above GEMV_LARGE_LAYER weights where the WS kernel serves the rows above; an explicit environment
    setting applies to every layer."""
    from zephyr_plugins.backends import cuda as cb

    monkeypatch.setattr(cb, "_GEMV_ENV_4", None)
    monkeypatch.setattr(cb, "_GEMV_ENV_8", None)
    monkeypatch.setattr(cb, "GEMV_MAX_M", 24)
    monkeypatch.setattr(cb, "GEMV_MAX_M_8BIT", 32)
    shapes = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
    want = {  # (bits, ws): rows per Mistral-7B shape
        (4, True): {"qkv": 24, "o": 24, "gate_up": 16, "down": 16},
        (8, True): {"qkv": 32, "o": 32, "gate_up": 16, "down": 32},
        (4, False): dict.fromkeys(shapes, 24),
        (8, False): dict.fromkeys(shapes, 32),
    }
    for (bits, ws), rows in want.items():
        got = {name: cb.gemv_max_m(bits, k, n, ws) for name, (k, n) in shapes.items()}
        assert got == rows, (bits, ws)
    monkeypatch.setattr(cb, "_GEMV_ENV_4", "20")
    monkeypatch.setattr(cb, "GEMV_MAX_M", 20)
    assert cb.gemv_max_m(4, 4096, 28672, True) == cb.gemv_max_m(4, 4096, 4096, True) == 20
    monkeypatch.setattr(cb, "_GEMV_ENV_8", "0")
    monkeypatch.setattr(cb, "GEMV_MAX_M_8BIT", 0)
    assert cb.gemv_max_m(8, 4096, 4096, True) == 0  # off
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        cb.gemv_max_m(3, 4096, 4096, True)


def test_ws_max_m_by_output_tiles(monkeypatch):
    """The WS kernel's row limit per layer on a 132-SM card: 512 rows always, then on while a layer's
    128 x 256 output tiles make one wave or at least four (Mistral-7B: qkv 640, the others 1024); a
    card with fewer SMs stops qkv sooner; an explicit environment setting applies to every layer."""
    from zephyr_plugins.backends import cuda as cb

    monkeypatch.setattr(cb, "_WS_ENV_4", None)
    monkeypatch.setattr(cb, "_WS_ENV_8", None)
    monkeypatch.setattr(cb, "FUSED_MAX_M_WS", 1024)
    monkeypatch.setattr(cb, "FUSED_MAX_M_WS_8BIT", 1024)
    outs = {"qkv": 6144, "o": 4096, "gate_up": 28672, "down": 4096}
    for bits in (4, 8):
        got = {name: cb.ws_max_m(bits, n, 132) for name, n in outs.items()}
        assert got == {"qkv": 640, "o": 1024, "gate_up": 1024, "down": 1024}, bits
    assert cb.ws_max_m(4, 6144, 114) == 512  # 5 x 24 = 120 tiles: past one wave of 114
    assert cb.ws_max_m(4, 4096, 114) == 896  # 8 x 16 = 128 > 114
    assert cb.ws_max_m(4, 300, 132) == 1024  # 2 column tiles: one wave throughout
    monkeypatch.setattr(cb, "FUSED_MAX_M_WS", 2048)
    assert cb.ws_max_m(4, 28672, 132) == 2048  # >= 4 waves from 640 rows on
    assert cb.ws_max_m(4, 4096, 132) == 1024  # 9 x 16 = 144 tiles at 1152 rows
    monkeypatch.setattr(cb, "_WS_ENV_4", "256")
    monkeypatch.setattr(cb, "FUSED_MAX_M_WS", 256)
    assert cb.ws_max_m(4, 6144, 132) == cb.ws_max_m(4, 28672, 132) == 256
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        cb.ws_max_m(3, 4096, 132)
