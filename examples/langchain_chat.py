"""Chat with a Zephyr GPTQ checkpoint through LangChain, streaming the answer.

    python examples/langchain_chat.py                                    # TheBloke/zephyr-7B-beta-GPTQ:main, in-process
    python examples/langchain_chat.py --base-url http://127.0.0.1:8000/v1 --model zephyr   # `zephyr-plugins serve`
    python examples/langchain_chat.py --model ./my-smollm2-gptq --template auto            # a ChatML-trained model
"""

import argparse

from langchain_core.prompts import ChatPromptTemplate

from zephyr_plugins.adapters.langchain import ChatZephyr

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="TheBloke/zephyr-7B-beta-GPTQ:main", help="checkpoint, or the served model name")
parser.add_argument("--base-url", default=None, help="an OpenAI-compatible server; default: generate in-process")
parser.add_argument("--template", default="zephyr", help="'zephyr', 'auto' (the checkpoint's own) or a plugin's")
parser.add_argument("question", nargs="?", default="How many helicopters can a human eat in one sitting?")
args = parser.parse_args()

chat = ChatZephyr(model=args.model, base_url=args.base_url, prompt_template=args.template, max_tokens=256)
prompt = ChatPromptTemplate.from_messages(
    [("system", "You are a friendly chatbot who always responds in the style of a pirate."), ("human", "{question}")]
)
for chunk in (prompt | chat).stream({"question": args.question}):
    print(chunk.content, end="", flush=True)
print()
