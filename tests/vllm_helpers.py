"""Shared pieces of the vLLM adapter tests: subprocess environment, runner, reference greedy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

RUNNER = os.path.join(os.path.dirname(__file__), "vllm_runner.py")
# A top-2 log-prob gap below this counts as a tie: fp32 implementations that
# sum in a different order may pick either token, and everything after differs.
TIE_MARGIN = 2e-3


def vllm_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; vLLM's CPU default takes ~16 GiB
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine in the runner process: one process to stop, no orphans
        VLLM_LOGGING_STREAM="ext://sys.stderr",  # vLLM logs to stdout by default; the checks read stderr
    )
    env.pop("VLLM_PLUGINS", None)
    env.update(extra)
    return env


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``ZEPHYR_TEST_TAG=tag`` (children inherit it)."""
    needle = f"ZEPHYR_TEST_TAG={tag}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().split(") ", 1)[1][0] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def assert_no_leftovers(tag: str, grace_s: float = 15.0) -> None:
    """Fail (after ending them by PID) if processes started under ``tag`` outlived their parent."""
    import signal
    import time

    deadline = time.monotonic() + grace_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left running after the vLLM subprocess ended: {left}"


def run_vllm_jobs(jobs: list[dict], workdir, timeout: int = 900, **env: str) -> dict:
    """Run ``jobs`` through tests/vllm_runner.py in one subprocess; returns its results by job name.

    Also checks that no process it started (engine core, TP workers) is left behind.
    """
    import uuid

    tag = uuid.uuid4().hex
    jobs_path, out_path = os.path.join(workdir, "jobs.json"), os.path.join(workdir, "out.json")
    with open(jobs_path, "w") as fh:
        json.dump(jobs, fh)
    proc = subprocess.run(
        [sys.executable, RUNNER, jobs_path, out_path], env=vllm_env(ZEPHYR_TEST_TAG=tag, **env),
        capture_output=True, text=True, timeout=timeout,
    )
    assert_no_leftovers(tag)
    if not os.path.exists(out_path):
        raise AssertionError(f"vLLM runner produced nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out_path) as fh:
        results = json.load(fh)
    results["_stderr"] = proc.stderr
    return results


def reference_greedy(folder: str, prompts: list[list[int]], steps: int):
    """Greedy tokens and per-step log-probs from our transformers model (fp32).

    The ``dense`` backend computes exactly the reference's ``x @ dequantize(W)``
    in fp32, but dequantizes once instead of on every call.
    """
    from zephyr_plugins.loader import load

    model, _ = load(folder, dtype=torch.float32, backend="dense")
    tokens, logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            )
            tokens.append(out.sequences[0, len(ids):].tolist())
            logprobs.append([torch.log_softmax(s[0].float(), -1) for s in out.scores])
    return tokens, logprobs


def compare_greedy(
    ours: list[int], ref: list[int], ref_logprobs: list[torch.Tensor], what: str, margin: float = TIE_MARGIN
) -> int:
    """Assert ``ours == ref`` up to the first step where ``ref`` had a near-tie; returns the steps compared.

    After a legitimately broken tie the sequences have different contexts, so
    nothing later can be compared.
    """
    assert len(ours) == len(ref), f"{what}: {len(ours)} tokens vs {len(ref)}"
    for step, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        top2 = ref_logprobs[step].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < margin, (
            f"{what}: step {step}: vLLM chose {a}, reference {b} (reference top-2 gap {gap:.4g} is no tie);\n"
            f"vLLM {ours}\nref  {ref}"
        )
        return step
    return len(ref)


def copy_with_quant_config(src: str, dst: str, **changes) -> str:
    """Copy a checkpoint folder, changing keys of its quantization config (both files)."""
    shutil.copytree(src, dst)
    cfg_path = os.path.join(dst, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["quantization_config"].update(changes)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    qc_path = os.path.join(dst, "quantize_config.json")
    if os.path.exists(qc_path):
        with open(qc_path) as fh:
            qc = json.load(fh)
        qc.update(changes)
        with open(qc_path, "w") as fh:
            json.dump(qc, fh)
    return dst
