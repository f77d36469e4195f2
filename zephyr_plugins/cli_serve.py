"""``zephyr-plugins serve``: vLLM's OpenAI-compatible server on our GPTQ method.

Starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
command is not usable under every vLLM build) with ``--quantization
zephyr_gptq`` and the Zephyr chat template, for a checkpoint folder or a Hub
``repo:branch``. Options vLLM knows but this command does not are passed on.

    zephyr-plugins serve TheBloke/zephyr-7B-beta-GPTQ:gptq-4bit-32g-actorder_True --port 8000
    zephyr-plugins serve ./ckpt --tensor-parallel-size 2 --max-model-len 4096 --gpu-memory-utilization 0.8
    zephyr-plugins serve ./ckpt --print-command     # show the vLLM command, start nothing
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zephyr-plugins serve",
        description="Serve a GPTQ checkpoint with vLLM's OpenAI-compatible server on zephyr-plugins kernels. "
        "Unknown options are passed to vLLM unchanged.",
    )
    p.add_argument("model", help="checkpoint folder or Hub id 'owner/name[:branch]'")
    p.add_argument("--revision", default=None, help="Hub branch (alternative to 'repo:branch')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=None, help="activation dtype (default: vLLM's choice)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the model argument)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (default: Zephyr's)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    p.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")
    return p


def vllm_command(args: argparse.Namespace, folder: str, template_path: str, extra: Sequence[str]) -> list[str]:
    """The ``python -m vllm.entrypoints.openai.api_server ...`` argument list."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", folder,
        "--served-model-name", args.served_model_name or args.model,
        "--quantization", "zephyr_gptq",
        "--chat-template", template_path,
        "--host", args.host,
        "--port", str(args.port),
        "--tensor-parallel-size", str(args.tensor_parallel_size),
    ]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(extra)


def server_env() -> dict[str, str]:
    """The server's environment: our plugin allowed, a sane CPU KV-cache size."""
    env = dict(os.environ)
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and "zephyr_gptq" not in allowed.split(","):
        # VLLM_PLUGINS is an allow-list; serving without our plugin cannot work.
        env["VLLM_PLUGINS"] = ",".join(p for p in allowed.split(",") + ["zephyr_gptq"] if p)
    try:
        import torch

        on_cpu = not torch.cuda.is_available()
    except ImportError:
        on_cpu = True
    if on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes ~16 GiB
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    from .checkpoint import resolve_checkpoint
    from .config import GPTQConfig
    from .templates import ZEPHYR_CHAT_TEMPLATE

    folder = resolve_checkpoint(args.model, args.revision)
    GPTQConfig.from_folder(folder)  # a clear error now, not in a vLLM subprocess later
    if args.chat_template:
        template_path, cleanup = args.chat_template, None
    else:
        fd, template_path = tempfile.mkstemp(prefix="zephyr-chat-", suffix=".jinja")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(ZEPHYR_CHAT_TEMPLATE)
        cleanup = template_path
    cmd = vllm_command(args, folder, template_path, extra)
    try:
        if args.print_command:
            print(shlex.join(cmd))
            return 0
        proc = subprocess.Popen(cmd, env=server_env())

        def forward(signum, _frame):
            proc.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        return proc.wait()
    finally:
        if cleanup and not args.print_command:
            os.unlink(cleanup)
