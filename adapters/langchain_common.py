"""Fields and generation plumbing shared by ``ChatZephyr`` and ``ZephyrLLM``.

Everything here is checked when the object is created (template name,
sampling values, where the model comes from); the model itself is loaded on
the first call, so creating adapters is cheap.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from zephyr_plugins import generation_api as api
from zephyr_plugins.generation_api import Completion, SamplingParams, StreamChunk

from .langchain_backends import DTYPES, Backend, InProcessBackend, Prompt, shared_generator
from .langchain_messages import check_template_name, template_stops
from .langchain_stops import StopCutter, clean_stops, cut_at_stop

# Per-call keyword arguments accepted by invoke/stream/batch (beside ``stop``).
CALL_OPTIONS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "model")
# Routing hints LangChain itself may pass down; they do not change the request.
_IGNORED_OPTIONS = ("stream",)


@dataclass
class Request:
    """One call, resolved: sampling parameters, every stop string, a per-call model name."""

    params: SamplingParams
    stops: tuple[str, ...]
    model: Optional[str]


@dataclass
class Final:
    """What the end of a stream reports."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ZephyrFields(BaseModel):
    """Connection, template and sampling fields of the Zephyr LangChain adapters."""

    # extra="forbid": a misspelt option (``tempreature=``) fails instead of being ignored.
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=(), extra="forbid")

    model: Optional[str] = Field(
        default=None,
        description="In-process: a checkpoint folder or Hub id 'repo[:branch]' (e.g. "
        "'TheBloke/zephyr-7B-beta-GPTQ:main'). With base_url: the model name the server serves.",
    )
    base_url: Optional[str] = Field(
        default=None,
        description="An OpenAI-compatible server ('http://127.0.0.1:8000/v1'): `zephyr-plugins serve` or vLLM "
        "with the zephyr plugin. Unset: generate in this process.",
    )
    api_key: Optional[SecretStr] = Field(default=None, description="Bearer token for base_url (optional).")
    timeout: Optional[float] = Field(default=None, description="Seconds to wait for the server (base_url only).")
    max_retries: int = Field(default=2, ge=0, description="Retries of failed connections to the server.")
    generator: Optional[Any] = Field(
        default=None,
        exclude=True,
        description="Any zephyr_plugins.generation_api.Generator to use instead of loading `model` (dependency injection).",
    )
    device: Optional[str] = Field(default=None, description="In-process device ('cpu', 'cuda'); default: the runtime's choice.")
    dtype: Optional[str] = Field(default=None, description=f"In-process activation dtype, one of {list(DTYPES)}; default: the runtime's.")
    prompt_template: str = Field(
        default="zephyr",
        description="'zephyr' (built in), 'auto' (the checkpoint's own chat template) or a template registered "
        "through the register_prompt_templates plugin hook.",
    )
    temperature: float = Field(default=api.DEFAULT_TEMPERATURE, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(default=api.DEFAULT_TOP_P, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(default=api.DEFAULT_TOP_K, description="Sample among the k likeliest tokens; 0 = no limit.")
    repetition_penalty: float = Field(default=api.DEFAULT_REPETITION_PENALTY, description="> 1 discourages repeats.")
    max_tokens: int = Field(
        default=api.DEFAULT_MAX_NEW_TOKENS,
        validation_alias=AliasChoices("max_tokens", "max_new_tokens"),
        description="Most new tokens per answer (alias: max_new_tokens).",
    )
    stop: Optional[list[str]] = Field(
        default=None, description="Stop sequences (any length); the answer is cut right before the first one."
    )
    seed: Optional[int] = Field(default=None, description="Seed for reproducible sampling.")
    streaming: bool = Field(default=False, description="Generate through the streaming path even in invoke().")

    _backend: Optional[Backend] = PrivateAttr(default=None)
    _backend_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _check_fields(self):
        if self.base_url is not None and self.generator is not None:
            raise ValueError("give base_url (a server) or generator (in-process), not both")
        if self.base_url is not None:
            if not self.model:
                raise ValueError("base_url needs model=<the model name the server serves>")
            for name in ("device", "dtype"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}= applies to the in-process backend only, not to base_url")
        elif self.generator is None and not self.model:
            raise ValueError("give model=<checkpoint folder or 'repo[:branch]'>, base_url= and model=, or generator=")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed values: {list(DTYPES)}")
        check_template_name(self.prompt_template)
        self.stop = list(clean_stops(self.stop)) or None
        self._sampling({})  # validates the sampling fields now, not on the first call
        return self

    # -------------------------------------------------------------- backend
    @property
    def model_name(self) -> str:
        """The name reported in response metadata and traces."""
        return self.model or getattr(self.generator, "name", None) or type(self.generator).__name__

    def _get_backend(self) -> Backend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _make_backend(self) -> Backend:
        if self.base_url is not None:
            from .langchain_http import OpenAIBackend

            key = self.api_key.get_secret_value() if self.api_key else None
            return OpenAIBackend(self.base_url, self.model, key, self.timeout, self.max_retries)
        gen = self.generator or shared_generator(self.model, self.device, self.dtype)
        return InProcessBackend(gen, self.model_name)

    # -------------------------------------------------------------- requests
    def _sampling(self, options: dict[str, Any], stop: Optional[list[str]] = None) -> SamplingParams:
        unknown = sorted(set(options) - set(CALL_OPTIONS) - set(_IGNORED_OPTIONS))
        if unknown:
            raise TypeError(f"unknown keyword arguments {unknown}; allowed per call: ['stop', {', '.join(map(repr, CALL_OPTIONS))}]")
        get = lambda name: options[name] if options.get(name) is not None else getattr(self, name)  # noqa: E731
        return SamplingParams(
            max_new_tokens=get("max_tokens"),
            temperature=get("temperature"),
            top_p=get("top_p"),
            top_k=get("top_k"),
            repetition_penalty=get("repetition_penalty"),
            stop=clean_stops(stop),
            seed=get("seed"),
        )

    def _request(self, stop: Optional[list[str]], options: dict[str, Any], template: Optional[str]) -> Request:
        # The caller's stop list replaces the instance's; the template's own
        # end-of-turn strings always apply, so an answer never runs into a new turn.
        user = clean_stops(stop if stop is not None else self.stop)
        stops = clean_stops(user + (template_stops(template) if template else ()))
        return Request(self._sampling(options, list(stops)), stops, options.get("model"))

    # -------------------------------------------------------------- generation
    def _complete(self, prompts: list[Prompt], req: Request) -> list[Completion]:
        done = self._get_backend().complete(prompts, req.params, model=req.model)
        return [_cut(c, req.stops) for c in done]

    async def _acomplete(self, prompts: list[Prompt], req: Request) -> list[Completion]:
        done = await self._get_backend().acomplete(prompts, req.params, model=req.model)
        return [_cut(c, req.stops) for c in done]

    def _stream_text(self, prompt: Prompt, req: Request) -> Iterator[str | Final]:
        """Text pieces, cut exactly at the first stop sequence, then one :class:`Final`."""
        cancel = threading.Event()
        cutter = StopCutter(req.stops)
        it = self._get_backend().stream(prompt, req.params, cancel, model=req.model)
        last: Optional[StreamChunk] = None
        try:
            for chunk in it:
                last = chunk
                piece = cutter.feed(chunk.text)
                if piece:
                    yield piece
                if cutter.stopped:
                    break
        finally:
            cancel.set()  # stops the producer if we left early (stop string, consumer break)
            close = getattr(it, "close", None)
            if close is not None:
                close()
        tail = cutter.flush()
        if tail:
            yield tail
        yield _final(last, cutter.stopped)

    async def _astream_text(self, prompt: Prompt, req: Request) -> AsyncIterator[str | Final]:
        cutter = StopCutter(req.stops)
        it = self._get_backend().astream(prompt, req.params, model=req.model)
        last: Optional[StreamChunk] = None
        try:
            async for chunk in it:
                last = chunk
                piece = cutter.feed(chunk.text)
                if piece:
                    yield piece
                if cutter.stopped:
                    break
        finally:
            await it.aclose()
        tail = cutter.flush()
        if tail:
            yield tail
        yield _final(last, cutter.stopped)

    def _zephyr_params(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "base_url": self.base_url,
            "prompt_template": self.prompt_template,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }


def _cut(c: Completion, stops: tuple[str, ...]) -> Completion:
    # Backends cut at stop strings themselves; this makes "exactly" hold for any backend.
    text, found = cut_at_stop(c.text, stops)
    if not found:
        return c
    return Completion(text, c.prompt_tokens, c.completion_tokens, "stop")


def _final(last: Optional[StreamChunk], stopped: bool) -> Final:
    if last is None:
        return Final(0, 0, "stop")
    return Final(last.prompt_tokens, last.completion_tokens, "stop" if stopped else (last.finish_reason or "stop"))
