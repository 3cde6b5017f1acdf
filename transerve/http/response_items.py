"""The pieces of a Response object: output items, usage, the finished object."""

from __future__ import annotations

import time
import uuid

from transerve.actors.messages import Usage


def response_usage(usage: Usage | None) -> dict:
    usage = usage or Usage(0, 0)
    return {
        "input_tokens": usage.prompt_tokens,
        # cache_write_tokens is required by the SDK's type since openai 3.x; prefix caching here costs nothing to write.
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def finished(base: dict, output: list[dict], finish_reason: str | None, usage: Usage | None) -> dict:
    incomplete = finish_reason == "length"
    return {**base, "status": "incomplete" if incomplete else "completed", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "completed_at": None if incomplete else time.time(), "usage": response_usage(usage)}


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}] if text else [],
            "status": status}


def message_item(item_id: str, text: str, logprobs: list | None, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": [part]}


def function_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
