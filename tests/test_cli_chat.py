"""`transerve chat` driven in a pseudo-terminal as a user would, against a live server whose sampling
defaults come from --override-generation-config (shown by /v1/models, the startup log and the chat)."""

from __future__ import annotations

import json
import os
import re
import sys

import openai
import pexpect
import pytest

from conftest import LiveServer
from hardening_helpers import metric, wait_until

MODEL = "tiny/llama"
ANSWERED = re.compile(r"\[(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s, first after [\d.]+ s; prompt (\d+) tokens\]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def server(tiny_repos):
    # Greedy by default; no prefix caching, so that the same prompt gives the same greedy answer bit for bit.
    srv = LiveServer(MODEL, "--num-kv-blocks", "256", "--no-prefix-caching",
                     "--override-generation-config", json.dumps({"temperature": 0.0}))
    yield srv
    assert srv.stop() == 0, srv.output()


def start_chat(url: str, *flags: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "transerve.cli.main", "chat", url, *flags], encoding="utf-8",
                         timeout=120, dimensions=(24, 1000), env={**os.environ, "TERM": "dumb"})


def ask(child: pexpect.spawn, question: str) -> tuple[str, int, int]:
    """The answer text as the terminal showed it, its token count and the prompt's."""
    child.expect_exact("> ")
    child.sendline(question)
    child.expect(ANSWERED)
    answer = ANSI.sub("", child.before).split(question, 1)[1].strip()
    return answer, int(child.match.group(1)), int(child.match.group(2))


def command(child: pexpect.spawn, line: str, reply: str) -> None:
    child.expect_exact("> ")
    child.sendline(line)
    child.expect_exact(reply)


def test_the_override_sets_the_defaults_that_models_lists_and_requests_get(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    listed = client.models.retrieve(MODEL)
    assert listed.generation_defaults == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    assert "loaded tiny/llama" in server.output() and "sampling defaults {'temperature': 0.0," in server.output()

    def answer(seed: int, **sampling) -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                              seed=seed, **sampling).choices[0].message.content

    assert answer(1) == answer(2)  # no temperature given: the server's 0, greedy, whatever the seed
    assert answer(1, temperature=1.0) != answer(2, temperature=1.0)  # the same seeds do sample differently


def test_chat_at_the_root_url_answers_and_its_commands_act(server):
    child = start_chat(server.base_url, "--max-tokens", "16")  # the root URL, not /v1
    try:
        child.expect_exact(f"{MODEL} at {server.base_url}/v1")
        child.expect_exact("sampling: temperature 0, top_p 1")
        first, tokens, prompt = ask(child, "Hi")
        assert first and 0 < tokens <= 16
        _, _, longer_prompt = ask(child, "Hi")
        assert longer_prompt > prompt + tokens  # the conversation so far is part of the prompt

        command(child, "/reset", "the conversation is forgotten")
        assert ask(child, "Hi") == (first, tokens, prompt)  # greedy, from a fresh conversation

        command(child, "/reset", "the conversation is forgotten")
        command(child, "/system " + "You are a pirate who answers every question in rhyme. " * 3, "system prompt set")
        _, _, system_prompt = ask(child, "Hi")
        assert system_prompt > prompt + 10
        command(child, "/system", "no system prompt")

        command(child, "/temperature 2", "sampling: temperature 2, top_p 1")
        command(child, "/reset", "the conversation is forgotten")
        hot, _, hot_prompt = ask(child, "Hi")
        assert hot_prompt == prompt and hot != first
        command(child, "/temperature", "sampling: temperature 0, top_p 1")
        command(child, "/temperature hot", "usage: /temperature X")

        child.expect_exact("> ")
        child.sendeof()  # Ctrl-D at the prompt leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_on_the_server_and_the_chat_goes_on(server):
    child = start_chat(server.base_url + "/v1/", "--max-tokens", "700")  # the /v1 URL, with a slash
    aborted = metric(server.base_url, "transerve_requests_finished_total", model=MODEL, reason="abort")
    try:
        child.expect_exact("> ")
        child.sendline("Tell me a long story")
        child.expect_exact("story")
        child.expect(r"\S", timeout=60)  # the answer is streaming
        assert metric(server.base_url, "transerve_num_requests_running", model=MODEL) == 1
        child.sendintr()
        child.expect_exact("[stopped]")
        assert wait_until(lambda: metric(server.base_url, "transerve_num_requests_running", model=MODEL) == 0)
        assert wait_until(lambda: metric(server.base_url, "transerve_requests_finished_total", model=MODEL,
                                         reason="abort") == aborted + 1)

        command(child, "/reset", "the conversation is forgotten")
        _, tokens, _ = ask(child, "Hi")  # still chatting
        assert tokens > 0
        child.expect_exact("> ")
        child.sendintr()  # Ctrl-C at the prompt leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
