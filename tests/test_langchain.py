"""ChatZephyr and ZephyrLLM in-process: template, stops, streaming, async, threads, errors.

The model is the tiny random Mistral in TheBloke's ``main`` layout, generated
by the runtime's ``Zephyr`` (CPU). Its answers are gibberish but
deterministic, which is what exactness tests need.
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from zephyr_plugins import PromptTemplate, hookimpl, zephyr_prompt  # noqa: E402
from zephyr_plugins.adapters.langchain import ChatZephyr, ZephyrLLM  # noqa: E402
from zephyr_plugins.adapters.langchain_backends import shared_generator  # noqa: E402
from zephyr_plugins.generation_api import Completion, StreamChunk  # noqa: E402
from zephyr_plugins.plugins import get_plugin_manager  # noqa: E402

PIRATE = [
    SystemMessage("You are a pirate."),
    HumanMessage("Hi"),
    AIMessage("Arr!"),
    HumanMessage("How many helicopters can a human eat?"),
]
PIRATE_PROMPT = (
    "<|system|>\nYou are a pirate.</s>\n<|user|>\nHi</s>\n<|assistant|>\nArr!</s>\n"
    "<|user|>\nHow many helicopters can a human eat?</s>\n<|assistant|>\n"
)


@pytest.fixture(scope="module")
def folder(seed_checkpoints):
    return seed_checkpoints["main"]


@pytest.fixture(scope="module")
def inproc(folder):
    """Constructor arguments for the in-process backend (the runtime's Zephyr) on the tiny checkpoint."""
    return {"model": folder}


def greedy(inproc, cls=ChatZephyr, **kw):
    return cls(**inproc, **{"temperature": 0, "max_tokens": 12, **kw})


# ---------------------------------------------------------------------------- template
def test_golden_prompt_equals_zephyr_string_and_saved_tokenizer(inproc, folder, tmp_path, zephyr_tokenizer):
    from transformers import AutoTokenizer

    assert greedy(inproc)._prompt(PIRATE) == PIRATE_PROMPT
    # "auto" renders with the checkpoint's saved tokenizer's own chat template.
    assert greedy(inproc, prompt_template="auto")._prompt(PIRATE) == PIRATE_PROMPT
    zephyr_tokenizer.save_pretrained(tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)
    dicts = [{"role": r, "content": m.content} for r, m in zip(["system", "user", "assistant", "user"], PIRATE)]
    assert saved.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True) == PIRATE_PROMPT
    assert AutoTokenizer.from_pretrained(folder).apply_chat_template(dicts, tokenize=False, add_generation_prompt=True) == PIRATE_PROMPT


def test_partial_assistant_message_is_continued(inproc):
    chat = greedy(inproc, max_tokens=8)
    msgs = PIRATE + [AIMessage("Arr, me hearty")]
    want = PIRATE_PROMPT + "Arr, me hearty"
    assert chat._prompt(msgs) == want
    assert greedy(inproc, prompt_template="auto")._prompt(msgs) == want
    # The answer is the continuation alone: the same as completing the raw prompt.
    llm = greedy(inproc, ZephyrLLM, raw=True, max_tokens=8)
    assert chat.invoke(msgs).content == llm.invoke(want)


class _ChatMLPlugin:
    template = PromptTemplate(
        "chatml-test",
        lambda msgs, gen, cont: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        + ("<|im_start|>assistant\n" if gen else ""),
        stop=("<|im_end|>",),
    )

    @hookimpl
    def register_prompt_templates(self, register):
        register("chatml-test", self.template)


