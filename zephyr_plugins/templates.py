"""Prompt templates; Zephyr's is built in, others come through the plugin hooks.

Zephyr-7B-beta was fine-tuned on this exact layout (``</s>`` is the EOS text)::

    <|system|>\\n{system}</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n

Example::

    >>> zephyr_prompt("Tell me about AI")
    '<|system|>\\n</s>\\n<|user|>\\nTell me about AI</s>\\n<|assistant|>\\n'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .hookspecs import hookimpl

# The chat template as a Jinja string for tokenizers (``apply_chat_template``),
# rendering exactly what ``ZEPHYR.render`` does. The string is written so that
# it needs no trim_blocks: every literal newline is inside an expression.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

Message = Mapping[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    """Turns chat messages into one prompt string.

    ``render(messages, add_generation_prompt=True, continue_final=False)``;
    ``stop``: strings that end an answer in this format.
    """

    name: str
    render_fn: Callable[[Sequence[Message], bool, bool], str]
    stop: tuple[str, ...] = field(default=())

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, continue_final: bool = False) -> str:
        _check_messages(messages)
        return self.render_fn(messages, add_generation_prompt, continue_final)


_ROLE_TAGS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def _render_zephyr(messages: Sequence[Message], add_generation_prompt: bool, continue_final: bool) -> str:
    parts = []
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if last and continue_final:
            if m["role"] != "assistant":
                raise ValueError("continue_final needs the last message to be an assistant message")
            # A partial answer to continue: no EOS after it.
            parts.append(f"<|assistant|>\n{m['content']}")
            return "".join(parts)
        parts.append(f"{_ROLE_TAGS[m['role']]}\n{m['content']}</s>\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in _ROLE_TAGS:
            raise ValueError(f"messages[{i}] has role {role!r}; allowed values: {list(_ROLE_TAGS)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]['content'] must be a string")


ZEPHYR = PromptTemplate("zephyr", _render_zephyr, stop=("</s>", "<|user|>", "<|system|>"))


def zephyr_prompt(prompt: str, system: str = "") -> str:
    """One user turn (and a system turn, empty by default) in the Zephyr template."""
    return ZEPHYR.render([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def get_template(name: str) -> PromptTemplate:
    """A registered template by name (``"zephyr"`` is built in)."""
    from .plugins import prompt_templates

    templates = prompt_templates()
    if name not in templates:
        raise ValueError(f"prompt_template={name!r} is not registered; allowed values: {sorted(templates)}")
    return templates[name]


@hookimpl
def register_prompt_templates(register):
    register("zephyr", ZEPHYR)
