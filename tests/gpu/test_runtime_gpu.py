"""The runtime on a CUDA GPU: logits against the CPU fp32 reference, CUDA-graph replay against eager."""

import pytest
import torch

from zephyr_plugins.assets import tiny_mistral, write_rtn_checkpoint
from zephyr_plugins.config import GPTQConfig
from zephyr_plugins.generation_api import SamplingParams
from zephyr_plugins.runtime import Zephyr

pytestmark = pytest.mark.gpu

LAYOUTS = {
    "4bit-g128": GPTQConfig(bits=4, group_size=128),  # q/k/v and gate/up fused
    "4bit-g64-act": GPTQConfig(bits=4, group_size=64, desc_act=True),  # RTN act-order: separate layers
    "8bit-g128-act": GPTQConfig(bits=8, group_size=128, desc_act=True),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def ckpt(request, tmp_path_factory):
    # An 16-token window shorter than the prompts below: the windowed mask is exercised too.
    model = tiny_mistral(seed=4, sliding_window=16)
    folder = tmp_path_factory.mktemp("gpu_runtime") / request.param
    return write_rtn_checkpoint(model, str(folder), LAYOUTS[request.param])


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def test_logits_match_cpu_reference(ckpt):
    cpu = Zephyr.from_pretrained(ckpt, device="cpu", max_batch_size=2, max_seq_len=128)
    gpu = Zephyr.from_pretrained(ckpt, device="cuda", dtype=torch.float16, max_batch_size=2, max_seq_len=128)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 32000, (2, 40), generator=g)
    pad = torch.tensor([0, 7])
    ref = cpu.model(tokens, 0, pad, kv_len=128)
    got = gpu.model(tokens.cuda(), 0, pad.cuda(), kv_len=128).cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got[0], ref[0]) < 1e-2 and rel_err(got[1, 7:], ref[1, 7:]) < 1e-2
    # Decode steps: graphs on the GPU, eager on the CPU, same tokens fed to both.
    for step in range(8):
        nxt = torch.randint(3, 32000, (2,), generator=g)
        ref_step = cpu.steps(nxt, 40 + step, pad)
        got_step = gpu.steps(nxt.cuda(), 40 + step, pad.cuda()).cpu()
        assert rel_err(got_step, ref_step) < 1e-2, step


def test_graph_replay_equals_eager(ckpt):
    graphs = Zephyr.from_pretrained(ckpt, device="cuda", max_batch_size=4, max_seq_len=512, cuda_graphs=True)
    eager = Zephyr.from_pretrained(ckpt, device="cuda", max_batch_size=4, max_seq_len=512, cuda_graphs=False)
    assert graphs.steps.enabled and not eager.steps.enabled
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (30, 5, 21)]
    greedy = SamplingParams(max_new_tokens=300, temperature=0, repetition_penalty=1.1)  # crosses a 256-slot bucket
    assert graphs.generate_tokens(prompts, greedy) == eager.generate_tokens(prompts, greedy)
    sampled = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.9, seed=5)
    assert graphs.generate_tokens(prompts, sampled) == eager.generate_tokens(prompts, sampled)
    assert len(graphs.steps.graphs) >= 2  # one per length bucket (batch 3 runs in the bucket of 4)


def test_bf16(ckpt):
    cpu = Zephyr.from_pretrained(ckpt, device="cpu", max_batch_size=1, max_seq_len=64)
    gpu = Zephyr.from_pretrained(ckpt, device="cuda", dtype=torch.bfloat16, max_batch_size=1, max_seq_len=64)
    tokens = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(1, dtype=torch.long)
    ref = cpu.model(tokens, 0, pad, kv_len=64)
    assert rel_err(gpu.model(tokens.cuda(), 0, pad.cuda(), kv_len=64).cpu(), ref) < 3e-2
