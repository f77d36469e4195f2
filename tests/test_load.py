"""zp.load on the six seed layouts, and every kind of bad checkpoint."""

import json
import os
import shutil

import pytest
import torch

import zephyr_plugins as zp
from zephyr_plugins import CheckpointError
from zephyr_plugins.assets import SEED_VARIANTS, dequantized_twin
from zephyr_plugins.checkpoint import CheckpointReader, resolve_checkpoint
from zephyr_plugins.quant_linear import QuantLinear


@pytest.mark.parametrize("branch", list(SEED_VARIANTS))
def test_seed_layout_matches_dequantized_float(branch, seed_checkpoints, tiny_model):
    model, tok = zp.load(seed_checkpoints[branch])
    cfg = SEED_VARIANTS[branch]
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.config.bits == cfg.bits
    assert layer.has_act_order() == (cfg.group_size != -1)  # one group: g_idx is all zeros
    ref = dequantized_twin(model, tiny_model.config)
    ids = tok(zp.zephyr_prompt("Tell me about AI"), return_tensors="pt")
    with torch.no_grad():
        got, want = model(**ids).logits, ref(**ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-3
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(model.generate(**ids, **gen), ref.generate(**ids, **gen))


def test_state_dict_is_the_checkpoint(seed_checkpoints):
    folder = seed_checkpoints["main"]
    model, _ = zp.load(folder)
    sd = model.state_dict()
    reader = CheckpointReader(folder)
    for name, tensor in reader.iter_tensors():
        assert torch.equal(sd[name], tensor), name


def test_tokenizer_renders_zephyr_template(seed_checkpoints):
    _, tok = zp.load(seed_checkpoints["main"])
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|system|>\n</s>\n<|user|>\nHello</s>\n<|assistant|>\n"


def test_repo_branch_goes_through_snapshot_download(monkeypatch, seed_checkpoints):
    calls = []

    def fake_snapshot_download(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision, tuple(allow_patterns)))
        return seed_checkpoints["gptq-4bit-32g-actorder_True"]

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model, _ = zp.load("TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True")
    assert calls[0][:2] == ("TheBloke/zephyr-7B-beta-GPTQ", "gptq-4bit-32g-actorder_True")
    assert not any(p.endswith((".bin", ".pt")) for p in calls[0][2])
    assert model.model.layers[0].self_attn.q_proj.config.group_size == 32
    assert resolve_checkpoint("TheBloke/x", revision="main") == seed_checkpoints["gptq-4bit-32g-actorder_True"]


def test_local_folder_never_downloads(monkeypatch, seed_checkpoints):
    def boom(*a, **k):
        raise AssertionError("network used for a local folder")

    monkeypatch.setattr("huggingface_hub.snapshot_download", boom)
    zp.load(seed_checkpoints["main"])


# ---------------------------------------------------------------- bad input
@pytest.fixture
def broken(tmp_path, seed_checkpoints):
    """A private copy of the 4-bit g128 checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(seed_checkpoints["main"], dst)
    return dst


def _rewrite_tensor(folder, name, value):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        zp.load(str(tmp_path / "nope"))


def test_pickled_weights_are_refused(broken):
    os.remove(broken / "model.safetensors")
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x04 would be a pickle")
    with pytest.raises(CheckpointError, match=r"only in pickled form \(pytorch_model.bin\); refusing to unpickle"):
        zp.load(str(broken))


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        zp.load(str(broken))


def test_qweight_shape_disagrees_with_bits(broken):
    name = "model.layers.0.self_attn.q_proj.qweight"
    _rewrite_tensor(broken, name, torch.zeros(64, 256, dtype=torch.int32))  # 8-bit shape in a 4-bit checkpoint
    with pytest.raises(CheckpointError, match=r"q_proj'.*qweight has shape \(64, 256\) but bits=4, group_size=128"):
        zp.load(str(broken))


def test_g_idx_out_of_range(broken):
    name = "model.layers.1.mlp.up_proj.g_idx"
    bad = torch.zeros(256, dtype=torch.int32)
    bad[7] = 2  # 256 inputs at group size 128: only groups 0 and 1 exist
    _rewrite_tensor(broken, name, bad)
    with pytest.raises(CheckpointError, match=r"up_proj'.*g_idx values range over \[0, 2\] but the layer has 2 groups"):
        zp.load(str(broken))


def test_unsupported_bits_in_config(broken):
    for fname in ("quantize_config.json", "config.json"):
        path = broken / fname
        data = json.loads(path.read_text())
        target = data if fname == "quantize_config.json" else data["quantization_config"]
        target["bits"] = 5
        path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"bits=5 is not supported; allowed values: \[2, 3, 4, 8\]"):
        zp.load(str(broken))


def test_config_sources_disagree(broken):
    path = broken / "quantize_config.json"
    data = json.loads(path.read_text())
    data["desc_act"] = False
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"disagree \(desc_act: False vs True\)"):
        zp.load(str(broken))


def test_missing_and_unknown_tensors(broken):
    from safetensors.torch import load_file, save_file

    path = str(broken / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"lacks tensors \['model.norm.weight'\]"):
        zp.load(str(broken))
    tensors["model.norm.weight"] = torch.ones(256, dtype=torch.float16)
    tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.extra.weight'\]"):
        zp.load(str(broken))


def test_not_a_mistral(broken):
    path = broken / "config.json"
    data = json.loads(path.read_text())
    data["model_type"] = "gpt2"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model_type='gpt2' is not supported"):
        zp.load(str(broken))
