"""Reading OpenAI request bodies: the JSON itself, messages, and the sampling fields.

Sampling settings come from three places, later ones winning: the model's generation_config.json
(when it asks for sampling), the request's `generation_config`, the request's own OpenAI fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from quart import request

from transerve.engine.request import SamplingParams
from transerve.http.errors import OpenAIError
from transerve.http.genconfig import parse_generation_config
from transerve.http.images import has_image_parts, image_content

MAX_LOGPROBS = 20


async def json_body() -> dict[str, Any]:
    # Bytes, not text: json.loads detects the encoding, and a body that is not UTF-8 is a 400 from the
    # ValueError below (UnicodeDecodeError is one), never a 500 from decoding first.
    raw = await request.get_data()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise OpenAIError(f"the request body is not valid JSON: {exc}", 400, code="invalid_json") from exc
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object", 400, code="invalid_json")
    return body


def number(body: dict, name: str, lo: float, hi: float, default: Any = None, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise OpenAIError(f"'{name}' must be {kind} between {lo} and {hi}, got {value!r}", 400, name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OpenAIError(f"'{name}' must be true or false, got {value!r}", 400, name)
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


def parse_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise OpenAIError("'logit_bias' must map token ids to numbers between -100 and 100", 400, "logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            token_id = -1
        if not 0 <= token_id < vocab_size:
            raise OpenAIError(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})", 400, "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise OpenAIError(f"logit_bias: the bias of token {key} must be between -100 and 100, got {value!r}", 400, "logit_bias")
        out[token_id] = float(value)
    return out


@dataclass(frozen=True)
class Sampling:
    params: SamplingParams
    stop: tuple[str, ...]
    n: int


def sampling(body: dict, engine, *, max_tokens_fields: tuple[str, ...], default_max_tokens: int | None = None,
             num_logprobs: int | None = None) -> Sampling:
    """Everything about how to sample, from the body; 400s name the offending field."""
    defaults = dict(engine.generation_defaults)
    gen = parse_generation_config(body["generation_config"]) if body.get("generation_config") is not None else {}
    max_tokens = None
    for name in max_tokens_fields:
        max_tokens = number(body, name, 1, 2**31, None, integer=True)
        if max_tokens is not None:
            break
    if max_tokens is None:
        max_tokens = gen.get("max_tokens")
    n = number(body, "n", 1, 128, gen.get("n", 1), integer=True)
    seed = number(body, "seed", -(2**63), 2**63 - 1, None, integer=True)

    temperature = gen.get("temperature", defaults.get("temperature", 1.0))
    if gen.get("do_sample") is False:
        temperature = 0.0  # greedy, as transformers' generate() with do_sample=False
    elif gen.get("do_sample") is True and not temperature:
        temperature = 1.0
    bias = {**{t: float("-inf") for t in gen.get("suppress_tokens", [])}, **parse_logit_bias(body, engine.vocab_size)}
    bad_words = []
    for word in gen.get("bad_words_ids", []):
        if len(word) == 1:
            bias[word[0]] = float("-inf")
        else:
            bad_words.append(tuple(word))
    if any(t >= engine.vocab_size for t in bias):
        raise OpenAIError("generation_config names a token id beyond this model's vocabulary", 400, "generation_config")
    stop = parse_stop(body) or tuple(gen.get("stop", ()))
    try:
        params = SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=number(body, "temperature", 0.0, 2.0, temperature),
            top_p=number(body, "top_p", 0.0, 1.0, gen.get("top_p", defaults.get("top_p", 1.0))) or 1e-9,
            top_k=number(body, "top_k", 0, 2**31, int(gen.get("top_k", defaults.get("top_k") or 0)), integer=True),
            min_p=number(body, "min_p", 0.0, 1.0, float(gen.get("min_p", defaults.get("min_p") or 0.0))),
            seed=None if seed is None else seed & (2**62 - 1),
            stop_token_ids=tuple(gen.get("stop_token_ids", ())),
            ignore_eos=boolean(body, "ignore_eos"),
            repetition_penalty=number(body, "repetition_penalty", 1e-6, 100.0, gen.get("repetition_penalty", 1.0)),
            presence_penalty=number(body, "presence_penalty", -2.0, 2.0, 0.0),
            frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0, 0.0),
            logit_bias=tuple(sorted(bias.items())),
            num_logprobs=num_logprobs,
            min_tokens=gen.get("min_tokens", 0),
            no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0),
            bad_words_ids=tuple(bad_words),
        )
    except ValueError as exc:
        raise OpenAIError(str(exc), 400, "generation_config") from exc
    return Sampling(params, stop, n)


def choice_params(sampling: Sampling, index: int) -> SamplingParams:
    """The params of choice `index` of n: a given seed still gives each choice its own draws."""
    params = sampling.params
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) & (2**62 - 1))


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages and flatten text-part content to strings for the chat template."""
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
        if isinstance(content, list) and has_image_parts(content):
            content = image_content(content, f"{param}.content")  # kept as parts: the images' places
        elif isinstance(content, list):
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
