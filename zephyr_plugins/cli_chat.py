"""``zephyr-plugins chat MODEL``: an interactive, streaming chat in the terminal.

Each answer streams as it is generated; the conversation is kept and sent
again with the chat template. Ctrl-C stops the current answer; Ctrl-D (or
``/exit``) quits; ``/reset`` forgets the conversation.

    zephyr-plugins chat ./zephyr-gptq --system "You are a pirate." --temperature 0.7
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Optional, Sequence

from .cli_generate import add_model_args, load_model, sampling


def main(argv: Optional[Sequence[str]] = None, input_fn=input) -> int:
    ap = argparse.ArgumentParser(prog="zephyr-plugins chat", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--system", default="", help="system message")
    args = ap.parse_args(argv)
    llm = load_model(args)
    history: list[dict] = [{"role": "system", "content": args.system}]
    print("zephyr-plugins chat: /reset forgets the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input_fn("> ")
        except EOFError:
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = history[:1]
            continue
        history.append({"role": "user", "content": text})
        cancel, answer = threading.Event(), []
        try:
            for piece in llm.stream(history, cancel=cancel, **sampling(args)):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            cancel.set()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
