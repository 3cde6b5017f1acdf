"""What the tests/test_openai_*.py modules share: rigged tiny models that write tool calls, and one live
server for all of them (started once per session: a server start costs seconds on a small box).

A rigged model is a one-layer GPT-2 whose only signal is its position embedding: every attention and
MLP output is zeroed, so the hidden state at position p is the p-th position vector, and the LM head
maps it to the p-th token of a fixed answer. Its test-owned chat template renders a prompt of fixed
length whatever the messages, so greedy decoding writes exactly that answer, then end-of-sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from pydantic import Discriminator, Tag, TypeAdapter

from conftest import LiveServer, save_in_hf_cache

HERMES_ANSWER = (
    '<think>\nI should call tools.\n</think>\n\nLet me check.<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)
LLAMA3_ANSWER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL_ANSWER = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'

RIGS = {
    # repo: (chat template text, answer, extra special tokens)
    "rig/hermes": ("<|im_start|>system\nThink in <think></think>; call tools in <tool_call></tool_call>.<|im_end|>\n"
                   "<|im_start|>assistant\n", HERMES_ANSWER, ()),
    "rig/llama3": ("<|start_header_id|>system<|end_header_id|>\n\nCall tools as JSON, after <|python_tag|> or not."
                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", LLAMA3_ANSWER, ()),
    "rig/mistral": ("[INST] Call tools after [TOOL_CALLS]. [/INST]", MISTRAL_ANSWER, ("[TOOL_CALLS]",)),
}

WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]


def build_rig(repo_id: str, smollm2_dir: str, work: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    template, answer, specials = RIGS[repo_id]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": list(specials)})
    tokenizer.chat_template = template.replace("{", "{{ '{' }}")  # a fixed text, whatever the messages
    prompt_len = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, return_dict=True)["input_ids"])
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width = 128
    assert len(ids) <= width, (repo_id, len(ids))
    config = GPT2Config(n_embd=width, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
                        architectures=["GPT2LMHeadModel"])
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        for i, token_id in enumerate(ids):  # answer token i is sampled from position prompt_len - 1 + i
            model.transformer.wpe.weight[prompt_len - 1 + i, i] = 10.0
            model.lm_head.weight[token_id, i] += 10.0
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    return save_in_hf_cache(repo_id, work)


# tiny/llama's weights with a template that shows what reaches it: tool calls (arguments as a mapping),
# tool results with their ids, the tools, and an opened thought when asked (enable_thinking).
TOOLCHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}({{ c.function.arguments.city }})</tool_call>{% endfor %}"
    "{%- if m.role == 'tool' %}[{{ m.tool_call_id }}] {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% endif %}"
)


def build_toolchat(llama_dir: Path, work: Path) -> Path:
    import shutil

    from transformers import AutoTokenizer

    for f in llama_dir.iterdir():
        shutil.copy(f, work / f.name)
    tokenizer = AutoTokenizer.from_pretrained(work)
    tokenizer.chat_template = TOOLCHAT_TEMPLATE
    tokenizer.save_pretrained(work)
    return save_in_hf_cache("tiny/toolchat", work)


_server: LiveServer | None = None


@pytest.fixture(scope="module")
def server(tiny_repos, smollm2_dir, tmp_path_factory, request):
    """One server for every test_openai_* module: models on demand, the tiny ones and the rigs."""
    global _server
    if _server is None:
        for repo_id in RIGS:
            build_rig(repo_id, smollm2_dir, tmp_path_factory.mktemp(repo_id.replace("/", "-")))
        build_toolchat(tiny_repos["tiny/llama"], tmp_path_factory.mktemp("toolchat"))
        _server = LiveServer("--no-preload", "--num-kv-blocks", "256", "--max-num-batched-tokens", "256")
        for repo in ("tiny/llama", "tiny/toolchat", *RIGS):  # loaded up front, so tests time their answers, not the loading
            httpx.post(_server.base_url + "/v1/chat/completions", timeout=120,
                       json={"model": repo, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        request.config.add_cleanup(_stop)
    return _server


def _stop() -> None:
    global _server
    if _server is not None:
        code, output = _server.stop(), _server.output()
        _server = None
        assert code == 0, output


@pytest.fixture()
def client(server):
    return sdk_client(server.base_url)


def post(server, path: str, body: dict) -> httpx.Response:
    return checked(httpx.post(server.base_url + path, content=json.dumps(body), timeout=120,
                              headers={"content-type": "application/json"}))


# Every body a test reads is validated against the openai package's own types (the SDK itself only
# constructs its objects, so a field of the wrong type would pass unnoticed there).

def _answer_types() -> dict[str, tuple[TypeAdapter, TypeAdapter]]:
    from typing import Annotated, Literal

    from openai.types import Completion, CompletionChoice, CreateEmbeddingResponse, Embedding
    from openai.types.audio import Transcription, TranscriptionStreamEvent, TranscriptionVerbose, Translation, TranslationVerbose
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    # The SDK reads streamed completions as Completion objects too, but OpenAI's own streams (and ours)
    # say finish_reason null until a choice ends, which the SDK's type does not allow.
    class StreamedChoice(CompletionChoice):
        finish_reason: Literal["stop", "length", "content_filter"] | None = None

    class CompletionChunk(Completion):
        choices: list[StreamedChoice]

    class EncodedEmbedding(Embedding):  # the SDK decodes base64 vectors before it builds its objects
        embedding: list[float] | str

    class EmbeddingAnswer(CreateEmbeddingResponse):
        data: list[EncodedEmbedding]

    # A transcript is verbose_json when it says how long the audio is; each form is checked as itself
    # (every openai type takes extra keys, so a plain Transcription would pass any verbose body).
    transcript = Annotated[Annotated[TranscriptionVerbose, Tag("verbose_json")] | Annotated[Transcription, Tag("json")],
                           Discriminator(lambda body: "verbose_json" if "duration" in body else "json")]
    translation = Annotated[Annotated[TranslationVerbose, Tag("verbose_json")] | Annotated[Translation, Tag("json")],
                            Discriminator(lambda body: "verbose_json" if "duration" in body else "json")]
    return {"/v1/chat/completions": (TypeAdapter(ChatCompletion), TypeAdapter(ChatCompletionChunk)),
            "/v1/completions": (TypeAdapter(Completion), TypeAdapter(CompletionChunk)),
            "/v1/responses": (TypeAdapter(Response), TypeAdapter(ResponseStreamEvent)),
            "/v1/audio/transcriptions": (TypeAdapter(transcript), TypeAdapter(TranscriptionStreamEvent)),
            "/v1/audio/translations": (TypeAdapter(translation), None),
            "/v1/embeddings": (TypeAdapter(EmbeddingAnswer), None)}


def check_body(path: str, status: int, content_type: str, text: str) -> None:
    """Raises pydantic's ValidationError when the body is not what the openai package says it is."""
    from openai.types.shared import ErrorObject

    whole, chunk = _ANSWERS.get(path, (None, None)) if status == 200 else (None, None)
    if content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if "error" in data and "type" not in data:
                    ErrorObject.model_validate(data["error"])
                elif chunk is not None:
                    chunk.validate_python(data)
    elif content_type.startswith("application/json"):
        data = json.loads(text)
        if status >= 400:
            ErrorObject.model_validate(data["error"])
        elif whole is not None:
            whole.validate_python(data)


def checked(response: httpx.Response) -> httpx.Response:
    response.read()
    check_body(response.request.url.path, response.status_code, response.headers.get("content-type", ""), response.text)
    return response


async def _achecked(response: httpx.Response) -> None:
    await response.aread()
    check_body(response.request.url.path, response.status_code, response.headers.get("content-type", ""), response.text)


def sdk_client(base_url: str, api_key: str = "unused", timeout: float = 120) -> openai.OpenAI:
    """The openai SDK, every answer it reads validated (streams are read whole first)."""
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0,
                         http_client=httpx.Client(timeout=timeout, event_hooks={"response": [checked]}))


def async_sdk_client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0,
                              http_client=httpx.AsyncClient(timeout=120, event_hooks={"response": [_achecked]}))


_ANSWERS = _answer_types()
