"""GPTQ driver, checkpoints and the transformers / Optimum adapters on the tiny random Mistral (CPU)."""

import json
import os

import pytest
import torch

from zephyr_plugins.assets import read_text
from zephyr_plugins.config import GPTQConfig

CALIB = [read_text("calib", max_chars=60_000)]
ACT_ORDER = GPTQConfig(bits=4, group_size=128, desc_act=True, damp_percent=0.1)
QUANT = ("qweight", "qzeros", "scales", "g_idx")


def _tensors(folder):
    from zephyr_plugins.checkpoint import CheckpointReader

    return dict(CheckpointReader(folder).iter_tensors())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tiny_model, zephyr_tokenizer):
    """The tiny random model as a float transformers folder (fp32) with the Zephyr tokenizer."""
    d = tmp_path_factory.mktemp("float") / "tiny-zephyr"
    tiny_model.save_pretrained(d)
    zephyr_tokenizer.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, float_dir):
    from zephyr_plugins.quantize import quantize_to_folder

    out = tmp_path_factory.mktemp("q") / "tiny-gptq"
    quantize_to_folder(float_dir, out, ACT_ORDER, dataset=CALIB, nsamples=8, seqlen=128, progress=False)
    return str(out)


def test_act_order_checkpoint_has_g_idx_and_loads_back(gptq_dir, float_dir, zephyr_tokenizer):
    import zephyr_plugins as zp
    from zephyr_plugins.quantize import quantize_model
    from zephyr_plugins.reference import trivial_g_idx

    files = sorted(os.listdir(gptq_dir))
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert json.load(open(os.path.join(gptq_dir, "config.json")))["quantization_config"]["desc_act"] is True
    tensors = _tensors(gptq_dir)
    g = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g, trivial_g_idx(g.numel(), 128))
    # The float model with GPTQ's dequantized weights computes what the checkpoint does.
    from transformers import AutoModelForCausalLM

    fake = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    state = quantize_model(fake, zephyr_tokenizer, ACT_ORDER, CALIB, nsamples=8, seqlen=128, progress=False)
    for k, t in tensors.items():  # deterministic: same seed, same tensors
        assert torch.equal(state[k], t), k
    for name, p in fake.named_parameters():  # the checkpoint stores the float tensors in fp16
        if not name.endswith(("proj.weight",)):
            p.data = p.data.half().float()
    model, tok = zp.load(gptq_dir)
    assert isinstance(model.model.layers[1].mlp.down_proj, zp.QuantLinear)
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 13]])
    with torch.no_grad():
        a, b = model(ids).logits, fake(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_save_load_save_is_identical_and_enable_disable(gptq_dir, tmp_path, zephyr_tokenizer):
    import zephyr_plugins as zp
    import zephyr_plugins.adapters.transformers as zt
    from transformers import AutoModelForCausalLM, pipeline
    from transformers.quantizers import auto

    stock = auto.AUTO_QUANTIZER_MAPPING["gptq"]
    zt.enable()
    zt.enable()  # idempotent
    try:
        model = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float16)
        assert isinstance(model.model.layers[0].self_attn.q_proj, zp.QuantLinear)
        model.save_pretrained(tmp_path / "re")
        first, again = _tensors(gptq_dir), _tensors(str(tmp_path / "re"))
        assert first.keys() == again.keys()
        for k in first:
            assert first[k].dtype == again[k].dtype and torch.equal(first[k], again[k]), k
        # The seed's example: pipeline("text-generation") on our checkpoint, after enable().
        model = AutoModelForCausalLM.from_pretrained(gptq_dir, dtype=torch.float32)
        pipe = pipeline("text-generation", model=model, tokenizer=zephyr_tokenizer)
        prompt = zephyr_tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about AI"}],
                                                      tokenize=False, add_generation_prompt=True)
        out = pipe(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
        ref, _ = zp.load(gptq_dir)
        ids = zephyr_tokenizer(prompt, return_tensors="pt")
        expected = ref.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert out == zephyr_tokenizer.decode(expected, skip_special_tokens=True)
    finally:
        zt.disable()
    assert auto.AUTO_QUANTIZER_MAPPING["gptq"] is stock and not zt.is_enabled()


def test_quantize_on_load_matches_optimum_class(float_dir, zephyr_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from zephyr_plugins.adapters.optimum import ZephyrGPTQConfig, ZephyrGPTQQuantizer, load_quantized_model

    q = ZephyrGPTQConfig(bits=8, group_size=-1, desc_act=True, damp_percent=0.1, dataset=CALIB, nsamples=4,
                         model_seqlen=64, seed=3, mse=2.4)
    hf = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=q, dtype=torch.float32)
    quantizer = ZephyrGPTQQuantizer(bits=8, group_size=-1, desc_act=True, dataset=CALIB, nsamples=4,
                                    model_seqlen=64, seed=3, mse=2.4)
    assert ZephyrGPTQQuantizer.from_dict(quantizer.to_dict()).to_dict() == quantizer.to_dict()
    float_model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    opt = quantizer.quantize_model(float_model, zephyr_tokenizer)
    a, b = hf.state_dict(), opt.state_dict()
    names = [k for k in a if k.endswith(QUANT)]
    assert len(names) == 2 * 7 * 4
    for k in names:
        assert torch.equal(a[k], b[k]), k
    # save_pretrained -> from_pretrained round trip of the quantize-on-load model.
    hf.save_pretrained(tmp_path / "hf")
    saved = json.load(open(tmp_path / "hf" / "config.json"))["quantization_config"]
    assert saved["quant_method"] == "zephyr_gptq" and saved["mse"] == 2.4
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([[1, 22557, 28725, 910, 460, 368]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, hf(ids).logits, atol=1e-3)
    # Optimum-style save (TheBloke layout) and load_quantized_model.
    quantizer.save(opt, str(tmp_path / "opt"))
    assert json.load(open(tmp_path / "opt" / "quantize_config.json"))["quant_method"] == "gptq"
    loaded = load_quantized_model(float_model, str(tmp_path / "opt"))
    for name, p in opt.named_parameters():  # the checkpoint stores the float tensors in fp16
        p.data = p.data.half().float()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, opt(ids).logits, atol=1e-4, rtol=1e-4)


def test_optimum_arguments_checked():
    from zephyr_plugins.adapters.optimum import ZephyrGPTQQuantizer

    with pytest.raises(ValueError, match="bits"):
        ZephyrGPTQQuantizer(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        ZephyrGPTQQuantizer(bits=4, group_size=0)
    with pytest.raises(ValueError, match="cache_block_outputs"):
        ZephyrGPTQQuantizer(bits=4, cache_block_outputs=False)
    with pytest.raises(ValueError, match="block_name_to_quantize"):
        ZephyrGPTQQuantizer(bits=4, block_name_to_quantize="transformer.h")
    with pytest.raises(ValueError, match="unknown arguments"):
        ZephyrGPTQQuantizer(bits=4, use_exllama=True)
    with pytest.raises(ValueError, match="mse"):
        ZephyrGPTQQuantizer(bits=4, mse=-1)


# ------------------------------------------------------------------ bad input
def test_bad_calibration_inputs(tmp_path, zephyr_tokenizer, tiny_model, monkeypatch):
    from zephyr_plugins.calibration import calibration_windows
    from zephyr_plugins.quantize import quantize_model

    with pytest.raises(ValueError, match="neither an existing text file nor a known dataset.*wikitext2"):
        calibration_windows("wikitext3", zephyr_tokenizer)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if not installed / unusable
    with pytest.raises(ValueError, match="'datasets'.*list of strings"):
        calibration_windows("wikitext2", zephyr_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        quantize_model(tiny_model, zephyr_tokenizer, ACT_ORDER, str(empty), progress=False)
    windows = calibration_windows(CALIB, zephyr_tokenizer, nsamples=3, seqlen=10_000, seed=1, max_positions=64)
    assert windows.shape == (3, 64)
    assert torch.equal(windows, calibration_windows(CALIB, zephyr_tokenizer, 3, 10_000, 1, max_positions=64))


@pytest.mark.parametrize("bad", [dict(group_size=0), dict(group_size=-2), dict(bits=5)])
def test_bad_hf_config(bad):
    from zephyr_plugins.adapters.transformers import ZephyrGPTQConfig

    with pytest.raises(ValueError, match=next(iter(bad))):
        ZephyrGPTQConfig(dataset=CALIB, **bad)


def test_non_mistral_model_and_existing_folder(tmp_path, zephyr_tokenizer, gptq_dir, float_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from zephyr_plugins.quantize import quantize_model, quantize_to_folder

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=32000))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        quantize_model(gpt2, zephyr_tokenizer, ACT_ORDER, CALIB, progress=False)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        quantize_to_folder(tmp_path / "gpt2", tmp_path / "out", ACT_ORDER, dataset=CALIB)
    before = os.listdir(gptq_dir)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        quantize_to_folder(float_dir, gptq_dir, ACT_ORDER, dataset=CALIB)
    assert os.listdir(gptq_dir) == before


def test_cli_quantize_and_ppl(float_dir, tmp_path, capsys):
    from zephyr_plugins.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB[0][:20_000])
    out = tmp_path / "cli-gptq"
    args = ["quantize", float_dir, "--bits", "4", "--group-size", "64", "--desc-act", "--damp", "0.1",
            "--dataset", str(calib), "--nsamples", "2", "--seqlen", "64", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["ppl", str(out), "--text", str(calib), "--seqlen", "64", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
