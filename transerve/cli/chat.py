"""`transerve chat [URL]`: a terminal chat with any OpenAI-compatible server, answers streamed."""

from __future__ import annotations

import argparse
import sys


def run_chat(args: argparse.Namespace) -> int:
    import openai

    client = openai.OpenAI(base_url=args.url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except (openai.APIError, IndexError) as exc:
        print(f"error: cannot list the models of {args.url}: {exc}", file=sys.stderr)
        return 1
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {model} at {args.url}; an empty line or Ctrl-D ends")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            return 0
        messages.append({"role": "user", "content": line})
        answer = []
        try:
            for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    answer.append(chunk.choices[0].delta.content)
                    print(chunk.choices[0].delta.content, end="", flush=True)
        except KeyboardInterrupt:
            pass
        except openai.APIError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(answer)})
