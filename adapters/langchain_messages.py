"""LangChain messages -> role dicts -> one prompt string.

``prompt_template`` names how a conversation becomes a prompt:

- ``"zephyr"`` (the default): the Zephyr-7B-beta layout, built in;
- ``"auto"``: the checkpoint tokenizer's own chat template (``apply_chat_template``);
- any other name registered through the ``register_prompt_templates`` plugin hook.

A conversation whose last message is an assistant message is a partial answer
to continue: the prompt ends inside that message, without its end-of-turn.

Example::

    >>> from langchain_core.messages import HumanMessage, SystemMessage
    >>> msgs = to_role_dicts([SystemMessage("Be brief."), HumanMessage("Hi")])
    >>> render_named(msgs, "zephyr")
    '<|system|>\\nBe brief.</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\n'
"""

from __future__ import annotations

from typing import Any, Sequence

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

AUTO = "auto"

_TOOLS_OUT_OF_SCOPE = (
    "tool calling is not supported by the Zephyr adapter yet (Zephyr-7B-beta was not trained for it); "
    "drop the tool messages, or render tool results into a human message yourself"
)
_CHAT_ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "ai": "assistant"}


def check_template_name(name: str) -> str:
    """Validate a ``prompt_template`` value before any model is loaded."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"prompt_template={name!r} must be a non-empty string")
    if name != AUTO:
        from zephyr_plugins.templates import get_template

        get_template(name)  # raises ValueError naming the registered templates
    return name


def template_stops(name: str) -> tuple[str, ...]:
    """The stop strings a named template declares (none for ``"auto"``: the EOS token ends turns)."""
    if name == AUTO:
        return ()
    from zephyr_plugins.templates import get_template

    return tuple(get_template(name).stop)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"{where} content[{j}] is a {kind!r} block; the Zephyr adapter takes text only")
    return "".join(parts)


def to_role_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` for LangChain messages.

    Raises ``NotImplementedError`` for tool messages and tool calls (out of
    scope) and ``ValueError`` for non-text content or unknown roles.
    """
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}] ({type(m).__name__})"
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            if m.tool_calls:
                raise NotImplementedError(f"{where} has tool calls: {_TOOLS_OUT_OF_SCOPE}")
            role = "assistant"
        elif isinstance(m, ChatMessage):
            role = _CHAT_ROLES.get(m.role)
            if role is None:
                raise ValueError(f"{where} has role {m.role!r}; allowed values: {sorted(_CHAT_ROLES)}")
        elif m.type in ("tool", "function"):
            raise NotImplementedError(f"{where}: {_TOOLS_OUT_OF_SCOPE}")
        else:
            raise ValueError(f"{where} has type {m.type!r}; allowed: system, human, ai, chat messages")
        out.append({"role": role, "content": _text_of(m.content, where)})
    return out


def continues_final(messages: Sequence[dict[str, str]]) -> bool:
    """Whether the conversation ends with a partial assistant answer to continue."""
    return bool(messages) and messages[-1]["role"] == "assistant"


def render_named(messages: Sequence[dict[str, str]], name: str) -> str:
    """Render with a registered template (``"zephyr"`` or a plugin's)."""
    from zephyr_plugins.templates import get_template

    cont = continues_final(messages)
    return get_template(name).render(messages, add_generation_prompt=not cont, continue_final=cont)


def render_with_tokenizer(messages: Sequence[dict[str, str]], tokenizer) -> str:
    """Render with the tokenizer's own chat template (``prompt_template="auto"``)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt_template='auto' needs the checkpoint's tokenizer to carry a chat template, and it has none; "
            "use prompt_template='zephyr' or a registered template"
        )
    cont = continues_final(messages)
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=not cont, continue_final_message=cont
    )
