"""Tools in requests: validation of `tools` / `tool_choice`, and messages shaped for chat templates.

Chat templates (Qwen, Llama, Mistral, ...) read a tool call's arguments as a mapping, where OpenAI
sends a JSON string; they read tools in OpenAI's chat shape ({"type": "function", "function": {...}}),
which Responses flattens. Both are converted here.
"""

from __future__ import annotations

import json
from typing import Any

from transerve.http.errors import OpenAIError


def _function(spec: Any, param: str) -> dict[str, Any]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise OpenAIError(f"{param} must have a non-empty string `name`", 400, param)
    if spec.get("parameters") is not None and not isinstance(spec["parameters"], dict):
        raise OpenAIError(f"{param}.parameters must be a JSON schema object", 400, f"{param}.parameters")
    out = {"name": spec["name"]}
    if spec.get("description") is not None:
        out["description"] = str(spec["description"])
    out["parameters"] = spec.get("parameters") or {"type": "object", "properties": {}}
    return out


def chat_tools(body: dict, flat: bool = False) -> tuple[dict[str, Any], ...] | None:
    """The request's function tools in chat shape, or None when there are none or tool_choice is none.

    `flat`: Responses' shape, {"type": "function", "name": ..., "parameters": ...}."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if choice is None:
        choice = "auto"
    if choice not in ("auto", "none"):
        kind = choice if isinstance(choice, str) else "a named tool"
        raise OpenAIError(f"tool_choice {kind!r} is not supported: it needs constrained decoding; use 'auto' or 'none'",
                          400, "tool_choice")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise OpenAIError("'tools' must be a list", 400, "tools")
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise OpenAIError(f"{param}: tools of type {kind!r} are not supported; only 'function'", 400, f"{param}.type")
        spec = tool if flat else tool.get("function")
        out.append({"type": "function", "function": _function(spec, param if flat else f"{param}.function")})
    return None if choice == "none" else tuple(out)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as mappings."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if message["role"] == "assistant" and calls:
            if not isinstance(calls, list):
                raise OpenAIError(f"messages[{i}].tool_calls must be a list", 400, f"messages[{i}].tool_calls")
            message = {**message, "tool_calls": [_template_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(calls)]}
        elif message["role"] == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise OpenAIError(f"messages[{i}].tool_call_id must be a string", 400, f"messages[{i}].tool_call_id")
        out.append(message)
    return out


def _template_call(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OpenAIError(f"{param} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", 400, param)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise OpenAIError(f"{param}.function.arguments is not valid JSON: {exc}", 400, f"{param}.function.arguments") from exc
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}
