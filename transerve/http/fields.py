"""Every request field of the three text endpoints, and what transerve does with it.

A field is honoured, honoured for some values (the others are a 400 that names it), accepted and
ignored (with the reason), or rejected with a 400 that names it. A field not listed is a 400 too: no
field is ever silently dropped. The README's table is printed from these tables
(`python -m transerve.http.fields`), and a test checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from transerve.http.errors import OpenAIError

HONOURED, PARTLY, IGNORED, REJECTED = "honoured", "partly", "ignored", "rejected"


@dataclass(frozen=True)
class Field:
    status: str
    note: str = ""


_SAMPLING = {
    "model": Field(HONOURED, "repo or repo@revision, loaded on first use; the pinned model when the server has one"),
    "temperature": Field(HONOURED, "0 to 2; 0 is greedy"),
    "top_p": Field(HONOURED),
    "seed": Field(HONOURED, "the same seed gives the same answer whatever else is in the batch"),
    "stop": Field(HONOURED, "up to 4 strings, matched across token boundaries, never shown"),
    "presence_penalty": Field(HONOURED, "-2 to 2, over the generated tokens"),
    "frequency_penalty": Field(HONOURED, "-2 to 2, over the generated tokens"),
    "logit_bias": Field(HONOURED, "token id -> bias in [-100, 100], added to the logits"),
    "n": Field(HONOURED, "1 to 128 choices, each sampled as its own request in the batch"),
    "stream": Field(HONOURED),
    "stream_options": Field(PARTLY, "`include_usage` honoured; `include_obfuscation` ignored (no obfuscation padding is sent)"),
    "user": Field(IGNORED, "an end-user id for OpenAI's abuse monitoring; nothing here uses it"),
    # Extensions, as vLLM and transformers serve name them.
    "generation_config": Field(HONOURED, "extension: a transformers GenerationConfig (object or JSON string): max_new_tokens, "
                               "min_new_tokens, temperature, top_p, top_k, min_p, do_sample, repetition_penalty, "
                               "no_repeat_ngram_size, num_return_sequences, stop_strings, eos_token_id, suppress_tokens, "
                               "bad_words_ids; any other field set to a non-default value is a 400 naming it"),
    "top_k": Field(HONOURED, "extension"),
    "min_p": Field(HONOURED, "extension"),
    "repetition_penalty": Field(HONOURED, "extension: over prompt and generated tokens, 1 is off"),
    "ignore_eos": Field(HONOURED, "extension: keep going past the end-of-sequence token"),
}

_CACHING = {
    "prompt_cache_key": Field(IGNORED, "prefix caching is automatic: any shared prompt prefix is reused"),
    "prompt_cache_retention": Field(IGNORED, "cached prefixes live until their KV blocks are needed"),
    "prompt_cache_options": Field(IGNORED, "cached prefixes live until their KV blocks are needed"),
    "service_tier": Field(IGNORED, "one tier here; responses say `default`"),
    "safety_identifier": Field(IGNORED, "an end-user id for OpenAI's abuse monitoring; nothing here uses it"),
    "metadata": Field(IGNORED, "only meaningful for stored objects; nothing is stored (Responses echoes it back)"),
    "store": Field(IGNORED, "nothing is ever stored"),
}

CHAT = {
    "messages": Field(HONOURED, "system / developer / user / assistant (with tool_calls) / tool (with tool_call_id); string, "
                      "text-part or (vision-language models) image_url-part content"),
    **_SAMPLING,
    **_CACHING,
    "max_completion_tokens": Field(HONOURED, "default: the rest of the context"),
    "max_tokens": Field(HONOURED, "the same as max_completion_tokens"),
    "logprobs": Field(HONOURED, "logprobs of the model's distribution after logit_bias"),
    "top_logprobs": Field(HONOURED, "0 to 20, needs logprobs"),
    "tools": Field(PARTLY, "`function` tools, rendered by the model's chat template; other tool types are a 400"),
    "tool_choice": Field(PARTLY, "`auto` and `none` (tools are then not shown to the model); `required` and a named "
                         "function need constrained decoding: 400"),
    "parallel_tool_calls": Field(HONOURED, "false ends the answer after the first complete call"),
    "response_format": Field(PARTLY, "`text` only; `json_object` and `json_schema` need constrained decoding: 400"),
    "reasoning_effort": Field(HONOURED, "passed to the chat template as `reasoning_effort` (templates that know it use it)"),
    "chat_template_kwargs": Field(HONOURED, "extension: extra variables for the chat template, e.g. enable_thinking"),
    "modalities": Field(PARTLY, "`[\"text\"]` only"),
    "audio": Field(REJECTED, "no audio output"),
    "functions": Field(REJECTED, "deprecated by OpenAI: use tools"),
    "function_call": Field(REJECTED, "deprecated by OpenAI: use tool_choice"),
    "prediction": Field(IGNORED, "predicted outputs only make OpenAI faster; the answer is the same without"),
    "verbosity": Field(IGNORED, "a hint to OpenAI's own models; open models have no such control"),
    "web_search_options": Field(REJECTED, "no web search"),
    "moderation": Field(REJECTED, "no moderation models here"),
    "tool_prompt": Field(REJECTED, "text-generation-inference's own field: the chat template presents the tools"),
}

COMPLETIONS = {
    "prompt": Field(HONOURED, "a string, a list of strings, token ids, or a list of token id lists"),
    **_SAMPLING,
    "max_tokens": Field(HONOURED, "default 16, as OpenAI's"),
    "echo": Field(HONOURED, "the prompt comes first in each choice's text (not with logprobs: no prompt logprobs)"),
    "logprobs": Field(HONOURED, "0 to 20: the sampled token's logprob and that many of the most likely"),
    "best_of": Field(PARTLY, "only equal to n (each choice is returned); more needs scoring of hidden choices: 400"),
    "suffix": Field(REJECTED, "fill-in-the-middle needs a model trained for it"),
}

RESPONSES = {
    "input": Field(HONOURED, "a string, or messages / input items: message (with input_text and, for vision-language "
                   "models, input_image parts), function_call, function_call_output (reasoning items are dropped)"),
    "instructions": Field(HONOURED, "a system message before the input"),
    **_SAMPLING,
    **_CACHING,
    "max_output_tokens": Field(HONOURED, "default: the rest of the context"),
    "tools": Field(PARTLY, "`function` tools; built-in tools (web search, file search, ...) are a 400"),
    "tool_choice": Field(PARTLY, "`auto` and `none`; `required` and a named function are a 400"),
    "parallel_tool_calls": Field(HONOURED, "false ends the answer after the first complete call"),
    "top_logprobs": Field(HONOURED, "0 to 20, in output_text.logprobs"),
    "include": Field(PARTLY, "`message.output_text.logprobs` honoured; `reasoning.encrypted_content` ignored (reasoning "
                     "comes back as plain text); others name outputs of tools we do not have: 400"),
    "reasoning": Field(PARTLY, "`effort` is passed to the chat template as `reasoning_effort`; `summary` ignored (the "
                       "reasoning item holds the thoughts themselves)"),
    "text": Field(PARTLY, "format `text` only (others need constrained decoding: 400); `verbosity` ignored"),
    "truncation": Field(PARTLY, "`disabled` (a prompt that does not fit is a 400); `auto` is a 400"),
    "max_tool_calls": Field(IGNORED, "limits built-in tool calls, and there are none"),
    "chat_template_kwargs": Field(HONOURED, "extension: extra variables for the chat template"),
    "background": Field(PARTLY, "false only: nothing is stored to poll"),
    "previous_response_id": Field(REJECTED, "nothing is stored: send the whole conversation in input"),
    "conversation": Field(REJECTED, "nothing is stored: send the whole conversation in input"),
    "prompt": Field(REJECTED, "stored prompt templates live at OpenAI"),
    "context_management": Field(REJECTED, "no server-side compaction"),
    "moderation": Field(REJECTED, "no moderation models here"),
    "background_options": Field(REJECTED, "no background mode"),
    "access_programs": Field(REJECTED, "no programmatic tool calling"),
    "image": Field(REJECTED, "no image generation"),
}
for _name in ("stop", "logit_bias", "presence_penalty", "frequency_penalty", "seed"):  # chat's, not OpenAI Responses'
    RESPONSES[_name] = Field(HONOURED, "extension: " + _SAMPLING[_name].note)
RESPONSES["n"] = Field(REJECTED, "a Response has one output: send several requests")

TABLES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/responses": RESPONSES}


def check_fields(body: dict, endpoint: str) -> None:
    """400 for any field that is rejected here or unknown; null counts as absent."""
    table = TABLES[endpoint]
    for name, value in body.items():
        if value is None:
            continue
        field = table.get(name)
        if field is None:
            raise OpenAIError(f"unknown field {name!r}: {endpoint} does not take it", 400, name, "unsupported_parameter")
        if field.status == REJECTED:
            raise OpenAIError(f"{name!r} is not supported: {field.note}", 400, name, "unsupported_parameter")


def markdown_table() -> str:
    """The README's table: every field of every endpoint, with its status and why."""
    lines = []
    for endpoint, table in TABLES.items():
        lines += [f"`{endpoint}`", "", "| field | status | notes |", "|---|---|---|"]
        for name in sorted(table):
            field = table[name]
            lines.append(f"| `{name}` | {field.status} | {field.note.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
