"""GPTQ checkpoint I/O in the AutoGPTQ / TheBloke layout.

A checkpoint is a folder with ``config.json`` (with or without a
``quantization_config`` entry), ``quantize_config.json``, the tokenizer files
and the tensors in ``model.safetensors`` or in shards listed by
``model.safetensors.index.json``. Each quantized linear ``<name>`` stores
``<name>.qweight``, ``<name>.qzeros``, ``<name>.scales``, ``<name>.g_idx`` and
optionally ``<name>.bias`` (see :mod:`zephyr_plugins.packing`).

Reading never unpickles: ``.bin`` / ``.pt`` weights are refused. Every file's
header is checked against its size before any tensor is read, so a truncated
download fails with a message naming the file. Writing goes to a temporary
folder that is renamed into place only when complete.

Example::

    >>> folder = resolve_checkpoint("TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True")
    >>> reader = CheckpointReader(folder)
    >>> reader.shape("model.layers.0.mlp.down_proj.qweight")
    (1792, 4096)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Iterator, Mapping, Optional

import torch

from .errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+)?$")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------- locating
def parse_model_ref(ref: str, revision: Optional[str] = None) -> tuple[str, Optional[str]]:
    """Split ``"repo:branch"`` into ``(repo, branch)``; ``revision=`` wins if both are given."""
    repo, _, branch = ref.partition(":")
    if branch and revision and branch != revision:
        raise ValueError(f"{ref!r} names branch {branch!r} but revision={revision!r} was also given")
    return repo, (revision or branch or None)


def resolve_checkpoint(ref: str | os.PathLike, revision: Optional[str] = None) -> str:
    """A local folder for ``ref``: a folder path, or a Hub id ``repo`` / ``repo:branch``.

    Local folders never touch the network. Hub ids go through
    ``huggingface_hub.snapshot_download`` (safetensors, JSON and tokenizer
    files only: pickled weights are never fetched).
    """
    ref = os.fspath(ref)
    if os.path.isdir(ref):
        return ref
    if os.path.exists(ref):
        raise CheckpointError(f"{ref}: is a file; expected a checkpoint folder or a Hub id like 'owner/name:branch'")
    looks_local = ref.startswith((".", "/", "~")) or os.sep in ref.replace("/", "", 1) or not _HUB_ID.match(ref)
    if looks_local:
        raise CheckpointError(f"{ref}: checkpoint folder not found")
    repo, branch = parse_model_ref(ref, revision)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo,
            revision=branch,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network errors, offline mode, unknown repo or branch
        raise CheckpointError(
            f"{ref}: not a local folder, and downloading repo {repo!r} at revision {branch or 'main'!r} "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint, refusing pickled weights."""
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed safetensors index ({exc})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(folder, f)):
                raise CheckpointError(f"{index}: lists shard {f!r}, which is missing from {folder}")
        return [os.path.join(folder, f) for f in files]
    single = [f for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
    if single:
        return [os.path.join(folder, f) for f in single]
    pickled = [f for f in sorted(os.listdir(folder)) if f.endswith(_PICKLE_SUFFIXES)]
    if pickled:
        raise CheckpointError(
            f"{folder}: weights are only in pickled form ({', '.join(pickled)}); refusing to unpickle them "
            "(pickles can run arbitrary code). Convert the checkpoint to safetensors first."
        )
    raise CheckpointError(f"{folder}: no *.safetensors weight files found")


def read_safetensors_header(path: str) -> dict:
    """Parse and check a safetensors header against the file size (no tensor data read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            dtype = info["dtype"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: its header describes {8 + n + end} bytes but the file has {size}"
        )
    return header


class CheckpointReader:
    """Read-only view of a checkpoint's tensors across shards, headers checked up front."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: checkpoint folder not found")
        self.folder = folder
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in weight_files(folder):
            header = read_safetensors_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise CheckpointError(f"{folder}: tensor {name!r} appears in two shards")
                self._where[name] = path
                self._meta[name] = (tuple(info["shape"]), _DTYPES[info["dtype"]])

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def meta_tensor(self, name: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (for checks without I/O)."""
        shape, dtype = self._meta[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor {name!r} not in checkpoint")
        from safetensors import safe_open

        try:
            with safe_open(self._where[name], framework="pt") as fh:
                return fh.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name!r} ({exc})") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, path in self._where.items():
            by_file.setdefault(path, []).append(name)
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as fh:
                for name in names:
                    yield name, fh.get_tensor(name)


# ---------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_folder(final: str, overwrite: bool = False):
    """Yield a temporary folder beside ``final``; rename it into place on success.

    If the block raises, the temporary folder is removed and ``final`` is left
    as it was. An existing ``final`` is refused unless ``overwrite=True``.
    """
    final = os.path.abspath(os.fspath(final))
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final}: output folder exists; pass overwrite=True to replace it")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
        os.rename(final, os.path.join(old, "x"))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save_tensors(
    folder: str,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int = 4 * 1024**3,
    metadata: Optional[dict] = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or as shards plus an index."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_SINGLE), metadata=metadata)
        return [SAFE_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, fname), metadata=metadata)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, SAFE_INDEX), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
