"""Where the LangChain adapter's tokens come from: one small interface, two backends.

A backend turns a rendered prompt into text:

- :class:`InProcessBackend` wraps any :class:`~zephyr_plugins.generation_api.Generator`
  (by default the runtime's ``Zephyr``, loaded once per checkpoint, device and
  dtype and shared by every adapter instance that names it: :func:`shared_generator`);
- :class:`~zephyr_plugins.adapters.langchain_http.OpenAIBackend` talks to an
  OpenAI-compatible server (``zephyr-plugins serve`` or vLLM with our plugin).

Both offer ``render``, ``complete``/``stream`` and their async twins
``acomplete``/``astream``; async calls never block the event loop.

Example::

    >>> gen = shared_generator("TheBloke/zephyr-7B-beta-GPTQ:main", device="cuda")   # doctest: +SKIP
    >>> InProcessBackend(gen, "zephyr").complete(["<|user|>\\nHi</s>\\n<|assistant|>\\n"], SamplingParams())  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Protocol, Sequence, Union

from zephyr_plugins.generation_api import Completion, Generator, SamplingParams, StreamChunk

from .langchain_messages import AUTO, render_named, render_with_tokenizer

# A rendered prompt, or role dicts for a server that applies its own chat template.
Prompt = Union[str, list]

DTYPES = ("float16", "bfloat16", "float32")


class Backend(Protocol):
    """The interface :class:`ChatZephyr` and :class:`ZephyrLLM` generate through."""

    model_name: str

    def render(self, messages: Sequence[dict], template: str) -> Prompt: ...

    def complete(self, prompts: Sequence[Prompt], params: SamplingParams, model: Optional[str] = None) -> list[Completion]: ...

    def stream(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event, model: Optional[str] = None) -> Iterator[StreamChunk]: ...

    async def acomplete(self, prompts: Sequence[Prompt], params: SamplingParams, model: Optional[str] = None) -> list[Completion]: ...

    def astream(self, prompt: Prompt, params: SamplingParams, model: Optional[str] = None) -> AsyncIterator[StreamChunk]: ...


# ---------------------------------------------------------------------------- in-process
class InProcessBackend:
    """Generation in this process through a :class:`Generator` (thread-safe by contract)."""

    def __init__(self, generator: Generator, model_name: str):
        for attr in ("complete", "stream_complete"):
            if not callable(getattr(generator, attr, None)):
                raise ValueError(f"generator={generator!r} has no {attr}() method; it must implement the Generator protocol")
        self.generator = generator
        self.model_name = model_name

    def render(self, messages: Sequence[dict], template: str) -> str:
        if template == AUTO:
            return render_with_tokenizer(messages, getattr(self.generator, "tokenizer", None))
        return render_named(messages, template)

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise ValueError(
                f"model={model!r} per call is not supported in-process (this instance serves {self.model_name!r}); "
                "create another ChatZephyr for another checkpoint"
            )

    def complete(self, prompts, params, model=None, cancel=None) -> list[Completion]:
        self._check_model(model)
        _check_str_prompts(prompts)
        out = list(self.generator.complete(list(prompts), params, cancel))
        if len(out) != len(prompts):
            raise RuntimeError(f"generator returned {len(out)} completions for {len(prompts)} prompts")
        return out

    def stream(self, prompt, params, cancel, model=None) -> Iterator[StreamChunk]:
        self._check_model(model)
        _check_str_prompts([prompt])
        return iter(self.generator.stream_complete(prompt, params, cancel))

    async def acomplete(self, prompts, params, model=None) -> list[Completion]:
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, functools.partial(self.complete, prompts, params, model, cancel))
        finally:
            # A cancelled await leaves the thread running: ask it to stop early.
            cancel.set()

    async def astream(self, prompt, params, model=None) -> AsyncIterator[StreamChunk]:
        cancel = threading.Event()
        async for chunk in iterate_in_thread(lambda: self.stream(prompt, params, cancel, model), cancel):
            yield chunk


def _check_str_prompts(prompts: Sequence[Any]) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}; the in-process backend takes rendered strings")


async def iterate_in_thread(make_iter: Callable[[], Iterator[Any]], cancel: threading.Event) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread and yield its items on the event loop.

    When the consumer stops early (break, error, task cancelled) ``cancel`` is
    set so the producer stops at its next step instead of finishing the answer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us: nobody is listening any more
            cancel.set()

    def pump() -> None:
        it = None
        try:
            it = make_iter()
            for item in it:
                put((item, None))
                if cancel.is_set():
                    break
            put((done, None))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((done, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    worker = loop.run_in_executor(None, pump)
    try:
        while True:
            item, exc = await queue.get()
            if item is done:
                if exc is not None:
                    raise exc
                break
            yield item
    finally:
        cancel.set()
        try:
            await asyncio.shield(worker)
        except BaseException:  # the worker's own error was already delivered or is moot
            pass


# ---------------------------------------------------------------------------- shared models
_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}


def shared_generator(model: str, device: Optional[str] = None, dtype: Optional[str] = None, loader: Optional[Callable] = None):
    """The runtime's ``Zephyr`` for a checkpoint, loaded once and shared.

    Instances naming the same checkpoint folder (after resolving ``repo:branch``
    and symlinks), device and dtype get the same object, so a model is in
    memory once and creating adapters (``ZephyrLLM(model=...).invoke(...)`` in
    a loop) never reloads it; :func:`release_shared_models` lets go of them.
    ``loader`` (``(folder, device, dtype) -> Generator``) replaces the runtime, for tests.
    """
    from zephyr_plugins.checkpoint import resolve_checkpoint

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed values: {list(DTYPES)} or None (the runtime's default)")
    folder = os.path.realpath(resolve_checkpoint(model))
    # Spell the runtime's defaults out, so device=None and device="cpu" share a model.
    import torch

    device = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    key = (folder, device, dtype, loader)
    with _SHARED_LOCK:
        gen = _SHARED.get(key)
        if gen is not None:
            return gen
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    # One load per key; loads of different checkpoints do not wait on each other.
    with key_lock:
        with _SHARED_LOCK:
            gen = _SHARED.get(key)
        if gen is None:
            gen = (loader or load_runtime)(folder, device, dtype)
            with _SHARED_LOCK:
                _SHARED[key] = gen
    return gen


def release_shared_models() -> int:
    """Forget every shared model (they are freed once no adapter uses them); returns how many."""
    with _SHARED_LOCK:
        n = len(_SHARED)
        _SHARED.clear()
        _KEY_LOCKS.clear()
    return n


def load_runtime(folder: str, device: Optional[str], dtype: Optional[str]):
    """Load ``folder`` with the runtime's ``Zephyr`` (``zephyr_plugins.runtime``)."""
    try:
        from zephyr_plugins.runtime import Zephyr
    except ImportError as exc:
        raise ImportError(
            "the in-process backend needs zephyr_plugins.runtime.Zephyr, which failed to import "
            f"({exc}); pass generator=<a Generator> or base_url=<an OpenAI-compatible server> instead"
        ) from exc
    kwargs: dict[str, Any] = {}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    return Zephyr.from_pretrained(folder, **kwargs)
