"""``zephyr::decode_attention`` on the CPU: its reference against a loop-by-loop attention, the argument
checks, the fake, and the runtime with the fused decode step against the unfused one.

The CUDA kernel is compared with the reference in ``tests/gpu/test_attention_gpu.py``.
"""

import math

import pytest
import torch

from attn_cases import make_case

from zephyr_plugins import kernel_ops
from zephyr_plugins.kernel_ops import decode_attention


def loop_attention(c, n_heads, n_kv_heads, kv_len, window):
    """Independent of the model code: one head at a time, float64, the mask rule written out."""
    qkv, k_cache, v_cache = c["qkv"].double(), c["k_cache"].double().clone(), c["v_cache"].double().clone()
    bsz, hd = qkv.shape[0], k_cache.shape[-1]
    slot, half, grp = int(c["slot"]), hd // 2, n_heads // n_kv_heads

    def rope(x, b):
        cs, sn = c["cos"][b].double(), c["sin"][b].double()
        return torch.cat([x[:half] * cs - x[half:] * sn, x[half:] * cs + x[:half] * sn])

    out = torch.zeros(bsz, n_heads * hd, dtype=torch.float64)
    for b in range(bsz):
        heads = qkv[b].view(n_heads + 2 * n_kv_heads, hd)
        for j in range(n_kv_heads):
            k_cache[b, j, slot] = rope(heads[n_heads + j], b)
            v_cache[b, j, slot] = heads[n_heads + n_kv_heads + j]
        pad = int(c["pad"][b])
        seen = [t for t in range(kv_len) if (pad <= t <= slot and (not window or slot - t < window)) or t == slot]
        for hq in range(n_heads):
            hk = hq // grp
            q = rope(heads[hq], b)
            scores = torch.stack([q @ k_cache[b, hk, t] for t in seen]) / math.sqrt(hd)
            p = torch.softmax(scores, 0)
            out[b, hq * hd:(hq + 1) * hd] = sum(p[i] * v_cache[b, hk, t] for i, t in enumerate(seen))
    return out, k_cache, v_cache


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("slot,kv_len", [(25, 40), (0, 8), (39, 40)])
def test_reference_equals_loop_attention(window, slot, kv_len):
    c = make_case(slot=slot, pads=(0, min(4, slot), slot + 1))  # the last row's padding covers the slot itself
    want, want_k, want_v = loop_attention(c, 6, 2, kv_len, window)
    k_before = c["k_cache"].clone()
    got = decode_attention(**c, n_heads=6, n_kv_heads=2, kv_len=kv_len, window=window)
    assert got.shape == (3, 6 * 16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c["k_cache"][:3].double(), want_k[:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c["v_cache"][:3].double(), want_v[:3], rtol=0, atol=0)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(c["k_cache"][:, :, untouched], k_before[:, :, untouched])  # only the slot is written
    assert torch.equal(c["k_cache"][3], k_before[3])  # rows beyond the batch: untouched


def test_out_index_scatters_the_output():
    c = make_case()
    plain = decode_attention(**{k: v.clone() for k, v in c.items()}, n_heads=6, n_kv_heads=2, kv_len=40)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    got = decode_attention(**c, n_heads=6, n_kv_heads=2, kv_len=40, out_index=torch.argsort(perm))
    assert torch.equal(got, plain[:, perm])  # what a layer with input_permutation perm reads
    with pytest.raises(ValueError, match="out_index must be contiguous int64"):
        decode_attention(**c, n_heads=6, n_kv_heads=2, kv_len=40, out_index=perm[:10])


def test_fake_and_opcheck():
    c = make_case()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in c.items()}
        out = torch.ops.zephyr.decode_attention(*fake.values(), 6, 2, 40, 0)
    assert out.shape == (3, 96) and out.dtype == torch.float32
    torch.library.opcheck(torch.ops.zephyr.decode_attention.default, tuple(c.values()) + (6, 2, 40, 7),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_wrapper_checks_every_argument_first():
    c = make_case()
    cases = {
        "qkv must be a contiguous": dict(qkv=c["qkv"].t()),
        "k_cache and v_cache must be contiguous": dict(v_cache=c["v_cache"][:, :, :20]),
        "must have qkv's dtype": dict(k_cache=c["k_cache"].double(), v_cache=c["v_cache"].double()),
        "does not fit": dict(qkv=torch.zeros(3, 100)),
        "cos must be contiguous float32": dict(cos=c["cos"].double()),
        "slot must be int64": dict(slot=torch.tensor([3], dtype=torch.int32)),
        "pad must be int64": dict(pad=torch.zeros(2, dtype=torch.long)),
        "locks must be int32": dict(locks=torch.zeros(2, dtype=torch.int32)),
    }
    for msg, change in cases.items():
        with pytest.raises(ValueError, match=msg):
            decode_attention(**{**c, **change}, n_heads=6, n_kv_heads=2, kv_len=40)
    with pytest.raises(ValueError, match="kv_len=41"):
        decode_attention(**c, n_heads=6, n_kv_heads=2, kv_len=41)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        decode_attention(**c, n_heads=5, n_kv_heads=2, kv_len=40)
    with pytest.raises(ValueError, match="block_keys"):
        decode_attention(**c, n_heads=6, n_kv_heads=2, kv_len=40, block_keys=48)


def test_cuda_kernel_limits_are_stated():
    assert kernel_ops.decode_attention_unsupported(32, 8, 128, torch.float16) is None
    assert "at most 8" in kernel_ops.decode_attention_unsupported(32, 2, 128, torch.float16)
    assert "head_dim=96" in kernel_ops.decode_attention_unsupported(32, 8, 96, torch.bfloat16)
    assert "float32" in kernel_ops.decode_attention_unsupported(32, 8, 64, torch.float32)


@pytest.mark.parametrize("fused,permuted", [(True, False), (False, True), (True, True)])
def test_runtime_fused_decode_equals_unfused(gptq_act_order_ckpt, fused, permuted):
    """The runtime's decode step with the fused attention op (its CPU reference) and/or permuted inputs
    (norms and SwiGLU writing act-order layers' inputs in their row order; the dense backend keeps
    the weight rows in that order) gives the plain step's logits and cache.

    Left-padded rows and a sliding window shorter than the prompt: the op applies the mask's rule itself.
    """
    from zephyr_plugins.runtime import Zephyr

    runs = {}
    for flags in ((False, False), (fused, permuted)):
        llm = Zephyr.from_pretrained(gptq_act_order_ckpt, device="cpu", max_batch_size=2, max_seq_len=64,
                                     fused_attention=flags[0], permuted_inputs=flags[1])  # fmt: skip
        assert llm.fused_attention is flags[0] and llm.model.ops.fused_decode is flags[0]
        # GPTQ gives q/k/v (and gate/up) one g_idx: fused layers, so all four inputs per block are folded.
        assert llm.permuted_layers == (4 * len(llm.model.layers) if flags[1] else 0)
        g = torch.Generator().manual_seed(0)
        tokens, pad = torch.randint(3, 32000, (2, 20), generator=g), torch.tensor([0, 6])
        llm.model(tokens, 0, pad, kv_len=64)
        runs[flags] = [llm.steps(torch.randint(3, 32000, (2,), generator=g), 20 + i, pad).clone() for i in range(6)]
        runs[flags].append(llm.model.layers[0].attention.kv_cache.k[:2, :, :26].clone())
    # Permuted inputs reorder the fp32 sums over K of the act-order layers: the logits move by rounding
    # (up to 1.1e-5 seen in CI for one of 64,000, with 1e-5 allowed); a wrong permutation or mask moves
    # them by O(1).
    for a, b in zip(runs[(False, False)], runs[(fused, permuted)]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("permuted", [False, True])
def test_runtime_fused_swiglu_plumbing(gptq_act_order_ckpt, monkeypatch, permuted):
    """FeedForward's fused-SwiGLU path (``ModelOps.fused_swiglu``, QuantLinear.forward_swiglu): with a
    backend that serves it (a stand-in on the dense backend computing what zephyr::gptq_gemv_swiglu
    returns: silu(gate) * up, column j at out_index[j]), decode steps take it with the right input order
    and output scatter (act-order layers, inputs permuted or not) and give the unfused steps' logits;
    prefill keeps the unfused path (more than 16 rows)."""
    import torch.nn.functional as F

    from zephyr_plugins.backends.dense import DenseBackend
    from zephyr_plugins.runtime import Zephyr

    calls = []

    def apply_swiglu(self, layer, x, permuted_in=False, out_index=None):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > 16:
            return None
        calls.append((x2.shape[0], permuted_in, out_index is not None))
        y = self.apply_permuted(layer, x2) if permuted_in else self.apply(layer, x2)
        f = y.shape[-1] // 2
        act = (F.silu(y[:, :f].float()) * y[:, f:].float()).to(y.dtype)
        if out_index is not None:
            out = torch.empty_like(act)
            out[:, out_index] = act
            act = out
        return act.reshape(*x.shape[:-1], f)

    monkeypatch.setattr(DenseBackend, "apply_swiglu", apply_swiglu, raising=False)
    runs = {}
    for fused in (False, True):
        llm = Zephyr.from_pretrained(gptq_act_order_ckpt, device="cpu", max_batch_size=2, max_seq_len=64,
                                     permuted_inputs=permuted)  # fmt: skip
        assert not llm.fused_swiglu  # off by default on the CPU
        llm.model.ops.fused_swiglu = fused
        g = torch.Generator().manual_seed(0)
        tokens, pad = torch.randint(3, 32000, (2, 20), generator=g), torch.tensor([0, 6])
        llm.model(tokens, 0, pad, kv_len=64)
        assert not calls  # 40 rows: the stand-in declines, like the CUDA backend above 16 rows
        runs[fused] = [llm.steps(torch.randint(3, 32000, (2,), generator=g), 20 + i, pad).clone() for i in range(4)]
    n_layers = len(llm.model.layers)
    assert calls == [(2, permuted, permuted)] * (4 * n_layers), calls[:3]
    for a, b in zip(runs[False], runs[True]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5)


@pytest.fixture(scope="module")
def gptq_act_order_ckpt(tmp_path_factory, zephyr_tokenizer):
    from zephyr_plugins.assets import read_text, tiny_mistral
    from zephyr_plugins.config import GPTQConfig
    from zephyr_plugins.quantize import quantize_to_folder

    folder = tmp_path_factory.mktemp("fused") / "gptq"
    return quantize_to_folder(tiny_mistral(seed=5, sliding_window=8), folder,
                              GPTQConfig(bits=4, group_size=64, desc_act=True), [read_text("calib", max_chars=20_000)],
                              nsamples=4, seqlen=64, tokenizer=zephyr_tokenizer, progress=False)  # fmt: skip
