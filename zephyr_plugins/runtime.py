"""``Zephyr``: fast generation for GPTQ (and fp16) Mistral-family checkpoints.

Our own model code (:mod:`zephyr_plugins.model`), a static KV cache, chunked
prefill, decode steps replayed from CUDA graphs, sampling on the device, and
exact stop strings. The same code runs on the CPU (reference kernels, no graphs).

Example::

    >>> import zephyr_plugins as zp
    >>> llm = zp.Zephyr.from_pretrained("TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True")
    >>> print(llm.chat([{"role": "user", "content": "Tell me about AI"}]))
    >>> for piece in llm.stream("Tell me about AI", max_new_tokens=64, temperature=0.7):
    ...     print(piece, end="", flush=True)
    >>> llm.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=16, temperature=0, stop=["\\n"])

``Zephyr`` implements :class:`zephyr_plugins.generation_api.Generator`: one
generation at a time per model (a lock), cancellable through a ``threading.Event``.
"""

from __future__ import annotations

import os
import threading
from typing import Iterator, Optional, Sequence, Union

import torch

from .checkpoint import resolve_checkpoint
from .decode_graphs import DecodeGraphs
from .detokenizer import TextStream
from .generation_api import Completion, SamplingParams, StreamChunk
from .loader import load_tokenizer
from .model_loading import load_transformer
from .model_ops import ModelOps
from .quant_linear import QuantLinear
from .sampling import Sampler
from .templates import ZEPHYR, PromptTemplate

Messages = Sequence[dict]


def _fused_attention_ok(args, dtype: torch.dtype, device: torch.device) -> bool:
    """Can ``zephyr::decode_attention`` serve this model here? On the CPU its reference always can."""
    if device.type == "cpu":
        return True
    from .kernel_build import ensure_built
    from .kernel_ops import decode_attention_unsupported

    if decode_attention_unsupported(args.n_heads, args.n_kv_heads, args.head_dim, dtype) is not None:
        return False
    return device.type == "cuda" and ensure_built()[0]


# Float layers whose decode calls go to zephyr::dense_gemv: weights of at most this many bytes, calls of at
# most DENSE_GEMV_ROWS rows. H100, fp16, same run (benchmarks/dense_gemv.py, 16-warp blocks): the kernel
# beat cuBLAS on Mistral-7B's 32 MB o projection at M = 1-4 (14.8 vs 16.2-16.4 us) but not at M = 8
# (15.0 vs 14.2), nor on the larger layers (qkv 50 MB: 22.0 vs 20.8; gate_up 88 vs 82; head 98.7 vs 98.2).
DENSE_GEMV_MAX_BYTES = 40 << 20
DENSE_GEMV_ROWS = 4


def dense_gemv_rows(layer, dtype: torch.dtype) -> int:
    """Rows up to which a float ``model.Linear`` should use ``zephyr::dense_gemv`` (0: never).
    ``ZEPHYR_DENSE_GEMV_MAX_MB`` overrides the weight-size limit (for measurements)."""
    from .kernel_ops import DENSE_GEMV_K_MULTIPLE

    limit = os.environ.get("ZEPHYR_DENSE_GEMV_MAX_MB")
    try:
        max_bytes = float(limit) * 2**20 if limit else DENSE_GEMV_MAX_BYTES
    except ValueError:
        raise ValueError(f"ZEPHYR_DENSE_GEMV_MAX_MB={limit!r} is not a number of megabytes") from None
    ok = (layer.bias is None and layer.in_features % DENSE_GEMV_K_MULTIPLE == 0 and dtype in (torch.float16, torch.bfloat16)
          and layer.weight.dtype == dtype and layer.weight.numel() * layer.weight.element_size() <= max_bytes)  # fmt: skip
    return DENSE_GEMV_ROWS if ok else 0


def _enable_dense_gemv(model, dtype: torch.dtype, device: torch.device) -> int:
    """Route the model's float linears' decode calls to ``zephyr::dense_gemv`` where :func:`dense_gemv_rows`
    says so (CUDA, kernels built); returns how many layers now use it."""
    from .kernel_build import ensure_built
    from .model import Linear

    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not ensure_built()[0]:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, Linear):
            m.gemv_rows = dense_gemv_rows(m, dtype)
            n += m.gemv_rows > 0
    return n


