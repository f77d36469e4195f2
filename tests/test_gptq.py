"""The GPTQ algorithm on synthetic layers: beats RTN on held-out activations, exact packing, edge cases (CPU, fast)."""

import pytest
import torch

from zephyr_plugins.config import GPTQConfig
from zephyr_plugins.gptq import HessianAccumulator, gptq_quantize, reconstruction_error
from zephyr_plugins.reference import dequantize, quantize_rtn
from zephyr_plugins.writer import pack_layer


def _activations(n, k, seed):
    """Correlated activations with uneven channel scales, like a real layer's inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.linspace(0.1, 3.0, k)[torch.randperm(k, generator=g)]
    return (torch.randn(n, k, generator=g) @ mix) * scale


def _rtn_weight(w, cfg, g_idx=None):
    q, z, s, g = quantize_rtn(w, cfg.bits, cfg.group_size, cfg.sym, g_idx)
    g = g.long()
    return (s[g] * (q - z[g])).t()


@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_held_out_activations(group_size, desc_act):
    k, n = 320, 256  # K = 320 gives a partial last group at 128
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    rows = _activations(6144, k, 1)
    calib, held_out = rows[:4096], rows[4096:]  # held-out rows: same distribution, unseen by GPTQ
    cfg = GPTQConfig(bits=4, group_size=group_size, desc_act=desc_act)
    acc = HessianAccumulator(k)
    for chunk in calib.split(1000):
        acc.add(chunk)
    res = gptq_quantize(w, acc, cfg)
    err_gptq = reconstruction_error(w, res.weight, held_out)
    err_rtn = reconstruction_error(w, _rtn_weight(w, cfg), held_out)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # What GPTQ assumed is exactly what the packed checkpoint dequantizes to.
    t = pack_layer(res.q, res.zeros, res.scales, res.g_idx, cfg)
    deq = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg.bits, cfg.zero_offset)
    assert torch.equal(deq.t(), res.weight)
    if desc_act and group_size != -1:
        trivial = torch.arange(k, dtype=torch.int32) // group_size
        assert not torch.equal(res.g_idx, trivial)


@pytest.mark.parametrize("sym", [True, False])
def test_static_groups_asym_and_dead_columns(sym):
    k, n = 256, 64
    w = torch.randn(n, k) * 0.05
    x = _activations(2048, k, 2)
    x[:, 5] = 0  # a dead input
    acc = HessianAccumulator(k)
    acc.add(x)
    cfg = GPTQConfig(bits=4, group_size=64, desc_act=True, static_groups=True, sym=sym)
    res = gptq_quantize(w, acc, cfg)
    assert torch.equal(res.g_idx, torch.arange(k, dtype=torch.int32) // 64)  # static groups keep row order
    assert torch.all(res.weight[:, 5] == 0)
    t = pack_layer(res.q, res.zeros, res.scales, res.g_idx, cfg)
    deq = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, cfg.zero_offset)
    assert torch.equal(deq.t(), res.weight)


def test_no_calibration_data_and_bad_hessian_are_clear_errors():
    with pytest.raises(ValueError, match="saw no calibration data"):
        gptq_quantize(torch.randn(8, 16), HessianAccumulator(16), GPTQConfig(group_size=-1), name="blk.q_proj")
    acc = HessianAccumulator(16)
    acc.add(torch.full((4, 16), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.randn(8, 16), acc, GPTQConfig(group_size=-1))


def test_cholesky_retry_warns():
    k = 64
    u = torch.randn(k, 1)
    u /= u.norm()
    H = torch.eye(k) - 1.05 * (u @ u.t())  # one eigenvalue is -0.05: damp 0.01 is not enough, 0.1 is
    with pytest.warns(RuntimeWarning, match="succeeded with damp_percent=0.1"):
        res = gptq_quantize(torch.randn(8, k), H, GPTQConfig(group_size=-1, damp_percent=0.01))
    assert res.damp == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(group_size=-2), dict(bits=5), dict(mse=-1.0),
                                 dict(mse=True), dict(mse="2.4")])
def test_bad_config_rejected(bad):
    with pytest.raises(ValueError, match="group_size|bits|mse"):
        GPTQConfig(**bad)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("p", [2.0, 2.4])
def test_clip_search_never_worse_than_min_max_per_row(sym, p):
    """group_params with mse=p: each row's sum |w - q(w)|^p is at most the min/max grid's, and lower somewhere."""
    from zephyr_plugins.gptq import group_params

    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 128, generator=g) * 0.02
    w[::7, 0] *= 8  # outliers: the case clipping helps

    def err(scale, zero):
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
        return (scale[:, None] * (q - zero[:, None]) - w).abs().pow(p).sum(1)

    plain, searched = group_params(w, 4, sym), group_params(w, 4, sym, mse=p)
    assert torch.equal(group_params(w, 4, sym, mse=0.0)[0], plain[0])
    e0, e1 = err(*plain), err(*searched)
    assert bool((e1 <= e0).all()) and bool((e1 < e0).any())
    assert searched[0].dtype == torch.float32 and torch.equal(searched[0].half().float(), searched[0])  # fp16-exact


def test_clip_search_gptq_packs_exactly_and_is_stored_only_when_set():
    k, n = 256, 64
    w = torch.randn(n, k) * 0.05
    acc = HessianAccumulator(k)
    acc.add(_activations(2048, k, 4))
    cfg = GPTQConfig(bits=4, group_size=64, desc_act=True, mse=2.4)
    res = gptq_quantize(w, acc, cfg)
    t = pack_layer(res.q, res.zeros, res.scales, res.g_idx, cfg)
    deq = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, cfg.zero_offset)
    assert torch.equal(deq.t(), res.weight)  # the error feedback used exactly the stored grid
    assert cfg.to_dict()["mse"] == 2.4 and GPTQConfig.from_dict(cfg.to_dict()) == cfg
    assert "mse" not in GPTQConfig(bits=4).to_dict()
