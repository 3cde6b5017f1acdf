"""`transerve chat [URL]`: a terminal chat with any OpenAI-compatible server, answers streamed.

Ctrl-C during an answer stops that answer: the stream is closed, so the server sees the client leave
and aborts the request. Ctrl-C or Ctrl-D at the prompt leaves.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import readline  # noqa: F401 (line editing and history for input())
except ImportError:  # Windows
    pass

HELP = """/reset           forget the conversation (the system prompt stays)
/system TEXT     set the system prompt (without TEXT: none)
/temperature X   sample at temperature X, 0 to 2 (without X: the server's default)
/help            this list
Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt leaves."""


def api_url(url: str) -> str:
    """The OpenAI base URL of a server given by its root URL or its /v1 URL, with or without a slash."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def sampling_line(server_defaults: dict[str, float] | None, temperature: float | None) -> str:
    # top_k 0 and min_p 0 mean "off": not worth a word.
    shown = {k: v for k, v in (server_defaults or {}).items() if k in ("temperature", "top_p") or v}
    if temperature is not None:
        shown["temperature"] = temperature
    text = ", ".join(f"{k} {v:g}" for k, v in shown.items())
    if server_defaults is None:  # a server that does not list its defaults (transerve does, in /v1/models)
        text = (text + "; otherwise " if text else "") + "the server's defaults"
    return "sampling: " + text


@dataclass
class Chat:
    client: Any  # openai.OpenAI
    model: str
    server_defaults: dict[str, float] | None
    system: str | None = None
    temperature: float | None = None  # None: the server's default
    max_tokens: int | None = None  # None: the server's default
    turns: list[dict[str, str]] = field(default_factory=list)

    def command(self, line: str) -> str:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/reset":
            self.turns.clear()
            return "the conversation is forgotten"
        if name == "/system":
            self.system = arg or None
            return "system prompt set" if arg else "no system prompt"
        if name == "/temperature":
            try:
                temperature = float(arg) if arg else None
            except ValueError:
                temperature = -1.0
            if temperature is not None and not 0 <= temperature <= 2:
                return "usage: /temperature X, with X from 0 to 2"
            self.temperature = temperature
            return sampling_line(self.server_defaults, self.temperature)
        if name == "/help":
            return HELP
        return f"unknown command {name}; /help lists them"

    def ask(self, question: str) -> str:
        """Stream the answer to `question` to stdout; the line to print after it."""
        import openai

        self.turns.append({"role": "user", "content": question})
        system = [{"role": "system", "content": self.system}] if self.system else []
        options = {k: v for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens)) if v is not None}
        answer, usage, start, first = [], None, time.monotonic(), None
        try:
            with self.client.chat.completions.create(model=self.model, messages=system + self.turns, stream=True,
                                                     stream_options={"include_usage": True}, **options) as stream:
                for chunk in stream:
                    usage = chunk.usage or usage
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.monotonic()
                        answer.append(chunk.choices[0].delta.content)
                        print(answer[-1], end="", flush=True)
            status = ""
        except KeyboardInterrupt:  # leaving the `with` closed the stream: the server aborts the request
            status = "stopped"
        except openai.APIError as exc:
            status = f"error: {exc}"
        if answer:
            self.turns.append({"role": "assistant", "content": "".join(answer)})
            print()
        else:
            self.turns.pop()  # no answer: the question is not part of the conversation
        if status or usage is None:
            return f"[{status or 'done'}]"
        elapsed = time.monotonic() - start
        tokens = usage.completion_tokens
        first_token = f", first after {first - start:.2f} s" if first else ""
        # The prompt's length shows how much of the context the conversation (and /system) takes.
        return (f"[{tokens} tokens in {elapsed:.1f} s, {tokens / elapsed:.1f} tokens/s{first_token}; "
                f"prompt {usage.prompt_tokens} tokens]")


def run_chat(args: argparse.Namespace) -> int:
    import openai

    url = api_url(args.url)
    client = openai.OpenAI(base_url=url, api_key=args.api_key)
    try:
        listed = client.models.list().data
    except openai.APIError as exc:
        print(f"error: cannot list the models at {url}: {exc}", file=sys.stderr)
        return 1
    model = args.model or (listed[0].id if listed else None)
    if model is None:
        print(f"error: {url} lists no models; name one with --model", file=sys.stderr)
        return 1
    entry = next((m for m in listed if m.id == model), None)
    chat = Chat(client, model, getattr(entry, "generation_defaults", None), args.system, max_tokens=args.max_tokens)
    print(f"{model} at {url}")
    print(sampling_line(chat.server_defaults, chat.temperature))
    print("/help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line:
            print(chat.command(line) if line.startswith("/") else chat.ask(line))
