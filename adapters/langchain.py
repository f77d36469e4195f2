"""LangChain models for Zephyr GPTQ checkpoints, with the Zephyr prompt template built in.

Install with ``pip install "zephyr-plugins[langchain]"``.

Example::

    from zephyr_plugins.adapters.langchain import ChatZephyr, ZephyrLLM

    chat = ChatZephyr(model="TheBloke/zephyr-7B-beta-GPTQ:main")            # in this process
    chat = ChatZephyr(base_url="http://127.0.0.1:8000/v1", model="zephyr")  # a served model
    chat.invoke([("system", "You are a pirate."), ("human", "How many helicopters can a human eat?")])
    for chunk in chat.stream("Tell me about AI"):
        print(chunk.content, end="")

    llm = ZephyrLLM(model="path/to/checkpoint")
    llm.invoke("Tell me about AI")          # wrapped in the Zephyr template; raw=True sends it as is

Both generate in-process (the runtime's ``Zephyr``, one copy per checkpoint
shared by every instance, safe to call from many threads) or through an
OpenAI-compatible server (``base_url``). Stop sequences of any length are cut
exactly, in ``invoke`` and in ``stream``. Tool calling and structured output
are not supported: ``bind_tools`` and ``with_structured_output`` say so.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from zephyr_plugins.adapters import require

require("langchain_core", "langchain")

from langchain_core.callbacks import (  # noqa: E402
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams  # noqa: E402
from langchain_core.language_models.llms import LLM  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage  # noqa: E402
from langchain_core.messages.ai import UsageMetadata  # noqa: E402
from langchain_core.outputs import (  # noqa: E402
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from pydantic import Field  # noqa: E402

from zephyr_plugins.generation_api import Completion  # noqa: E402

from .langchain_common import Final, ZephyrFields  # noqa: E402
from .langchain_messages import to_role_dicts  # noqa: E402

__all__ = ["ChatZephyr", "ZephyrLLM"]

PROVIDER = "zephyr"
_NO_TOOLS = (
    "{cls}.{method}() is not supported: Zephyr-7B-beta was not trained for tool calling or JSON output, and "
    "dropping tools silently would make agents misbehave. Use a plain prompt and parse the answer yourself "
    "(e.g. langchain_core.output_parsers.JsonOutputParser), or a model with native tool support."
)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=prompt_tokens, output_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


class ChatZephyr(ZephyrFields, BaseChatModel):
    """A chat model on a Zephyr GPTQ checkpoint, in-process or served.

    Messages are rendered with ``prompt_template`` (default: the Zephyr
    layout). If the last message is an AI message, the model continues it.
    Sampling defaults are the model card's (temperature 0.7, top_p 0.95,
    top_k 40, repetition_penalty 1.1, 512 new tokens); any of them, ``seed``
    and ``stop`` can be passed per call.

    Example::

        >>> chat = ChatZephyr(model="TheBloke/zephyr-7B-beta-GPTQ:main", temperature=0)   # doctest: +SKIP
        >>> chat.invoke([("system", "Answer in one word."), ("human", "Capital of France?")]).content  # doctest: +SKIP
        'Paris'
    """

    model_config = ZephyrFields.model_config  # BaseChatModel's would ignore misspelt options

    @property
    def _llm_type(self) -> str:
        return "zephyr-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._zephyr_params()

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    # -------------------------------------------------------------- not supported
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any):
        raise NotImplementedError(_NO_TOOLS.format(cls=type(self).__name__, method="bind_tools"))

    def with_structured_output(self, schema: Any, **kwargs: Any):
        raise NotImplementedError(_NO_TOOLS.format(cls=type(self).__name__, method="with_structured_output"))

    # -------------------------------------------------------------- generation
    def _prompt(self, messages: list[BaseMessage]):
        return self._get_backend().render(to_role_dicts(messages), self.prompt_template)

    def _result(self, c: Completion, model: Optional[str]) -> ChatResult:
        meta = {"model_name": model or self.model_name, "finish_reason": c.finish_reason, "model_provider": PROVIDER}
        msg = AIMessage(content=c.text, usage_metadata=_usage(c.prompt_tokens, c.completion_tokens), response_metadata=meta)
        return ChatResult(
            generations=[ChatGeneration(message=msg, generation_info={"finish_reason": c.finish_reason})],
            llm_output={"model_name": meta["model_name"], "token_usage": dict(msg.usage_metadata)},
        )

    def _chunk(self, item: str | Final, model: Optional[str]) -> ChatGenerationChunk:
        if isinstance(item, str):
            return ChatGenerationChunk(message=AIMessageChunk(content=item))
        # The last chunk alone carries usage and model name, so summing chunks counts them once.
        meta = {"model_name": model or self.model_name, "finish_reason": item.finish_reason, "model_provider": PROVIDER}
        msg = AIMessageChunk(
            content="",
            usage_metadata=_usage(item.prompt_tokens, item.completion_tokens),
            response_metadata=meta,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=msg, generation_info={"finish_reason": item.finish_reason})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        req = self._request(stop, kwargs, self._template_for_stops())
        return self._result(self._complete([self._prompt(messages)], req)[0], req.model)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> ChatResult:
        req = self._request(stop, kwargs, self._template_for_stops())
        return self._result((await self._acomplete([self._prompt(messages)], req))[0], req.model)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel.stream reports each chunk to on_llm_new_token itself.
        req = self._request(stop, kwargs, self._template_for_stops())
        for item in self._stream_text(self._prompt(messages), req):
            yield self._chunk(item, req.model)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        req = self._request(stop, kwargs, self._template_for_stops())
        async for item in self._astream_text(self._prompt(messages), req):
            yield self._chunk(item, req.model)

    def _template_for_stops(self) -> Optional[str]:
        return self.prompt_template


class ZephyrLLM(ZephyrFields, LLM):
    """A string-in, string-out LLM on a Zephyr GPTQ checkpoint, in-process or served.

    Each prompt becomes one user turn in ``prompt_template`` (default: the
    Zephyr layout, with the model card's empty system turn) unless
    ``raw=True``, which sends prompts exactly as given.

    Example::

        >>> llm = ZephyrLLM(model="TheBloke/zephyr-7B-beta-GPTQ:main", max_tokens=64)  # doctest: +SKIP
        >>> llm.invoke("Tell me about AI")  # doctest: +SKIP
    """

    raw: bool = Field(default=False, description="Send prompts as given, without any template.")
    system_prompt: Optional[str] = Field(
        default=None,
        description="A system turn before each prompt. None: the template's default (the Zephyr model card's "
        "empty system turn for 'zephyr', none for other templates).",
    )

    model_config = ZephyrFields.model_config

    @property
    def _llm_type(self) -> str:
        return "zephyr-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**self._zephyr_params(), "raw": self.raw, "system_prompt": self.system_prompt}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="llm",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    def _prompt(self, prompt: str):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt is {type(prompt).__name__}; ZephyrLLM takes strings")
        if self.raw:
            return prompt
        system = self.system_prompt
        if system is None and self.prompt_template == "zephyr":
            system = ""  # the model card's single-turn prompt has an empty system turn
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        return self._get_backend().render(messages, self.prompt_template)

    def _template_for_stops(self) -> Optional[str]:
        return None if self.raw else self.prompt_template

    @staticmethod
    def _generation(c: Completion) -> list[Generation]:
        info = {"finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
        return [Generation(text=c.text, generation_info=info)]

    def _llm_result(self, done: list[Completion], model: Optional[str]) -> LLMResult:
        usage = {
            "prompt_tokens": sum(c.prompt_tokens for c in done),
            "completion_tokens": sum(c.completion_tokens for c in done),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return LLMResult(
            generations=[self._generation(c) for c in done],
            llm_output={"model_name": model or self.model_name, "token_usage": usage},
        )

    def _call(self, prompt: str, stop: Optional[list[str]] = None, run_manager=None, **kwargs: Any) -> str:
        return self._generate([prompt], stop=stop, run_manager=run_manager, **kwargs).generations[0][0].text

    def _generate(
        self,
        prompts: list[str],
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> LLMResult:
        req = self._request(stop, kwargs, self._template_for_stops())
        if self.streaming:  # token by token, so on_llm_new_token fires during invoke()
            return self._llm_result([self._streamed(p, req, run_manager) for p in prompts], req.model)
        # One call for all prompts: the in-process runtime batches them.
        return self._llm_result(self._complete([self._prompt(p) for p in prompts], req), req.model)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> LLMResult:
        req = self._request(stop, kwargs, self._template_for_stops())
        if self.streaming:
            return self._llm_result([await self._astreamed(p, req, run_manager) for p in prompts], req.model)
        return self._llm_result(await self._acomplete([self._prompt(p) for p in prompts], req), req.model)

    def _streamed(self, prompt: str, req, run_manager) -> Completion:
        text, final = "", None
        for item in self._stream_text(self._prompt(prompt), req):
            if isinstance(item, Final):
                final = item
            else:
                text += item
                if run_manager:
                    run_manager.on_llm_new_token(item, chunk=GenerationChunk(text=item))
        return Completion(text, final.prompt_tokens, final.completion_tokens, final.finish_reason)

    async def _astreamed(self, prompt: str, req, run_manager) -> Completion:
        text, final = "", None
        async for item in self._astream_text(self._prompt(prompt), req):
            if isinstance(item, Final):
                final = item
            else:
                text += item
                if run_manager:
                    await run_manager.on_llm_new_token(item, chunk=GenerationChunk(text=item))
        return Completion(text, final.prompt_tokens, final.completion_tokens, final.finish_reason)

    def _stream(
        self,
        prompt: str,
        stop: Optional[list[str]] = None,
        run_manager: Optional[CallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        req = self._request(stop, kwargs, self._template_for_stops())
        for item in self._stream_text(self._prompt(prompt), req):
            chunk = self._llm_chunk(item)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: Optional[list[str]] = None,
        run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        req = self._request(stop, kwargs, self._template_for_stops())
        async for item in self._astream_text(self._prompt(prompt), req):
            chunk = self._llm_chunk(item)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    @staticmethod
    def _llm_chunk(item: str | Final) -> GenerationChunk:
        if isinstance(item, str):
            return GenerationChunk(text=item)
        info = {"finish_reason": item.finish_reason, "prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens}
        return GenerationChunk(text="", generation_info=info)
