"""LangChain's own standard tests (langchain-tests) for ChatZephyr, in-process, offline.

The model is the tiny random Mistral written as TheBloke's ``main`` layout
(4-bit, group 128, act-order). It answers gibberish, which is all these tests
need: with tool calling and structured output unsupported (and declared so
below) no remaining test judges what the answer says.
"""

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from zephyr_plugins.adapters.langchain import ChatZephyr  # noqa: E402


@pytest.fixture(scope="module")
def tiny_main(seed_checkpoints):
    return seed_checkpoints["main"]


class _ZephyrSuite:
    """What the suites need to know about ChatZephyr."""

    folder: str = ""

    @pytest.fixture(autouse=True)
    def _checkpoint(self, tiny_main):
        type(self).folder = tiny_main

    @property
    def chat_model_class(self):
        return ChatZephyr

    @property
    def chat_model_params(self):
        # In-process: the runtime's Zephyr, loaded once and shared by every instance.
        return {"model": self.folder, "temperature": 0}

    @property
    def has_tool_calling(self):
        # bind_tools is overridden only to raise NotImplementedError with a reason.
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supports_model_override(self):
        # One in-process instance serves one checkpoint; per-call `model=` is
        # rejected in-process (it only renames the served model for base_url).
        return False


class TestChatZephyrUnit(_ZephyrSuite, ChatModelUnitTests):
    pass


class TestChatZephyrIntegration(_ZephyrSuite, ChatModelIntegrationTests):
    @property
    def chat_model_params(self):
        # Short answers: the suite makes ~25 calls on two CPU cores. (Not in the
        # unit suite, whose test_standard_params passes max_tokens itself.)
        return {**super().chat_model_params, "max_tokens": 12}
