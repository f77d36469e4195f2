"""GPU tests of the fused decode-attention kernel (``-m gpu``; skipped cleanly without CUDA).

``zephyr::decode_attention`` (rope + cache write + grouped-query attention,
split along the keys) against its reference, the model's unfused path run in
fp32 on the same inputs, on fresh random data: Mistral-7B's heads (32 on 8,
hd 128), SmolLM2's (9 on 3, hd 64), one and eight query heads per kv head
(hd 64 and 128); batch 1 to 32; caches up to 4096 slots; slots on and next
to key-block edges; padding, sliding windows, planned and forced key blocks;
fp16 and bf16; the lock merge and the cluster merge. Also: only the slot is
written, the split locks return to zero, CUDA-graph replay with a moving
slot, opcheck, a C++ refusal raised as an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attn_cases import make_case  # noqa: E402
from gpu_helpers import TOL, cuda_with_kernels, poison_allocator  # noqa: E402

from zephyr_plugins.kernel_ops import decode_attention, decode_attention_reference  # noqa: E402

pytestmark = pytest.mark.gpu

HEADS = {"mistral": (32, 8, 128), "smollm2": (9, 3, 64), "mha": (8, 8, 128), "g8": (16, 2, 64), "g8w": (16, 2, 128)}


def _case(heads, bsz, lmax, slot, window_pads, dtype, seed):
    h, hkv, hd = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, slot + 1, (bsz,), generator=g).tolist()
    pads[0] = 0
    if bsz > 2:
        pads[1] = slot + 1 if window_pads else slot  # a row that sees only its own new token
    return make_case(bsz=bsz, h=h, hkv=hkv, hd=hd, bmax=bsz + 1, lmax=lmax, slot=slot, pads=pads, dtype=dtype,
                     seed=seed, device="cuda")  # fmt: skip


def _check(c, heads, kv_len, window, block_keys, dtype, out_index=None):
    h, hkv, hd = HEADS[heads]
    bsz = c["qkv"].shape[0]
    ref_in = {k: (v.float().clone() if v.is_floating_point() else v.clone()) for k, v in c.items()}
    want = decode_attention_reference(**ref_in, n_heads=h, n_kv_heads=hkv, kv_len=kv_len, window=window)
    exact = {k: c[k].clone() for k in ("k_cache", "v_cache")}  # the unfused path in the activation dtype
    same_dtype = {**c, **exact}
    decode_attention_reference(**same_dtype, n_heads=h, n_kv_heads=hkv, kv_len=kv_len, window=window)
    poison_allocator()
    got = decode_attention(**c, n_heads=h, n_kv_heads=hkv, kv_len=kv_len, window=window, block_keys=block_keys,
                           out_index=out_index)  # fmt: skip
    torch.cuda.synchronize()
    if out_index is not None:
        want = want[:, torch.argsort(out_index)]  # out[:, out_index[i]] = y[:, i]
    assert torch.isfinite(got).all()
    err = float((got.float() - want).abs().mean() / want.abs().mean())
    assert err <= TOL[dtype], (err, heads, bsz, kv_len, window, block_keys)
    # The cache: v copied, k rotated exactly as the unfused path does it, nothing else touched.
    assert torch.equal(c["v_cache"], exact["v_cache"])
    assert torch.equal(c["k_cache"], exact["k_cache"])
    assert int(c["locks"].abs().sum()) == 0  # the split semaphores reset themselves
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("bsz,lmax,kv_len,slot", [(1, 1024, 768, 600), (5, 512, 256, 255), (1, 4096, 4096, 4000),
                                                  (3, 64, 64, 0), (32, 1024, 1024, 512), (2, 1024, 1024, 511)])
@pytest.mark.parametrize("window", [0, 300])
def test_matches_reference(dtype, heads, bsz, lmax, kv_len, slot, window):
    cuda_with_kernels()
    c = _case(heads, bsz, lmax, slot, window, dtype, seed=bsz + slot)
    _check(c, heads, kv_len, window, 0, dtype)


@pytest.mark.parametrize("block_keys", [64, 128, 1024])
@pytest.mark.parametrize("slot", [31, 32, 447, 700])
def test_forced_key_blocks(block_keys, slot):
    cuda_with_kernels()
    c = _case("mistral", 4, 768, slot, 100, torch.float16, seed=slot)
    _check(c, "mistral", 768, 100, block_keys, torch.float16)


@pytest.mark.parametrize("merge", ["0", "1"])
@pytest.mark.parametrize("heads", ["mistral", "g8"])
@pytest.mark.parametrize("bsz,slot,window", [(1, 4000, 0), (4, 4000, 0), (1, 4000, 300), (2, 2500, 0)])
def test_many_key_blocks(merge, heads, bsz, slot, window, monkeypatch):
    """Up to 63 key blocks of 64 slots per (row, kv head): more than a warp has lanes and more than a
    thread requests up front in the merge; both merges (ZEPHYR_ATTN_MERGE, read per launch)."""
    cuda_with_kernels()
    monkeypatch.setenv("ZEPHYR_ATTN_MERGE", merge)
    c = _case(heads, bsz, 4096, slot, window, torch.float16, seed=slot + bsz)
    _check(c, heads, 4096, window, 64, torch.float16)


@pytest.mark.parametrize("heads", ["mistral", "smollm2"])
def test_out_index_scatters_in_the_kernel(heads):
    cuda_with_kernels()
    h, _, hd = HEADS[heads]
    perm = torch.randperm(h * hd, generator=torch.Generator().manual_seed(1)).cuda()
    for bsz, slot, lmax in ((1, 700, 768), (4, 40, 64)):  # split over key blocks, and one block
        c = _case(heads, bsz, lmax, slot, 0, torch.float16, seed=slot)
        _check(c, heads, lmax, 0, 0, torch.float16, out_index=perm)


def test_graph_replay_with_a_moving_slot():
    dev = cuda_with_kernels()
    h, hkv, hd = HEADS["mistral"]
    c = _case("mistral", 2, 512, 100, 0, torch.float16, seed=3)
    eager = {k: v.clone() for k, v in c.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(**c, n_heads=h, n_kv_heads=hkv, kv_len=512)  # warm-up (writes slot 100 again below)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(**c, n_heads=h, n_kv_heads=hkv, kv_len=512)
    g = torch.Generator().manual_seed(9)
    for slot in (100, 101, 300, 511):
        qkv = torch.randn(c["qkv"].shape, generator=g).to(dev, torch.float16)
        c["qkv"].copy_(qkv)
        eager["qkv"].copy_(qkv)
        c["slot"].fill_(slot)
        eager["slot"].fill_(slot)
        graph.replay()
        want = decode_attention(**eager, n_heads=h, n_kv_heads=hkv, kv_len=512)
        torch.cuda.synchronize()
        assert torch.equal(out, want), slot  # same kernel, same plan: bit for bit
        assert torch.equal(c["k_cache"], eager["k_cache"])


def test_opcheck_and_refusals():
    cuda_with_kernels()
    h, hkv, hd = HEADS["smollm2"]
    c = _case("smollm2", 3, 256, 200, 0, torch.float16, seed=4)
    torch.library.opcheck(torch.ops.zephyr.decode_attention.default, tuple(c.values()) + (h, hkv, 256, 0),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    with pytest.raises(ValueError, match="does not serve 32 query heads on 2 kv heads"):
        decode_attention(**_case("g8", 1, 64, 3, 0, torch.float16, 0), n_heads=32, n_kv_heads=2, kv_len=64)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        decode_attention(**_case("g8", 1, 64, 3, 0, torch.float32, 0), n_heads=16, n_kv_heads=2, kv_len=64)


_EARLY_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_attention_gpu as t
from zephyr_plugins.kernel_ops import decode_attention
t.cuda_with_kernels()  # loads the built kernels (the caller checked that they build)
outs = []
for heads, bsz, lmax, slot, window in [("mistral", 1, 768, 600, 0), ("mistral", 1, 768, 600, 300),
                                       ("smollm2", 2, 1024, 1000, 0), ("g8", 1, 4096, 4000, 0),
                                       ("mistral", 1, 64, 0, 0), ("mha", 3, 512, 255, 100),
                                       ("mistral", 1, 2048, 1500, 0)]:  # the last one: too long for a cluster
    h, hkv, _ = t.HEADS[heads]
    c = t._case(heads, bsz, lmax, slot, window, torch.float16, seed=slot + bsz)
    y = decode_attention(**c, n_heads=h, n_kv_heads=hkv, kv_len=lmax, window=window)
    outs += [y.cpu(), c["k_cache"].cpu(), c["v_cache"].cpu()]
torch.save(outs, {path!r})
print("ok", len(outs))
"""


