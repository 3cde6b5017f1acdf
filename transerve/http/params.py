"""Reading OpenAI request bodies: the JSON itself, messages, and the sampling fields."""

from __future__ import annotations

from typing import Any

from quart import request

from transerve.engine.request import SamplingParams
from transerve.http.errors import OpenAIError


async def json_body() -> dict[str, Any]:
    raw = await request.get_data(as_text=True)
    try:
        import json

        body = json.loads(raw)
    except ValueError as exc:
        raise OpenAIError(f"the request body is not valid JSON: {exc}", 400, code="invalid_json") from exc
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object", 400, code="invalid_json")
    return body


def _number(body: dict, name: str, lo: float, hi: float, default: float | None, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise OpenAIError(f"'{name}' must be {kind} between {lo} and {hi}, got {value!r}", 400, name)
    return value


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise OpenAIError("'stop' must be a non-empty string or a list of up to 4 of them", 400, "stop")
    return tuple(stop)


def sampling_params(body: dict, defaults: dict[str, Any], max_model_len: int) -> tuple[SamplingParams, bool]:
    """SamplingParams from the body, and whether max_tokens was given (else it fills the context)."""
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, None, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, None, integer=True)
    n = _number(body, "n", 1, 128, 1, integer=True)
    if n != 1:
        raise OpenAIError("only n=1 is supported", 400, "n")
    seed = _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else max_model_len,
        temperature=_number(body, "temperature", 0.0, 2.0, defaults.get("temperature", 1.0)),
        top_p=_number(body, "top_p", 0.0, 1.0, defaults.get("top_p", 1.0)) or 1e-9,
        top_k=int(defaults.get("top_k") or 0),
        min_p=float(defaults.get("min_p") or 0.0),
        seed=None if seed is None else seed & (2**62 - 1),
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return params, max_tokens is not None


def parse_messages(body: dict) -> list[dict[str, Any]]:
    """Validate chat messages and flatten text-part content to strings for the chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list of messages", 400, "messages")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{param} must be an object", 400, param)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise OpenAIError(f"{param}.role must be system, developer, user, assistant or tool, got {role!r}", 400, f"{param}.role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise OpenAIError(f"{param}.content[{j}]: content parts of type {kind!r} are not supported by this model",
                                      400, f"{param}.content")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        elif content is None and role != "assistant":
            raise OpenAIError(f"{param}.content is required", 400, f"{param}.content")
        elif content is not None and not isinstance(content, str):
            raise OpenAIError(f"{param}.content must be a string or a list of content parts", 400, f"{param}.content")
        out.append({**message, "role": "system" if role == "developer" else role, "content": content or ""})
    return out
