"""Run greedy generation through ``vllm.LLM`` for several checkpoints in ONE process.

Used by tests/test_vllm_adapter.py (vLLM start-up costs 10 s of imports plus
10-40 s per engine, so one process serves every layout in turn).

    python tests/vllm_runner.py jobs.json out.json

``jobs.json``: ``[{"name", "model", "prompts": [[token ids]], "max_tokens",
"dtype", "quantization", "logprobs", "llm_kwargs", "env", "throughput": {"batches",
"new_tokens"}}]`` (``env``: variables
set while that job runs; with VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine runs
in this process, so they reach it). ``out.json``:
``{name: {"tokens": [[ids]], "logprobs": [[{id: logprob}]], "seconds"} or {"error": str}}``.
"""

import gc
import json
import os
import sys
import time


def run_job(job):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        max_model_len=job.get("max_model_len", 256),
        enforce_eager=True,
        skip_tokenizer_init=True,
        seed=0,
    )
    if job.get("quantization"):
        kwargs["quantization"] = job["quantization"]
    kwargs.update(job.get("llm_kwargs", {}))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    params = SamplingParams(
        temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=job.get("logprobs", 2),
        detokenize=False,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen = time.perf_counter() - t0
    result = {"tokens": [], "logprobs": [], "startup_s": startup, "generate_s": gen}
    for o in outs:
        c = o.outputs[0]
        result["tokens"].append(list(c.token_ids))
        result["logprobs"].append(
            [{str(t): float(lp.logprob) for t, lp in step.items()} for step in (c.logprobs or [])]
        )
    if job.get("throughput"):
        result["throughput"] = decode_rate(llm, **job["throughput"])
    del llm
    return result


def decode_rate(llm, batches=(1,), new_tokens=64, prompt_len=64):
    """Decode tokens/s per batch size: rows * (N - 1) / (time(N tokens) - time(1 token)), prefill excluded."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1000 + prompt_len)))

    def timed(batch, n):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        llm.generate([prompt] * batch, params, use_tqdm=False)
        return time.perf_counter() - t

    timed(1, 2)  # warm-up
    rates = {}
    for b in batches:
        one, full = timed(b, 1), timed(b, new_tokens)
        rates[f"batch{b}_tok_s"] = round(b * (new_tokens - 1) / max(full - one, 1e-9), 1)
    return rates


def main(jobs_path, out_path):
    with open(jobs_path) as fh:
        jobs = json.load(fh)
    results = {}
    for job in jobs:
        saved = {k: os.environ.get(k) for k in job.get("env", {})}
        os.environ.update(job.get("env", {}))
        try:
            results[job["name"]] = run_job(job)
        except Exception as exc:  # reported to the test, which decides
            results[job["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        gc.collect()
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
