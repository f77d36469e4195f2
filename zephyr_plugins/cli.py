"""The ``zephyr-plugins`` command: a dispatcher whose subcommands import lazily.

Each subcommand lives in its own module exposing ``main(argv) -> int`` and
builds its own parser, so ``zephyr-plugins --help`` imports nothing heavy.

    zephyr-plugins serve ./zephyr-gptq --port 8000
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help). Add a subcommand with one line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("zephyr_plugins.cli_serve", "serve a GPTQ checkpoint with vLLM's OpenAI-compatible server"),
    "chat": ("zephyr_plugins.cli_chat", "chat with a model in the terminal (streaming)"),
    "generate": ("zephyr_plugins.cli_generate", "generate one completion for a prompt (streaming)"),
    "quantize": ("zephyr_plugins.cli_quantize", "GPTQ-quantize a float Mistral/Llama model into a checkpoint"),
    "ppl": ("zephyr_plugins.cli_ppl", "perplexity of a model on a text file"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: zephyr-plugins <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(SUBCOMMANDS.items())]
    lines += ["", "Run 'zephyr-plugins <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``zephyr-plugins`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"zephyr-plugins: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