def test_plugin_registered_template(inproc):
    with pytest.raises(ValueError, match="chatml-test.*not registered"):
        ChatZephyr(**inproc, prompt_template="chatml-test")
    pm, plugin = get_plugin_manager(), _ChatMLPlugin()
    pm.register(plugin, name="chatml-test-plugin")
    try:
        chat = greedy(inproc, prompt_template="chatml-test")
        assert chat._prompt([HumanMessage("Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert "<|im_end|>" in chat._request(None, {}, chat.prompt_template).stops
    finally:
        pm.unregister(plugin)


# ---------------------------------------------------------------------------- stops, streaming
def test_multi_token_stop_cut_exactly_in_invoke_and_stream(inproc):
    chat = greedy(inproc, max_tokens=16)
    pieces = [c.content for c in chat.stream("Hello")]
    full = chat.invoke("Hello").content
    assert "".join(pieces) == full
    assert len([p for p in pieces if p]) >= 6
    # A stop string from the middle of piece 3 to the middle of piece 5: it spans 3 tokens.
    a = len("".join(pieces[:3])) - 2
    b = len("".join(pieces[:5])) + 2
    stop = full[a:b]
    want = full[: full.find(stop)]
    assert len(want) <= a and stop not in want
    for stops in ([stop], ["never-generated-xyz", stop]):
        got = chat.invoke("Hello", stop=stops)
        assert got.content == want and got.response_metadata["finish_reason"] == "stop"
        assert "".join(c.content for c in chat.stream("Hello", stop=stops)) == want
    # A stop on the instance works the same; a per-call stop list replaces it.
    assert greedy(inproc, max_tokens=16, stop=[stop]).invoke("Hello").content == want
    assert greedy(inproc, max_tokens=16, stop=[stop]).invoke("Hello", stop=["never-xyz"]).content == full


def test_stream_equals_invoke_with_sampling_and_seed(inproc):
    chat = ChatZephyr(**inproc, temperature=0.9, max_tokens=12, seed=1234)
    a = chat.invoke(PIRATE).content
    assert "".join(c.content for c in chat.stream(PIRATE)) == a
    assert chat.invoke(PIRATE).content == a
    assert chat.invoke(PIRATE, seed=99).content != a  # the seed is really used


def test_usage_metadata_and_per_call_options(inproc, folder):
    from transformers import AutoTokenizer

    chat = greedy(inproc)
    msg = chat.invoke(PIRATE, max_tokens=5)
    n_prompt = len(AutoTokenizer.from_pretrained(folder)(PIRATE_PROMPT).input_ids)
    assert msg.usage_metadata == {"input_tokens": n_prompt, "output_tokens": 5, "total_tokens": n_prompt + 5}
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.response_metadata["model_name"] == folder
    chunks = list(chat.stream(PIRATE, max_tokens=5))
    assert sum((c for c in chunks[1:]), chunks[0]).usage_metadata == msg.usage_metadata
    assert ChatZephyr(model=folder, max_new_tokens=5).max_tokens == 5  # the runtime's name works too
    with pytest.raises(TypeError, match="unknown keyword arguments \\['tempreature'\\]"):
        chat.invoke("Hi", tempreature=0.5)
    with pytest.raises(ValueError, match="per call is not supported in-process"):
        chat.invoke("Hi", model="some/other-model")


class _Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_on_llm_new_token_callbacks(inproc):
    chat = greedy(inproc)
    full = chat.invoke("Hello").content
    cb = _Tokens()
    assert "".join(c.content for c in chat.stream("Hello", config={"callbacks": [cb]})) == full
    assert "".join(cb.tokens) == full and len(cb.tokens) > 5
    cb2 = _Tokens()  # streaming=True makes invoke() generate through the stream too
    assert greedy(inproc, streaming=True).invoke("Hello", config={"callbacks": [cb2]}).content == full
    assert "".join(cb2.tokens) == full
    cb3 = _Tokens()
    llm = greedy(inproc, ZephyrLLM)
    assert "".join(llm.stream("Hello", config={"callbacks": [cb3]})) == llm.invoke("Hello") == "".join(cb3.tokens)
    cb4 = _Tokens()
    assert greedy(inproc, ZephyrLLM, streaming=True).invoke("Hello", config={"callbacks": [cb4]}) == "".join(cb4.tokens)
    assert len(cb4.tokens) > 5


async def test_async_chat_matches_sync(inproc):
    chat = greedy(inproc)
    want = chat.invoke("Hello").content
    assert (await chat.ainvoke("Hello")).content == want
    assert "".join([c.content async for c in chat.astream("Hello")]) == want
    got = await chat.abatch(["Hello", "Hey"])
    assert [m.content for m in got] == [want, chat.invoke("Hey").content]
    stop = want[5:12]
    assert "".join([c.content async for c in chat.astream("Hello", stop=[stop])]) == want[: want.find(stop)]


# ---------------------------------------------------------------------------- ZephyrLLM
def test_zephyr_llm_invoke_stream_batch_stop(inproc):
    llm = greedy(inproc, ZephyrLLM)
    text = llm.invoke("Tell me about AI")
    # The Zephyr template with the model card's empty system turn; raw=True sends prompts as given.
    assert text == greedy(inproc, ZephyrLLM, raw=True).invoke(zephyr_prompt("Tell me about AI"))
    assert text == greedy(inproc).invoke([SystemMessage(""), HumanMessage("Tell me about AI")]).content
    assert "".join(llm.stream("Tell me about AI")) == text
    assert llm.batch(["Tell me about AI", "Hi"]) == [text, llm.invoke("Hi")]
    stop = text[4:11]
    assert llm.invoke("Tell me about AI", stop=[stop]) == text[: text.find(stop)]
    assert "".join(llm.stream("Tell me about AI", stop=[stop])) == text[: text.find(stop)]
    res = llm.generate(["Tell me about AI"], max_tokens=4)
    assert res.generations[0][0].generation_info["completion_tokens"] == 4
    assert res.llm_output["token_usage"]["completion_tokens"] == 4


async def test_zephyr_llm_async(inproc):
    llm = greedy(inproc, ZephyrLLM)
    text = llm.invoke("Tell me about AI")
    assert await llm.ainvoke("Tell me about AI") == text
    assert "".join([p async for p in llm.astream("Tell me about AI")]) == text
    assert await llm.abatch(["Tell me about AI", "Hi"]) == [text, llm.invoke("Hi")]


# ---------------------------------------------------------------------------- sharing, threads
def test_instances_share_one_model(folder):
    a, b = ChatZephyr(model=folder), ZephyrLLM(model=folder + "/")
    assert a._get_backend().generator is b._get_backend().generator
    # The runtime's defaults spelt out (CPU: float32) name the same model.
    assert ChatZephyr(model=folder, device="cpu", dtype="float32")._get_backend().generator is a._get_backend().generator


def test_shared_generator_loads_once_under_threads(folder):
    loads = []

    class Gen:
        def __init__(self, *args):
            loads.append(args)

    def loader(*args):
        loads.append(args)
        return Gen()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: shared_generator(folder, "cpu", None, loader=loader), range(8)))
    assert len(loads) == 2 and all(g is got[0] for g in got)  # one load (loader + Gen init)
    assert loads[0] == (folder, "cpu", "float32")
    other = shared_generator(folder, "cpu", "bfloat16", loader=loader)
    assert other is not got[0] and len(loads) == 4


def test_eight_threads_get_correct_answers(inproc):
    chat = greedy(inproc, max_tokens=8)
    prompts = [f"Tell me about topic number {i}" for i in range(8)]
    want = [chat.invoke(p).content for p in prompts]
    assert len(set(want)) > 1

    def ask(i):  # half invoke, half stream, all at once
        if i % 2:
            return "".join(c.content for c in chat.stream(prompts[i]))
        return chat.invoke(prompts[i]).content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == want


def test_injected_generator(inproc, folder):
    """generator= takes any Generator: here a transformers decode loop on zephyr_plugins.load."""
    from hf_generator import load_hf_generator

    gen = load_hf_generator(folder)
    chat = ChatZephyr(generator=gen, temperature=0, max_tokens=8)
    text = chat.invoke("Hello").content
    assert gen.calls == 1 and chat.model_name == folder
    assert "".join(c.content for c in chat.stream("Hello")) == text
    # The same checkpoint, greedy, through the runtime: the same answer.
    assert text == greedy(inproc, max_tokens=8).invoke("Hello").content


# ---------------------------------------------------------------------------- cancellation
class _Endless:
    """A Generator that streams 't1 t2 t3 ...' until cancelled, and records that it stopped."""

    tokenizer = None

    def __init__(self):
        self.finished = threading.Event()
        self.produced = 0

    def complete(self, prompts, params, cancel=None):
        return [Completion("tick", 1, 1, "stop") for _ in prompts]

    def stream_complete(self, prompt, params, cancel=None):
        try:
            while not (cancel is not None and cancel.is_set()) and self.produced < 10_000:
                self.produced += 1
                yield StreamChunk(f"t{self.produced} ", 1, self.produced)
        finally:
            self.finished.set()


def test_stop_and_early_exit_cancel_the_producer():
    gen = _Endless()
    chat = ChatZephyr(generator=gen, prompt_template="zephyr")
    assert "".join(c.content for c in chat.stream("x", stop=["2 t3 t"])) == "t1 t"
    assert gen.finished.is_set() and gen.produced == 4

    gen2 = _Endless()

    async def first_two():
        out = []
        async for c in ChatZephyr(generator=gen2).astream("x"):
            out.append(c.content)
            if len(out) == 2:
                break
        return out

    assert asyncio.run(first_two()) == ["t1 ", "t2 "]
    assert gen2.finished.wait(5) and gen2.produced < 10_000


# ---------------------------------------------------------------------------- errors
def test_tools_and_structured_output_say_not_supported(inproc):
    chat = ChatZephyr(**inproc)
    with pytest.raises(NotImplementedError, match="bind_tools\\(\\) is not supported"):
        chat.bind_tools([])
    with pytest.raises(NotImplementedError, match="with_structured_output\\(\\) is not supported"):
        chat.with_structured_output({"type": "object"})
    with pytest.raises(NotImplementedError, match="tool calling is not supported"):
        chat.invoke([HumanMessage("1+2?"), ToolMessage("3", tool_call_id="a")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "give model="),
        ({"base_url": "http://127.0.0.1:1/v1"}, "base_url needs model="),
        ({"base_url": "http://127.0.0.1:1/v1", "model": "m", "generator": _Endless()}, "not both"),
        ({"base_url": "http://127.0.0.1:1/v1", "model": "m", "device": "cuda"}, "device= applies to the in-process"),
        ({"model": "m", "prompt_template": "nope"}, "prompt_template='nope' is not registered"),
        ({"model": "m", "top_p": 1.5}, "top_p=1.5 must be in"),
        ({"model": "m", "max_tokens": 0}, "max_new_tokens=0 must be >= 1"),
        ({"model": "m", "stop": [""]}, "stop\\[0\\] is an empty string"),
        ({"model": "m", "dtype": "int8"}, "dtype='int8'; allowed values"),
        ({"model": "m", "tempreature": 0.5}, "tempreature\n  Extra inputs are not permitted"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChatZephyr(**kwargs)


def test_non_text_content_is_rejected_before_generation(inproc):
    img = HumanMessage([{"type": "text", "text": "What is this?"}, {"type": "image", "url": "http://x/y.png"}])
    with pytest.raises(ValueError, match="content\\[1\\] is a 'image' block"):
        ChatZephyr(**inproc).invoke([img])


# ---------------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_real_model_answers_with_its_own_template(smollm2_dir):
    # The float SmolLM2-135M-Instruct folder (the runtime loads float checkpoints too; quantized
    # SmolLM2 is tested in test_smollm2.py): what matters here is its ChatML template via "auto".
    chat = ChatZephyr(model=smollm2_dir, prompt_template="auto", temperature=0, max_tokens=24)
    prompt = chat._prompt([HumanMessage("What is the capital of France?")])
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" in prompt
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in answer.content, answer.content
    assert "<|im_end|>" not in answer.content and answer.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.content for c in chat.stream("What is the capital of France?"))
    assert streamed == answer.content


def test_missing_langchain_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['langchain_core'] = None\n"
        "import zephyr_plugins\n"
        "try:\n"
        "    import zephyr_plugins.adapters.langchain\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "zephyr-plugins[langchain]"' in out.stdout, out.stdout + out.stderr
