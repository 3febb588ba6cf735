"""Chat with a running hived daemon through its OpenAI-compatible API, using the `openai` package
unchanged. Works against `hived train` (while it trains), `hived serve --checkpoint` and a hive
coordinator alike.

    pip install openai
    python clients/openai_chat.py --url http://127.0.0.1:8765 "Tell me about the sea"

If the daemon was started with --api-key-file or HIVED_API_KEY, export the same key as
HIVED_API_KEY here.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8765")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    args = p.parse_args()
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=os.environ.get("HIVED_API_KEY", "none"))
    model = client.models.list().data[0].id  # a daemon serves one model
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
        temperature=args.temperature, stream=True,
        extra_body={"top_k": 40, "repetition_penalty": 1.1},  # hived's extras beyond OpenAI's fields
    )
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