def _run_script(code: str, path: str = "", switches=None) -> subprocess.CompletedProcess:
    """Run one of this module's scripts (``code``, formatted with this folder and ``path``) in a fresh
    process, with the environment variables in ``switches`` set (removed where None): the kernels'
    A/B switches are read once per process."""
    switches = switches or {}
    env = {k: v for k, v in os.environ.items() if k not in switches}
    env.update({k: v for k, v in switches.items() if v is not None})
    here = str(Path(__file__).resolve().parent)
    return subprocess.run([sys.executable, "-c", code.format(here=here, path=path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_early_loads_same_bits(tmp_path):
    """The 256-thread blocks that load their first step of the cache before the wait (EARLY, the
    default) give the same bits as the same blocks waiting first (ZEPHYR_ATTN_EARLY=0, read once per
    process): batch 1 with and without a window, a split and an unsplit cache, other head layouts;
    the cluster merge's blocks and (the 2048-slot cache) the lock merge's."""
    cuda_with_kernels()
    results = {}
    for flag in ("0", "1"):
        path = str(tmp_path / f"early{flag}.pt")
        res = _run_script(_EARLY_CODE, path, {"ZEPHYR_ATTN_EARLY": flag})
        assert res.returncode == 0 and "ok" in res.stdout, f"ZEPHYR_ATTN_EARLY={flag}: " + res.stderr[-6000:]
        results[flag] = torch.load(path)
    assert len(results["0"]) == len(results["1"]) == 21
    for i, (a, b) in enumerate(zip(results["0"], results["1"])):
        assert torch.equal(a, b), i


_CLUSTER_CASES = [("mistral", 1, 768, 600, 0), ("mistral", 1, 768, 600, 300), ("mistral", 1, 1024, 1000, 0),
                  ("mistral", 5, 256, 255, 0), ("smollm2", 2, 1024, 1000, 0), ("mha", 3, 512, 255, 100),
                  ("g8", 1, 512, 400, 0), ("mistral", 1, 768, 130, 0), ("g8w", 1, 128, 100, 0),
                  ("g8w", 3, 256, 200, 0)]  # fmt: skip
_CLUSTER_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_attention_gpu as t
t.cuda_with_kernels()  # loads the built kernels (the caller checked that they build)
perm = torch.randperm(32 * 128, generator=torch.Generator().manual_seed(1)).cuda()
outs = []
for dtype in (torch.float16, torch.bfloat16):
    for heads, bsz, lmax, slot, window in t._CLUSTER_CASES:
        c = t._case(heads, bsz, lmax, slot, window, dtype, seed=slot + bsz)
        index = perm if heads == "mistral" and bsz == 1 and window else None
        outs += [t._check(c, heads, lmax, window, 0, dtype, out_index=index).cpu(), c["k_cache"].cpu(),
                 c["v_cache"].cpu()]
torch.save(outs, {path!r})
print("ok", len(outs))
"""


def test_cluster_merge_matches_reference_and_runs(tmp_path):
    """Where the planned split fits as thread-block clusters (batch 1 to 5, caches up to 1024
    slots, one to eight query heads per kv head), the cluster merge (the default on sm_90) and the
    lock merge (ZEPHYR_ATTN_CLUSTER=0, read once per process) both match the reference in both
    dtypes, with and without a window and out_index, and write the same cache; their outputs
    differ in bits somewhere (the merges round differently), which shows the cluster path ran."""
    dev = cuda_with_kernels()
    if torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    results = {}
    for flag in ("0", None):
        path = str(tmp_path / f"cluster{flag}.pt")
        res = _run_script(_CLUSTER_CODE, path, {"ZEPHYR_ATTN_CLUSTER": flag})
        assert res.returncode == 0 and "ok" in res.stdout, f"ZEPHYR_ATTN_CLUSTER={flag}: " + res.stderr[-6000:]
        results[flag] = torch.load(path)
    lock, cluster = results["0"], results[None]
    assert len(lock) == len(cluster) == 6 * len(_CLUSTER_CASES)
    for i in range(0, len(lock), 3):
        assert torch.equal(lock[i + 1], cluster[i + 1]) and torch.equal(lock[i + 2], cluster[i + 2]), i
    assert any(not torch.equal(lock[i], cluster[i]) for i in range(0, len(lock), 3))


_REFUSAL_CODE = """
import sys, torch
sys.path.insert(0, {here!r})
import test_attention_gpu as t
t.cuda_with_kernels()
h, hkv, _ = t.HEADS["mistral"]
c = t._case("mistral", 1, 768, 600, 0, torch.float16, seed=1)
c["qkv"] = c["qkv"].float()  # past the Python wrapper's checks, straight to the op
try:
    torch.ops.zephyr.decode_attention(*c.values(), h, hkv, 768, 0, 0)
except RuntimeError as exc:
    print("refused:", str(exc).splitlines()[0])
"""


def test_kernel_refusal_raises_instead_of_crashing():
    """A TORCH_CHECK in the C++ launcher (float32 qkv sent straight to the op, past the wrapper's
    ValueError) surfaces as a RuntimeError naming the problem; the process does not crash.

    The message here is text only. On the GPU machine's image (torch 2.11, CUDA 13), any extension
    whose TORCH_CHECK message formats an integer or a size crashed the process (SIGSEGV), a
    ten-line load_inline extension built with g++ included, while messages of text and dtypes
    raised (results/ab_H200_2026-11-28/env_torch_check_int_crash.log); the wrappers in
    kernel_ops.py check the arguments before the op.
    """
    cuda_with_kernels()
    res = _run_script(_REFUSAL_CODE)
    assert res.returncode == 0, f"rc {res.returncode}: " + res.stderr[-6000:]
    assert "refused:" in res.stdout and "qkv must be contiguous float16/bfloat16" in res.stdout, res.stdout
