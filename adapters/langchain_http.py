"""The OpenAI-compatible server backend (``zephyr-plugins serve``, vLLM with our plugin).

Which endpoint, and why:

- Named templates (``"zephyr"``, the default, or a plugin's) go to
  ``/v1/completions`` with the prompt rendered here. The prompt is then the same
  byte for byte as in-process, whatever chat template the server was started
  with, and it gets its BOS token as in training: the chat endpoint expects a
  template to write its own BOS, and Zephyr's template has none (one token
  fewer, measured in tests/test_langchain_server.py).
- ``prompt_template="auto"`` means "the checkpoint's own chat template", which
  lives on the server: those conversations go to ``/v1/chat/completions``, with
  vLLM's ``continue_final_message`` to continue a partial assistant message.

Streaming reads server-sent events; usage comes from ``stream_options.include_usage``.
``max_retries`` retries failed connections (never a request the server took).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from zephyr_plugins.adapters import require
from zephyr_plugins.generation_api import Completion, SamplingParams, StreamChunk

from .langchain_backends import Prompt
from .langchain_messages import AUTO, continues_final, render_named

httpx = require("httpx", "langchain")


class ServerError(RuntimeError):
    """The server answered with an HTTP error; the message carries its body."""


class OpenAIBackend:
    """Talks to ``base_url`` (ending in ``/v1``) serving ``model``."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: Optional[float] = None, max_retries: int = 2):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout) if timeout else httpx.Timeout(600.0, connect=10.0)
        self.max_retries = max_retries
        self._client: Optional[Any] = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- requests
    def render(self, messages: Sequence[dict], template: str) -> Prompt:
        if template == AUTO:
            return [dict(m) for m in messages]
        return render_named(messages, template)

    def _request(self, prompt: Prompt, params: SamplingParams, stream: bool, model: Optional[str]) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": model or self.model_name,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "repetition_penalty": params.repetition_penalty,
        }
        if params.top_k > 0:  # vLLM's own default is "no top-k"
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if isinstance(prompt, str):
            body["prompt"] = prompt
            return "/completions", body
        body["messages"] = prompt
        if continues_final(prompt):
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        return "/chat/completions", body

    def _client_sync(self):
        with self._lock:
            if self._client is None:
                transport = httpx.HTTPTransport(retries=self.max_retries)
                self._client = httpx.Client(transport=transport, timeout=self.timeout, headers=self.headers)
            return self._client

    def _client_async(self):
        # One per call: an AsyncClient belongs to the event loop it was used on.
        transport = httpx.AsyncHTTPTransport(retries=self.max_retries)
        return httpx.AsyncClient(transport=transport, timeout=self.timeout, headers=self.headers)

    # -------------------------------------------------------------- sync
    def complete(self, prompts, params, model=None) -> list[Completion]:
        client = self._client_sync()
        if len(prompts) == 1:
            return [self._complete_one(client, prompts[0], params, model)]
        from concurrent.futures import ThreadPoolExecutor

        # The server batches concurrent requests itself (continuous batching).
        with ThreadPoolExecutor(max_workers=min(8, len(prompts))) as pool:
            return list(pool.map(lambda p: self._complete_one(client, p, params, model), prompts))

    def _complete_one(self, client, prompt, params, model) -> Completion:
        path, body = self._request(prompt, params, stream=False, model=model)
        resp = client.post(self.base_url + path, json=body)
        _raise_for_status(resp, path)
        return _parse_completion(resp.json(), path)

    def stream(self, prompt, params, cancel: threading.Event, model=None) -> Iterator[StreamChunk]:
        path, body = self._request(prompt, params, stream=True, model=model)
        parser = _SSEParser(path)
        # Leaving the with-block closes the connection, which aborts the request server-side.
        with self._client_sync().stream("POST", self.base_url + path, json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for_status(resp, path)
            for line in resp.iter_lines():
                if cancel.is_set():
                    return
                chunk = parser.feed(line)
                if chunk is not None:
                    yield chunk
        yield parser.final()

    # -------------------------------------------------------------- async
    async def acomplete(self, prompts, params, model=None) -> list[Completion]:
        async with self._client_async() as client:

            async def one(prompt):
                path, body = self._request(prompt, params, stream=False, model=model)
                resp = await client.post(self.base_url + path, json=body)
                _raise_for_status(resp, path)
                return _parse_completion(resp.json(), path)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def astream(self, prompt, params, model=None) -> AsyncIterator[StreamChunk]:
        path, body = self._request(prompt, params, stream=True, model=model)
        parser = _SSEParser(path)
        async with self._client_async() as client:
            async with client.stream("POST", self.base_url + path, json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _raise_for_status(resp, path)
                async for line in resp.aiter_lines():
                    chunk = parser.feed(line)
                    if chunk is not None:
                        yield chunk
        yield parser.final()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _raise_for_status(resp, path: str) -> None:
    if resp.status_code >= 400:
        raise ServerError(f"POST {path} answered HTTP {resp.status_code}: {resp.text[:1000]}")


def _parse_completion(data: dict, path: str) -> Completion:
    try:
        choice = data["choices"][0]
        text = choice["text"] if path == "/completions" else (choice["message"].get("content") or "")
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason") or "stop",
        )
    except (KeyError, IndexError, TypeError) as exc:
        raise ServerError(f"POST {path}: unexpected response {json.dumps(data)[:500]} ({exc!r})") from None


class _SSEParser:
    """Server-sent events of an OpenAI stream -> StreamChunks; the usage arrives last."""

    def __init__(self, path: str):
        self.path = path
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None

    def feed(self, line: str) -> Optional[StreamChunk]:
        if not line.startswith("data:"):
            return None  # blank separators, comments, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None
        data = json.loads(payload)
        if "error" in data:
            raise ServerError(f"POST {self.path}: stream error {json.dumps(data['error'])[:500]}")
        usage = data.get("usage")
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens", 0))
            self.completion_tokens = int(usage.get("completion_tokens", 0))
        text = ""
        for choice in data.get("choices") or ():
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if not text:
            return None
        return StreamChunk(text=text, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    def final(self) -> StreamChunk:
        return StreamChunk("", self.prompt_tokens, self.completion_tokens, self.finish_reason or "stop")
