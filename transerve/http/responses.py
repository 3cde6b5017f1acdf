"""POST /v1/responses: the request read into chat messages, and the `Response` object (plain JSON here,
the event stream in responses_stream.py). Nothing is stored: every request carries its whole input."""

from __future__ import annotations

import time
import uuid
from typing import Any

from quart import Blueprint, current_app, jsonify

from transerve.actors.client import GenerateRequest
from transerve.actors.messages import OutputOptions
from transerve.http.chat import chat_template_kwargs
from transerve.http.errors import OpenAIError
from transerve.http.fields import check_fields
from transerve.http.images import load_message_images
from transerve.http.output import Choice, collect, first_event, logprob_entries
from transerve.http.params import MAX_LOGPROBS, boolean, json_body, number, parse_messages, sampling
from transerve.http.response_items import finished, function_item, message_item, new_id, reasoning_item
from transerve.http.responses_stream import stream_response
from transerve.http.sse import SSE_HEADERS
from transerve.http.tools import chat_tools, template_messages

bp = Blueprint("responses", __name__)
ENDPOINT = "/v1/responses"
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _text(content: Any, param: str) -> Any:
    """function_call_output's output: a string, or content parts (of which the text counts)."""
    if isinstance(content, list):
        return [{"type": "text", "text": p.get("text", "")} if isinstance(p, dict) and "text" in p else p for p in content]
    if not isinstance(content, str):
        raise OpenAIError(f"{param} must be a string or a list of content parts", 400, param)
    return content


def input_messages(body: dict) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages, ready for the chat template."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise OpenAIError("'instructions' must be a string", 400, "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise OpenAIError("'input' must be a string or a non-empty list of input items", 400, "input")
    calls_open = False  # the last message is an assistant turn that function_call items extend
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise OpenAIError(f"{param} must be an object", 400, param)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": item.get("content")})
            calls_open = item.get("role") == "assistant"
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise OpenAIError(f"{param}: a function_call needs `call_id` and `name`", 400, param)
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
            if calls_open:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                calls_open = True
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"), f"{param}.output")})
            calls_open = False
        elif kind == "reasoning":
            continue  # earlier thoughts: chat templates drop them from past turns anyway
        else:
            raise OpenAIError(f"{param}: input items of type {kind!r} are not supported", 400, f"{param}.type")
    try:
        return template_messages(parse_messages(messages))
    except OpenAIError as exc:  # its params name chat messages; ours are input items
        raise OpenAIError(exc.message, 400, "input") from exc


def _options(body: dict) -> tuple[int | None, str | None]:
    """Check the partly supported fields; returns (top logprobs wanted, reasoning effort)."""
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(text, dict) or fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise OpenAIError("text.format: only {'type': 'text'} is supported (JSON output needs constrained decoding)",
                              400, "text.format")
    if body.get("truncation") not in (None, "disabled"):
        raise OpenAIError("truncation 'auto' is not supported: a prompt that does not fit is an error", 400, "truncation")
    if boolean(body, "background"):
        raise OpenAIError("background responses are not supported: nothing is stored to poll", 400, "background")
    include = body.get("include") or []
    if not isinstance(include, list):
        raise OpenAIError("'include' must be a list", 400, "include")
    for entry in include:
        if entry not in (LOGPROBS_INCLUDE, "reasoning.encrypted_content"):
            raise OpenAIError(f"include {entry!r} is not supported", 400, "include")
    top = number(body, "top_logprobs", 0, MAX_LOGPROBS, None, integer=True)
    if top is None and LOGPROBS_INCLUDE in include:
        top = 0
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise OpenAIError("'reasoning' must be an object", 400, "reasoning")
    return top, (reasoning or {}).get("effort")


@bp.post(ENDPOINT)
async def create_response():
    body = await json_body()
    check_fields(body, ENDPOINT)
    messages = input_messages(body)
    num_logprobs, effort = _options(body)
    tools = chat_tools(body, flat=True)
    engine = await current_app.config["MODELS"].get(body.get("model"))
    messages, images = await load_message_images(messages, engine, param="input")
    s = sampling(body, engine, max_tokens_fields=("max_output_tokens",), num_logprobs=num_logprobs)
    if s.n != 1:
        raise OpenAIError("a Response has one output: generation_config.num_return_sequences must be 1", 400, "generation_config")
    output = OutputOptions(tools=tools is not None, parallel_tool_calls=boolean(body, "parallel_tool_calls", True), reasoning=True)
    request = GenerateRequest(s.params, messages=tuple(messages), stop=s.stop, tools=tools, output=output,
                              chat_template_kwargs=chat_template_kwargs(body, effort), images=images)
    events = engine.generate([request])
    first = await first_event(events)
    base = response_base(body, engine.model_id, s.params.temperature, s.params.top_p, effort)
    if boolean(body, "stream"):
        return stream_response(base, first, events, num_logprobs is not None), 200, SSE_HEADERS
    choice = (await collect(events, 1, first))[0]
    return jsonify(finished(base, output_items(choice, num_logprobs is not None), choice.finish_reason, choice.usage))


def response_base(body: dict, model: str, temperature: float, top_p: float, effort: str | None) -> dict:
    """The Response fields that echo the request; status, output and usage are added as it runs."""
    tools = [t for t in (body.get("tools") or []) if isinstance(t, dict)] if body.get("tool_choice") != "none" else []
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": time.time(),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": None,
        "reasoning": {"effort": effort, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": tools,
        "top_logprobs": body.get("top_logprobs"),
        "top_p": top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
    }


def output_items(choice: Choice, logprobs: bool) -> list[dict]:
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    items = []
    if choice.reasoning:
        items.append(reasoning_item(new_id("rs"), choice.reasoning, status))
    if choice.text or not choice.tool_calls:
        items.append(message_item(new_id("msg"), choice.text, logprob_entries(choice.logprobs) if logprobs else None, status))
    items += [function_item(new_id("fc"), c.id, c.name, c.arguments, status) for c in choice.tool_calls]
    return items
