"""The Zephyr / Mistral-7B tokenizer, built offline.

Zephyr-7B-beta uses Mistral-7B-v0.1's sentencepiece model (32000 pieces; unk
0, bos 1, eos 2). ``mistral-common`` ships that exact file, so we can build a
fast tokenizer without any download. The conversion below reproduces
sentencepiece's own encoding: BPE with merges ranked by the pieces' scores, a
``▁`` prepended to the text (sentencepiece's dummy prefix) and byte fallback.
"""

from __future__ import annotations

import hashlib
import os

from .templates import ZEPHYR_CHAT_TEMPLATE

SPM_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def mistral_spm_path() -> str:
    """Path of ``tokenizer.model.v1`` inside the installed ``mistral-common``, checksum verified."""
    try:
        import mistral_common
    except ImportError as exc:
        raise ImportError(
            'building the Zephyr tokenizer offline needs mistral-common: pip install "zephyr-plugins[dev]"'
        ) from exc
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    if digest != SPM_SHA256:
        raise ValueError(f"{path}: unexpected sha256 {digest}; expected the Mistral-7B-v0.1 model {SPM_SHA256}")
    return path


def build_zephyr_tokenizer(spm_path: str | None = None):
    """A ``PreTrainedTokenizerFast`` equal to Zephyr-7B-beta's, with its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    spm_path = spm_path or mistral_spm_path()
    proto = import_protobuf().ModelProto()
    with open(spm_path, "rb") as fh:
        proto.ParseFromString(fh.read())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # sentencepiece's BPE applies the merge whose result scores highest first.
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="left",
    )
    fast.chat_template = ZEPHYR_CHAT_TEMPLATE
    return fast
