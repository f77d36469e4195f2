"""``zephyr-plugins serve`` argument handling (no server started; see test_vllm_server.py for that)."""

import os
import shlex

import pytest

from zephyr_plugins import cli
from zephyr_plugins.errors import CheckpointError
from zephyr_plugins.templates import ZEPHYR_CHAT_TEMPLATE


def _printed(capsys, argv):
    assert cli.main(["serve", *argv, "--print-command"]) == 0
    return shlex.split(capsys.readouterr().out.strip())


def test_serve_builds_the_vllm_command(seed_checkpoints, capsys):
    folder = seed_checkpoints["gptq-4bit-32g-actorder_True"]
    cmd = _printed(capsys, [folder, "--port", "8123", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    opts = dict(zip(cmd[3::2], cmd[4::2]))
    assert opts["--model"] == folder
    assert opts["--quantization"] == "zephyr_gptq"
    assert opts["--port"] == "8123" and opts["--host"] == "127.0.0.1"
    assert opts["--tensor-parallel-size"] == "2"
    assert opts["--gpu-memory-utilization"] == "0.5"  # unknown options go to vLLM unchanged
    template = opts["--chat-template"]
    try:
        with open(template) as fh:
            assert fh.read() == ZEPHYR_CHAT_TEMPLATE
    finally:
        os.unlink(template)


def test_serve_keeps_a_user_chat_template(seed_checkpoints, capsys, tmp_path):
    mine = tmp_path / "mine.jinja"
    mine.write_text("{{ messages[0]['content'] }}")
    cmd = _printed(capsys, [seed_checkpoints["main"], "--chat-template", str(mine)])
    assert cmd[cmd.index("--chat-template") + 1] == str(mine)


def test_serve_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        cli.main(["serve", str(tmp_path / "nope"), "--print-command"])


def test_serve_refuses_a_folder_without_gptq_settings(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no GPTQ settings"):
        cli.main(["serve", str(tmp_path), "--print-command"])


def test_dispatcher(capsys):
    assert cli.main([]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2


def test_server_env_allows_our_plugin(monkeypatch):
    from zephyr_plugins.cli_serve import server_env

    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert server_env()["VLLM_PLUGINS"].split(",") == ["lora_filesystem_resolver", "zephyr_gptq"]
    monkeypatch.delenv("VLLM_PLUGINS")
    assert "VLLM_PLUGINS" not in server_env()
