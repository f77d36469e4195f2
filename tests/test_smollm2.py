"""The real small model (SmolLM2-135M-Instruct) through zp.load, RTN-quantized."""

import pytest
import torch

import zephyr_plugins as zp
from zephyr_plugins import GPTQConfig
from zephyr_plugins.assets import dequantized_twin, load_float, read_text, write_rtn_checkpoint

pytestmark = pytest.mark.slow

LAYOUTS = {
    "8bit-g128": GPTQConfig(bits=8, group_size=128, desc_act=True),
    "4bit-g128": GPTQConfig(bits=4, group_size=128, desc_act=True),  # 576 inputs: a partial last group
}


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = load_float(smollm2_dir)
    root = tmp_path_factory.mktemp("smol")
    folders = {k: write_rtn_checkpoint(model, str(root / k), cfg, tokenizer=tok) for k, cfg in LAYOUTS.items()}
    return model, tok, folders


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_float_model_on_dequantized_weights(smol, layout):
    model, _, folders = smol
    qmodel, tok = zp.load(folders[layout])
    assert qmodel.model.layers[0].self_attn.q_proj.g_idx.max() == 4  # ceil(576 / 128) - 1
    ref = dequantized_twin(qmodel, model.config)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        got, want = qmodel(**ids).logits, ref(**ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-3
    gen = dict(max_new_tokens=32, do_sample=False)
    assert torch.equal(qmodel.generate(**ids, **gen), ref.generate(**ids, **gen))


def test_eight_bit_agrees_with_original(smol):
    model, tok, folders = smol
    qmodel, _ = zp.load(folders["8bit-g128"])
    ids = tok(read_text("eval", 20_000), return_tensors="pt")["input_ids"][:, :513]
    with torch.no_grad():
        a = qmodel(ids).logits[0, :512].argmax(-1)
        b = model(ids).logits[0, :512].argmax(-1)
    agreement = (a == b).float().mean().item()
    print(f"8-bit RTN top-1 agreement with the float model over 512 positions: {agreement:.3f}")
    assert agreement >= 0.95
