"""The pieces of an Anthropic Message: content blocks, stop fields, usage, and the error body."""

from __future__ import annotations

import json

from transerve.actors.messages import Usage
from transerve.http.output import Choice

# Anthropic's error types by status, as its SDK types them; other 4xx (413 too) are invalid requests.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}


def anthropic_error(message: str, status_code: int) -> dict:
    kind = _ERROR_TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def stop_fields(finish_reason: str | None, stop_sequence: str | None) -> dict:
    """stop_reason, and the stop sequence that matched (only with stop_reason `stop_sequence`)."""
    if stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_sequence}
    return {"stop_reason": _STOP_REASONS.get(finish_reason or "stop", "end_turn"), "stop_sequence": None}


def usage_dict(usage: Usage | None) -> dict:
    """As Anthropic counts: input_tokens are the prompt tokens not read from the prefix cache."""
    usage = usage or Usage(0, 0)
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def tool_input(arguments: str) -> dict:
    """A call's arguments as the object Anthropic's `input` is; arguments cut off mid-way (max_tokens) give {}."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(choice: Choice) -> list[dict]:
    """Thoughts, text, tool calls, in the order the stream sends them; an answer with none is one empty text block."""
    blocks = []
    if choice.reasoning:
        blocks.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
    if choice.text or not (choice.reasoning or choice.tool_calls):
        blocks.append({"type": "text", "text": choice.text})
    blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)} for c in choice.tool_calls]
    return blocks
