"""Kernel backends through pluggy, backend selection errors, and the op contract."""

import pytest
import torch

import zephyr_plugins as zp
from zephyr_plugins import GPTQConfig, KernelBackend, KernelUnavailableError, LayerSpec, hookimpl
from zephyr_plugins.plugins import get_plugin_manager, kernel_backends, prompt_templates
from zephyr_plugins.quant_linear import QuantLinear
from zephyr_plugins.reference import dequantize, quantize_rtn
from zephyr_plugins.writer import g_idx_for_order, pack_layer


def make_layer(bits=4, group_size=32, k=96, n=64, act_order=True, sym=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    perm = torch.randperm(k, generator=g)
    g_idx = g_idx_for_order(perm, group_size) if act_order else None
    cfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym)
    q, z, s, g_idx = quantize_rtn(w, bits, group_size, sym, g_idx)
    layer = QuantLinear(k, n, cfg)
    layer.load_checkpoint_tensors("test", **pack_layer(q, z, s, g_idx, cfg))
    return layer


class _CountingBackend(KernelBackend):
    """A third-party backend: reference math, but it counts its calls."""

    name = "counting"
    priority = 100
    supported_bits = (4,)
    supported_dtypes = (torch.float32,)
    device_types = ("cpu",)
    calls = 0
    processed = 0

    def process_weights(self, layer):
        type(self).processed += 1

    def apply(self, layer, x):
        type(self).calls += 1
        return zp.ops.gptq_gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, self.spec.bits, self.spec.zero_offset)


class _Plugin:
    @hookimpl
    def register_kernels(self, register):
        register(_CountingBackend)


@pytest.fixture
def third_party():
    pm = get_plugin_manager()
    plugin = _Plugin()
    pm.register(plugin, name="third-party-test")
    yield _CountingBackend
    pm.unregister(plugin)


def test_builtin_reference_backend_is_registered():
    names = [b.name for b in kernel_backends()]
    assert "reference" in names
    assert "zephyr" in prompt_templates()


def test_third_party_backend_is_chosen_and_used(third_party):
    layer = make_layer(bits=4)
    x = torch.randn(3, 96)
    y = layer(x)
    assert third_party.calls == 1 and third_party.processed == 1
    assert "kernel=counting" in repr(layer)
    layer(x)
    assert third_party.processed == 1  # repacked once, not per call
    torch.testing.assert_close(y, x @ layer.dequantized_weight().t())
    # The backend declares 4 bits only: an 8-bit layer falls back to the reference.
    layer8 = make_layer(bits=8)
    layer8(x)
    assert "kernel=reference" in repr(layer8)


def test_no_backend_lists_every_reason():
    spec = LayerSpec(96, 64, 4, 32, True, True, 1, torch.float16, "tpu")
    with pytest.raises(KernelUnavailableError, match=r"reference: device 'tpu' not in"):
        zp.select_backend(spec)
    with pytest.raises(KernelUnavailableError, match=r"kernel backend 'nope' is not registered"):
        zp.select_backend(spec, prefer="nope")


def test_reasons_name_bits_group_dtype_and_capability():
    class Picky(KernelBackend):
        name = "picky"
        supported_bits = (4,)
        supported_group_sizes = (128,)
        supported_dtypes = (torch.float16,)
        device_types = ("cuda",)
        min_capability = (9, 0)

    base = dict(in_features=64, out_features=64, sym=True, desc_act=False, zero_offset=1)
    cases = [
        (LayerSpec(bits=8, group_size=128, dtype=torch.float16, device_type="cuda", capability=(9, 0), **base), "bits=8 not in [4]"),
        (LayerSpec(bits=4, group_size=32, dtype=torch.float16, device_type="cuda", capability=(9, 0), **base), "group_size=32 not in [128]"),
        (LayerSpec(bits=4, group_size=128, dtype=torch.bfloat16, device_type="cuda", capability=(9, 0), **base), "dtype torch.bfloat16"),
        (LayerSpec(bits=4, group_size=128, dtype=torch.float16, device_type="cuda", capability=(8, 0), **base), "compute capability >= (9, 0)"),
    ]
    for spec, reason in cases:
        ok, why = Picky.can_implement(spec)
        assert not ok and reason in why
        with pytest.raises(KernelUnavailableError, match=r"picky: "):
            zp.select_backend(spec, backends=[Picky])


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, -1, True), (3, 32, True), (2, 32, False)])
def test_op_matches_dequantized_matmul(bits, group_size, sym):
    layer = make_layer(bits=bits, group_size=group_size, sym=sym, seed=bits)
    x = torch.randn(5, 96, dtype=torch.float64).float()
    w = dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 1).double()
    want = x.double() @ w
    got = zp.ops.gptq_gemm(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, 1)
    assert got.shape == (5, 64) and got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6


def test_opcheck_and_fake():
    layer = make_layer()
    x = torch.randn(2, 3, 96)
    args = (x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, 4, 1)
    torch.library.opcheck(torch.ops.zephyr.gptq_gemm.default, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.zephyr.gptq_gemm(*fake)
    assert out.shape == (2, 3, 64)


def test_quantlinear_compiles():
    layer = make_layer()
    x = torch.randn(4, 96)
    layer.prepare(torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))
