"""Calibration data for GPTQ: token windows of real text.

``dataset`` may be a known name (``"wikitext2"``, ``"c4"``: fetched with the
``datasets`` package, so online only), a path to a UTF-8 text file, or a list
of strings. The text is tokenized as one stream and ``nsamples`` windows of
``seqlen`` tokens are cut at random offsets drawn from a seeded generator, so
the same arguments always give the same windows.

Example::

    >>> ids = calibration_windows(["some text ...", "more text ..."], tokenizer, nsamples=8, seqlen=128, seed=0)
    >>> ids.shape
    torch.Size([8, 128])
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence, Union

import torch

KNOWN_DATASETS = ("wikitext2", "c4")
Dataset = Union[str, "os.PathLike[str]", Sequence[str]]


def _load_named(name: str) -> str:
    """The training text of a known dataset, via ``datasets`` (needs the network the first time)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"dataset={name!r} is fetched with the 'datasets' package, which is not installed "
            "(pip install datasets); or pass a list of strings or the path of a text file"
        ) from None
    try:
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            return "\n\n".join(data["text"])
        data = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        # The first shard is ~350k documents; a few thousand are plenty for windows.
        return "\n\n".join(data.select(range(min(len(data), 5000)))["text"])
    except Exception as exc:  # offline, hub errors, missing cache
        raise ValueError(
            f"dataset={name!r} could not be loaded ({type(exc).__name__}: {exc}); it needs the network "
            "(or a datasets cache). Offline, pass a list of strings or the path of a text file."
        ) from None


def calibration_text(dataset: Dataset) -> str:
    """The raw text behind ``dataset`` (a known name, a text file path, or a list of strings)."""
    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if not text.strip():
                raise ValueError(f"calibration file {path} is empty")
            return text
        if path in KNOWN_DATASETS:
            return _load_named(path)
        shown = path if len(path) <= 80 else path[:77] + "..."
        raise ValueError(
            f"dataset={shown!r} is neither an existing text file nor a known dataset; "
            f"allowed names: {list(KNOWN_DATASETS)}, or a list of strings"
        )
    if isinstance(dataset, Sequence) and not isinstance(dataset, (bytes, bytearray)):
        if not all(isinstance(t, str) for t in dataset):
            raise ValueError("dataset: a list given as calibration data must hold only strings")
        text = "\n\n".join(t for t in dataset if t.strip())
        if not text:
            raise ValueError("dataset: the list of calibration strings is empty")
        return text
    raise ValueError(f"dataset: expected a dataset name, a text file path or a list of strings, got {type(dataset).__name__}")


def calibration_windows(
    dataset: Dataset,
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    max_positions: int | None = None,
) -> torch.Tensor:
    """``int64 [nsamples, seqlen']`` token windows cut at seeded random offsets.

    ``seqlen`` is clipped to ``max_positions`` (the model's maximum) and to the
    length of the tokenized text (with a warning). Windows may overlap when the
    text is short.
    """
    if not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples={nsamples!r} must be a positive integer")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r} must be an integer >= 2")
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer (none was given or found beside the model)")
    text = calibration_text(dataset)
    if max_positions is not None and seqlen > max_positions:
        seqlen = int(max_positions)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError(f"calibration text tokenizes to {ids.numel()} token(s); need at least 2")
    if ids.numel() < seqlen:
        warnings.warn(
            f"calibration text has only {ids.numel()} tokens; using windows of {ids.numel()} instead of seqlen={seqlen}",
            stacklevel=2,
        )
        seqlen = ids.numel()
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
