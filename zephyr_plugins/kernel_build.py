"""Just-in-time build of the CUDA kernels in ``kernels/``.

Nothing is built at import. :func:`ensure_built` compiles the sources with
``torch.utils.cpp_extension.load`` (ninja) the first time a CUDA layer asks
for them, into a per-user cache keyed by a hash of the sources, the torch and
CUDA versions and the target architectures, and loads the library, which
attaches the CUDA implementations to the ops of :mod:`zephyr_plugins.kernel_ops`.

Environment:

- ``ZEPHYR_CUDA_ARCHS``: semicolon-separated targets, default ``80;89;90a``
  (``90a`` is Hopper with its architecture-specific instructions). Narrow it,
  e.g. ``ZEPHYR_CUDA_ARCHS=90a``, to build only for the card at hand.
- ``ZEPHYR_KERNEL_CACHE``: cache folder (default ``~/.cache/zephyr_plugins/kernels``).
- ``ZEPHYR_KERNEL_VERBOSE=1``: show the compiler's output.

Example::

    >>> ok, why = ensure_built()     # (True, None) or (False, "nvcc not found ...")
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

def _kernel_dir() -> Path:
    """The CUDA sources: installed beside the package (a wheel), else the repository's ``kernels/``."""
    installed = Path(__file__).resolve().parent / "kernels"
    return installed if (installed / "bindings.cpp").is_file() else Path(__file__).resolve().parent.parent / "kernels"


KERNEL_DIR = _kernel_dir()
DEFAULT_ARCHS = "80;89;90a"

_lock = threading.Lock()
_state: Optional[tuple[bool, Optional[str]]] = None


def sources() -> list[Path]:
    """The compiled sources, in a fixed order."""
    return sorted(KERNEL_DIR.glob("*.cu")) + sorted(KERNEL_DIR.glob("*.cpp"))


def arch_flags() -> list[str]:
    """``-gencode`` flags for ``ZEPHYR_CUDA_ARCHS`` (default sm_80, sm_89, sm_90a)."""
    archs = [a.strip() for a in os.environ.get("ZEPHYR_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    for a in archs:
        if not a.rstrip("a").isdigit() or int(a.rstrip("a")) < 80:
            raise ValueError(f"ZEPHYR_CUDA_ARCHS entry {a!r} is invalid; allowed: 80 or newer, e.g. '80;89;90a'")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def arch_defines() -> list[str]:
    """``-D`` flags telling the host code which targets were built (sm_90a: the wgmma kernel)."""
    return ["-DZEPHYR_HAVE_SM90A"] if any("sm_90a" in f for f in arch_flags()) else []


def diagnostic_defines() -> list[str]:
    """``-DZEPHYR_TIMELINE`` when ``ZEPHYR_KERNEL_TIMELINE=1``: the decode-step kernels stamp per-block
    timelines (``kernels/timeline.cuh``, read by ``benchmarks/decode_timeline.py``); a build of its own
    in the cache. Diagnosis only: the stamps cost registers and time."""
    return ["-DZEPHYR_TIMELINE"] if os.environ.get("ZEPHYR_KERNEL_TIMELINE", "") == "1" else []


def wgmma_available(device=None) -> bool:
    """Whether the tiled kernel's wgmma variants (``gptq_gemm_repacked(..., kernel=3 or 4)``) run on
    ``device`` (default: the current CUDA device): an sm_90 card and kernels built for sm_90a (the
    rule of ``tiled_wgmma_available`` in ``kernels/gptq_gemm.cu``)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    cap = torch.cuda.get_device_capability() if device is None else torch.cuda.get_device_capability(device)
    return cap == (9, 0) and bool(arch_defines())


def find_nvcc() -> Optional[str]:
    """Path of the nvcc that torch would use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        cand = Path(CUDA_HOME) / "bin" / "nvcc"
        if cand.exists():
            return str(cand)
    return shutil.which("nvcc")


def cache_key() -> str:
    """Hash of the sources, headers, torch and CUDA versions and target archs."""
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*")):
        if p.suffix in (".cu", ".cuh", ".cpp", ".h"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(" ".join(arch_flags()).encode())
    for flag in diagnostic_defines():  # (the default build's key is unchanged)
        h.update(flag.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    root = os.environ.get("ZEPHYR_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "zephyr_plugins",
        "kernels",
    )
    return Path(root) / cache_key()


def _build() -> None:
    from torch.utils.cpp_extension import load

    from . import kernel_ops  # noqa: F401 - the schemas must exist before the library registers impls

    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    load(
        name=f"zephyr_kernels_{cache_key()}",
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr", *arch_flags(), *arch_defines(),
                           *diagnostic_defines()],
        extra_include_paths=[str(KERNEL_DIR)],
        build_directory=str(d),
        is_python_module=False,
        verbose=os.environ.get("ZEPHYR_KERNEL_VERBOSE", "") == "1",
    )


def ensure_built() -> tuple[bool, Optional[str]]:
    """Build and load the kernels once; ``(True, None)`` or ``(False, reason)``.

    The first failure is warned about once; later calls return the cached
    answer without retrying.
    """
    global _state
    with _lock:
        if _state is not None:
            return _state
        if not torch.cuda.is_available() or torch.version.cuda is None:
            _state = (False, "this torch build has no CUDA")
        elif find_nvcc() is None:
            _state = (False, "nvcc not found (install the CUDA toolkit or set CUDA_HOME) to build the CUDA kernels")
        else:
            try:
                _build()
                _state = (True, None)
            except Exception as exc:  # a compiler error is long; keep its last lines
                msg = str(exc).strip().splitlines()
                _state = (False, "building the CUDA kernels failed: " + " | ".join(msg[-6:]))
        if not _state[0]:
            warnings.warn(f"zephyr_plugins: CUDA kernels unavailable, using the reference path ({_state[1]})")
        return _state
