"""The generation interface shared by the runtime and the adapters.

The runtime's ``Zephyr`` object implements :class:`Generator`; the LangChain
adapter's in-process backend wraps any :class:`Generator`, so the contract is
written down here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Protocol, Sequence

# Sampling defaults from the Zephyr-7B-beta GPTQ model card.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    ``stop``: strings that end generation; the returned text is cut right
    before the earliest stop string and never contains it. ``seed`` makes
    sampling reproducible.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    stop: tuple[str, ...] = field(default=())
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be >= 0 (0 = no top-k)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0")
        object.__setattr__(self, "stop", tuple(self.stop or ()))


@dataclass(frozen=True)
class Completion:
    """One finished generation.

    ``finish_reason``: ``"stop"`` (EOS or a stop string) or ``"length"``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed text; the last chunk has ``finish_reason`` set (its text may be empty)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Optional[str] = None


class Generator(Protocol):
    """What the adapters need from a loaded model.

    Prompts are already-rendered strings (templates are applied by the caller);
    ``add_bos`` says whether to prepend the tokenizer's BOS.
    Implementations are safe to call from several threads (calls may be
    serialised) and stop early when ``cancel`` (a ``threading.Event``) is set.
    """

    tokenizer: object

    def complete(self, prompts: Sequence[str], params: SamplingParams, cancel=None) -> list[Completion]: ...

    def stream_complete(self, prompt: str, params: SamplingParams, cancel=None) -> Iterator[StreamChunk]: ...