# Tokens per prefill chunk: bounds activation memory (a 4096-token chunk of a
# 7B model needs ~0.5 GB of activations) while keeping the GEMMs large.
PREFILL_TOKENS = 4096


class Zephyr:
    """A loaded model ready to generate. Build it with :meth:`from_pretrained`.

    Without a tokenizer only :meth:`generate_tokens` works (token ids in and out).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_seq_len: int = 4096,
                 dtype: Optional[torch.dtype] = None, cuda_graphs: Optional[bool] = None,
                 template: PromptTemplate = ZEPHYR, backend: Optional[str] = None, compile: Optional[bool] = None,
                 fused_attention: Optional[bool] = None, permuted_inputs: Optional[bool] = None,
                 dense_gemv: Optional[bool] = None):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_seq_len={max_seq_len} >= 2")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.device = model.tok_embeddings.weight.device
        self.dtype = dtype or model.tok_embeddings.weight.dtype
        if backend is None and self.device.type == "cpu":
            backend = "dense"  # dequantize once: the reference re-dequantizes every call (see backends/dense.py)
        self.kernels = {}
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                self.kernels[name] = m.prepare(self.dtype, backend=backend).name  # repack once, before capture
        if compile is None:
            compile = self.device.type == "cuda" and os.environ.get("ZEPHYR_COMPILE", "1") != "0"
        if fused_attention is None:
            fused_attention = self.device.type == "cuda" and os.environ.get("ZEPHYR_FUSED_ATTENTION", "1") != "0"
        self.fused_attention = bool(fused_attention) and _fused_attention_ok(model.args, self.dtype, self.device)
        # fused elementwise kernels (see model_ops.py); decode attention as one kernel (kernel_ops.decode_attention)
        if permuted_inputs is None:
            permuted_inputs = self.device.type == "cuda" and os.environ.get("ZEPHYR_PERMUTED_INPUTS", "1") != "0"
        # act-order layers' inputs written in their row order by the norms / SwiGLU in decode steps
        self.permuted_layers = model.fold_permutations() if permuted_inputs else 0
        # float (unquantized) layers at decode batch sizes through zephyr::dense_gemv (model.Linear)
        if dense_gemv is None:
            dense_gemv = self.device.type == "cuda" and os.environ.get("ZEPHYR_DENSE_GEMV", "1") != "0"
        self.dense_gemv_layers = _enable_dense_gemv(model, self.dtype, self.device) if dense_gemv else 0
        # the SwiGLU in the gate/up projection's kernel at decode batches (ZEPHYR_FUSED_SWIGLU=0: silu_mul after it)
        self.fused_swiglu = self.device.type == "cuda" and os.environ.get("ZEPHYR_FUSED_SWIGLU", "1") != "0"
        model.ops = ModelOps(compile=compile, fused_decode=self.fused_attention,
                             permuted_inputs=self.permuted_layers > 0, fused_swiglu=self.fused_swiglu)  # fmt: skip
        model.setup_cache(max_batch_size, max_seq_len, self.dtype)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.steps = DecodeGraphs(model, enabled=cuda_graphs)
        eos = set(model.args.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, ref, device=None, dtype: Optional[torch.dtype] = None, max_batch_size: int = 8,
                        max_seq_len: int = 4096, backend: Optional[str] = None, revision: Optional[str] = None,
                        cuda_graphs: Optional[bool] = None, compile: Optional[bool] = None,
                        fused_attention: Optional[bool] = None, permuted_inputs: Optional[bool] = None,
                        dense_gemv: Optional[bool] = None, tokenizer=None) -> "Zephyr":
        """Load a GPTQ or float checkpoint: a folder, ``repo`` or ``repo:branch``.

        ``device`` defaults to CUDA when present; ``dtype`` to fp16 on CUDA and fp32
        on the CPU; ``backend`` forces a kernel backend by name. The cache is
        allocated for ``max_batch_size`` rows of ``max_seq_len`` tokens.
        ``fused_attention`` (decode attention as one kernel) and ``permuted_inputs``
        (act-order layers fed inputs in their own row order) default to on with CUDA;
        ``dense_gemv`` (float layers' decode-sized calls through ``zephyr::dense_gemv``) also
        defaults to on with CUDA. ``ZEPHYR_FUSED_ATTENTION=0`` / ``ZEPHYR_PERMUTED_INPUTS=0`` /
        ``ZEPHYR_DENSE_GEMV=0`` turn them off.
        """
        folder = resolve_checkpoint(ref, revision)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _ = load_transformer(folder, device=device, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(folder)
        return cls(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                   dtype=dtype, cuda_graphs=cuda_graphs, backend=backend, compile=compile,
                   fused_attention=fused_attention, permuted_inputs=permuted_inputs, dense_gemv=dense_gemv)

    # ----------------------------------------------------------------- user API
    def chat(self, messages: Messages, cancel=None, **sampling) -> str:
        """The assistant's answer to ``messages`` (rendered with the Zephyr template)."""
        return "".join(self.stream(messages, cancel=cancel, **sampling))

    def stream(self, prompt_or_messages: Union[str, Messages], cancel=None, **sampling) -> Iterator[str]:
        """Yield the answer's text as it is generated.

        A string is one user turn after an empty system turn, as in the model card's
        prompt (:func:`zephyr_plugins.templates.zephyr_prompt`).
        """
        if isinstance(prompt_or_messages, str):
            prompt_or_messages = [{"role": "system", "content": ""}, {"role": "user", "content": prompt_or_messages}]
        prompt = self.template.render(prompt_or_messages)
        params = self._params(sampling, self.template.stop)
        for chunk in self.stream_complete(prompt, params, cancel):
            if chunk.text:
                yield chunk.text

    def generate(self, prompts: Sequence[str], cancel=None, **sampling) -> list[str]:
        """Raw completions of ``prompts`` (no template), batched with left padding."""
        return [c.text for c in self.complete(list(prompts), self._params(sampling), cancel)]

    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, cancel=None) -> list[list[int]]:
        """Generated token ids (EOS included when produced) for already-tokenized prompts."""
        out: list[list[int]] = []
        with self._lock:
            for i in range(0, len(prompt_ids), self.max_batch_size):
                batch = [list(map(int, p)) for p in prompt_ids[i : i + self.max_batch_size]]
                for p in batch:
                    self._check_length(p)
                streams = []
                for streams, _ in self._run(batch, params, cancel):
                    pass
                out.extend(list(s.ids) for s in streams)
        return out

    @staticmethod
    def _params(sampling: dict, template_stop: Sequence[str] = ()) -> SamplingParams:
        stop = tuple(sampling.pop("stop", None) or ()) + tuple(template_stop)
        return SamplingParams(stop=tuple(dict.fromkeys(stop)), **sampling)

    # --------------------------------------------------------- Generator protocol
    def complete(self, prompts: Sequence[str], params: SamplingParams, cancel=None, add_bos: bool = True) -> list[Completion]:
        """Generate for every prompt (in batches of ``max_batch_size``); see :class:`Generator`."""
        if isinstance(prompts, str):
            raise TypeError("complete() takes a list of prompts, not one string")
        ids = [self._encode(p, add_bos) for p in prompts]
        out: list[Completion] = []
        with self._lock:
            for i in range(0, len(ids), self.max_batch_size):
                batch = ids[i : i + self.max_batch_size]
                streams = None
                for streams, _ in self._run(batch, params, cancel):
                    pass
                for row, s in zip(batch, streams or []):
                    out.append(Completion(s.text, len(row), len(s.ids), s.finish_reason or "length"))
        return out

    def stream_complete(self, prompt: str, params: SamplingParams, cancel=None, add_bos: bool = True) -> Iterator[StreamChunk]:
        """Yield :class:`StreamChunk` pieces of one prompt; the last one carries ``finish_reason``."""
        ids = self._encode(prompt, add_bos)  # errors surface at the call, not at the first next()
        return self._stream(ids, params, cancel)

    def _stream(self, ids, params, cancel) -> Iterator[StreamChunk]:
        with self._lock:
            for streams, pieces in self._run([ids], params, cancel):
                s, piece = streams[0], pieces[0]
                if piece or s.finished:
                    yield StreamChunk(piece, len(ids), len(s.ids), s.finish_reason if s.finished else None)

    def _encode(self, prompt: str, add_bos: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (the checkpoint ships none): pass tokenizer= to from_pretrained")
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer(prompt, add_special_tokens=add_bos)["input_ids"]
        self._check_length(ids)
        return ids

    def _check_length(self, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty (and add_bos=False): nothing to condition on")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_seq_len={self.max_seq_len} leaves no room to generate")

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def _run(self, prompts: list[list[int]], params: SamplingParams, cancel):
        """Generate for up to ``max_batch_size`` token lists; yields ``(streams, new pieces)`` per step."""
        n = len(prompts)
        bsz = self.steps.bucket(n)
        rows = prompts + [prompts[0]] * (bsz - n)  # bucket filler rows: copies of row 0, ignored
        longest = max(len(r) for r in rows)
        max_new = min(params.max_new_tokens, self.max_seq_len - longest)
        dev = self.device
        pad = torch.tensor([longest - len(r) for r in rows], device=dev)
        tokens = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=dev)  # [B, S] left-padded
        streams = [TextStream(self.tokenizer, params.stop) for _ in range(n)]

        sampler = Sampler(params, bsz, self.model.args.vocab_size, dev)
        sampler.observe(tokens, torch.arange(longest, device=dev).unsqueeze(0) >= pad.unsqueeze(1))
        cur = sampler(self._prefill(tokens, pad, no_pad=all(len(r) == longest for r in rows)))  # [B]
        ring = _HostRing(bsz, dev)
        for step in range(max_new):
            host = ring.fetch_async(cur)
            if step + 1 < max_new:
                # Launch the next step before reading this one's tokens, so the host's
                # bookkeeping overlaps the GPU's work (at most one wasted step at the end).
                cur = sampler(self.steps(cur, longest + step, pad))
            pieces = [""] * n
            toks = host.wait()
            for i, s in enumerate(streams):
                if s.finished:
                    continue
                if toks[i] in self.eos_token_ids:
                    s.ids.append(toks[i])
                    pieces[i] = s.finish("stop")
                else:
                    pieces[i] = s.push(toks[i])
                    if not s.finished and step + 1 == max_new:
                        pieces[i] += s.finish("length")
            if cancel is not None and cancel.is_set():
                for i, s in enumerate(streams):
                    pieces[i] += s.finish("cancelled")
            yield streams, pieces
            if all(s.finished for s in streams):
                break

    def _prefill(self, tokens: torch.Tensor, pad: torch.Tensor, no_pad: bool) -> torch.Tensor:
        """Run the prompt through the model in chunks; logits of its last position ``[B, V]``."""
        bsz, length = tokens.shape
        chunk = max(1, PREFILL_TOKENS // bsz)
        window = self.model.args.sliding_window
        logits = None
        for start in range(0, length, chunk):
            part = tokens[:, start : start + chunk]
            end = start + part.shape[1]
            fresh = start == 0 and no_pad and (window is None or end <= window)
            kv_len = self.steps.kv_len(end - 1)
            logits = self.model(part, start, pad, kv_len=kv_len, last_only=True, causal_fresh=fresh)
        return logits


class _HostRing:
    """Device -> host copies of each step's tokens into pinned buffers, without a full sync."""

    def __init__(self, bsz: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bufs = [torch.zeros(bsz, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() for _ in range(2)] if self.cuda else None
        self.i = 0

    def fetch_async(self, tokens: torch.Tensor) -> "_Pending":
        self.i ^= 1
        buf = self.bufs[self.i]
        buf.copy_(tokens, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = self.events[self.i]
            event.record()
        return _Pending(buf, event)


class _Pending:
    def __init__(self, buf, event):
        self.buf, self.event = buf, event

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.buf.tolist()
