"""The offline Zephyr tokenizer equals sentencepiece, and the chat template is exact."""

import pytest

import zephyr_plugins as zp
from zephyr_plugins.assets import read_text
from zephyr_plugins.tokenizer import mistral_spm_path


def test_matches_sentencepiece_on_real_text(zephyr_tokenizer):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=mistral_spm_path())
    lines = [l for l in read_text("eval").splitlines() if l][:400]
    lines += ["  two  spaces", " leading", "trailing ", "héllo wörld 你好 🙂", "tab\there", "<|user|>\nHi"]
    for line in lines:
        assert zephyr_tokenizer(line, add_special_tokens=False)["input_ids"] == sp.encode(line), line
        assert zephyr_tokenizer.decode(sp.encode(line)) == sp.decode(sp.encode(line)), line


def test_eos_text_in_a_prompt_is_the_eos_token(zephyr_tokenizer):
    # As in Zephyr's own tokenizer: the template's "</s>" must become id 2, not
    # the characters "<", "/", "s", ">" (sentencepiece alone would split them).
    ids = zephyr_tokenizer(zp.zephyr_prompt("Hi"), add_special_tokens=False)["input_ids"]
    assert ids.count(2) == 2


def test_special_ids_and_bos(zephyr_tokenizer):
    assert (zephyr_tokenizer.unk_token_id, zephyr_tokenizer.bos_token_id, zephyr_tokenizer.eos_token_id) == (0, 1, 2)
    assert len(zephyr_tokenizer) == 32000
    assert zephyr_tokenizer("Hello")["input_ids"][0] == 1


def test_chat_template_exact(zephyr_tokenizer, tmp_path):
    msgs = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "How many helicopters can a human eat?"},
    ]
    want = (
        "<|system|>\nYou are a pirate.</s>\n<|user|>\nHi</s>\n<|assistant|>\nArr.</s>\n"
        "<|user|>\nHow many helicopters can a human eat?</s>\n<|assistant|>\n"
    )
    assert zp.get_template("zephyr").render(msgs) == want
    assert zephyr_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    zephyr_tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    assert zp.zephyr_prompt("Tell me about AI") == "<|system|>\n</s>\n<|user|>\nTell me about AI</s>\n<|assistant|>\n"


def test_template_rejects_bad_messages():
    with pytest.raises(ValueError, match="role 'robot'"):
        zp.get_template("zephyr").render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="messages is empty"):
        zp.get_template("zephyr").render([])
    with pytest.raises(ValueError, match="prompt_template='nope' is not registered"):
        zp.get_template("nope")
