"""GET /openapi.json: an OpenAPI 3.1 description of this server's API, written by hand.

quart-schema would want a model class per body and decorators on every handler, and fights the
streaming endpoints; the request bodies here are OpenAI's, so their JSON Schemas are written out
once below. Which fields each endpoint takes comes from `transerve.http.fields` (the same tables that
make unknown fields a 400), so the document cannot list a field the server refuses, and a test
checks that every accepted field has a schema. Only the routes the app really has are described.
"""

from __future__ import annotations

import re

from quart import Blueprint, current_app, jsonify

from transerve import __version__

bp = Blueprint("openapi", __name__)

_STR, _BOOL, _OBJ = {"type": "string"}, {"type": "boolean"}, {"type": "object"}
_STRINGS = {"type": "array", "items": _STR}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}


def _int(lo: int | None = None, hi: int | None = None) -> dict:
    return {"type": "integer", **({"minimum": lo} if lo is not None else {}), **({"maximum": hi} if hi is not None else {})}


def _num(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def _one_of(*schemas: dict) -> dict:
    return {"oneOf": list(schemas)}


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"enum": ["text", "input_text", "output_text"]}, "text": _STR}}
_IMAGE_URL_PART = {"type": "object", "required": ["type", "image_url"], "properties": {  # vision-language models
    "type": {"const": "image_url"}, "image_url": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "description": "a data: URL (base64) or an http(s) URL"}, "detail": _STR}}}}
_INPUT_IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "properties": {
    "type": {"const": "input_image"}, "image_url": {"type": "string", "description": "a data: URL (base64) or an http(s) URL"},
    "detail": _STR}}
_CONTENT = _one_of(_STR, {"type": "array", "items": _one_of(_TEXT_PART, _IMAGE_URL_PART)}, {"type": "null"})
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 64}, "description": _STR, "parameters": _OBJ, "strict": _BOOL}}
_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": _STR, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {"name": _STR, "arguments": _STR}}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]}, "content": _CONTENT, "name": _STR,
    "tool_calls": {"type": "array", "items": _TOOL_CALL}, "tool_call_id": _STR}}
_INPUT_ITEM = _one_of(
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": _one_of(_STR, {"type": "array", "items": _one_of(_TEXT_PART, _INPUT_IMAGE_PART)})}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": _STR, "name": _STR, "arguments": _STR}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": _STR, "output": _STR}},
)

# Every request field, by name; where endpoints differ, "endpoint name" wins over the plain name.
FIELD_SCHEMAS: dict[str, dict] = {
    "model": {"type": "string", "description": "repo or repo@revision in the server's HF cache (ignored when the server pins a model)"},
    "temperature": _num(0, 2), "top_p": _num(0, 1), "top_k": _int(0), "min_p": _num(0, 1),
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
    "presence_penalty": _num(-2, 2), "frequency_penalty": _num(-2, 2),
    "seed": _int(-(2**63), 2**63 - 1), "n": _int(1, 128), "ignore_eos": _BOOL, "user": _STR,
    "stop": _one_of({"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 4}),
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": _num(-100, 100)},
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL, "include_obfuscation": _BOOL}},
    "generation_config": _one_of(_OBJ, _STR),
    "chat_template_kwargs": _OBJ,
    "prompt_cache_key": _STR, "prompt_cache_retention": _STR, "prompt_cache_options": _OBJ, "service_tier": _STR,
    "safety_identifier": _STR, "store": _BOOL,
    "metadata": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 512}},
    "parallel_tool_calls": _BOOL,
    # chat
    "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
    "max_completion_tokens": _int(1), "max_tokens": _int(1),
    "logprobs": _BOOL, "top_logprobs": _int(0, 20),
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": _FUNCTION}}},
    "tool_choice": _one_of({"enum": ["none", "auto", "required"]}, {"type": "object", "required": ["type", "function"],
                           "properties": {"type": {"const": "function"}, "function": {
                               "type": "object", "required": ["name"], "properties": {"name": _STR}}}}),
    "response_format": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}, "json_schema": _OBJ}},
    "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high"]},
    "modalities": {"type": "array", "items": {"enum": ["text", "audio"]}},
    "prediction": _OBJ, "verbosity": {"enum": ["low", "medium", "high"]},
    # completions
    "prompt": _one_of(_STR, _STRINGS, _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}),
    "/v1/completions logprobs": _int(0, 20),
    "echo": _BOOL, "best_of": _int(1, 128),
    # responses
    "input": _one_of(_STR, {"type": "array", "items": _INPUT_ITEM, "minItems": 1}),
    "instructions": _STR, "max_output_tokens": _int(1),
    "/v1/responses tools": {"type": "array", "items": {**_FUNCTION, "required": ["type", "name"], "properties": {
        **_FUNCTION["properties"], "type": {"const": "function"}}}},
    "/v1/responses tool_choice": _one_of({"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "name"], "properties": {"type": {"const": "function"}, "name": _STR}}),
    "include": _STRINGS,
    "reasoning": {"type": "object", "properties": {"effort": _STR, "summary": _STR}},
    "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]}}}, "verbosity": _STR}},
    "truncation": {"enum": ["auto", "disabled"]}, "max_tool_calls": _int(1), "background": _BOOL,
}

_REQUIRED = {"/v1/chat/completions": ["model", "messages"], "/v1/completions": ["model", "prompt"],
             "/v1/responses": ["model", "input"]}
_SUMMARY = {"/v1/chat/completions": "Chat completion (JSON, or server-sent events with stream=true)",
            "/v1/completions": "Text completion (JSON, or server-sent events with stream=true)",
            "/v1/responses": "A Response (JSON, or server-sent events with stream=true)"}
_ANSWER = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion", "/v1/responses": "response"}


def field_schema(endpoint: str, name: str) -> dict:
    return FIELD_SCHEMAS.get(f"{endpoint} {name}") or FIELD_SCHEMAS[name]


def request_schema(endpoint: str) -> dict:
    """The JSON Schema of an endpoint's body: the fields it accepts, each with its note."""
    from transerve.http.fields import REJECTED, TABLES

    properties = {}
    for name, field in sorted(TABLES[endpoint].items()):
        if field.status != REJECTED:
            note = f"{field.status}: {field.note}" if field.note else field.status
            properties[name] = {**field_schema(endpoint, name), "description": note}
    return {"type": "object", "required": _REQUIRED[endpoint], "properties": properties, "additionalProperties": False}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {"400": _error("malformed or out-of-range field (`param` names it), or a prompt too long for the context"),
           "401": _error("missing or wrong API key (only when the server has one)"),
           "404": _error("unknown model"), "413": _error("request body over --max-request-bytes"),
           "429": {**_error("queue full (--max-queued-requests); retry after Retry-After seconds"),
                   "headers": {"Retry-After": {"schema": _int(0)}}},
           "500": _error("the model step failed (its requests fail; the server keeps serving)"),
           "503": _error("the server is shutting down or the model is being unloaded")}


def _generation_operation(endpoint: str) -> dict:
    answer = {"type": "object", "required": ["id", "object"], "properties": {"id": _STR, "object": {"const": _ANSWER[endpoint]}}}
    return {"post": {
        "summary": _SUMMARY[endpoint], "operationId": endpoint.strip("/").replace("/", "_"),
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(endpoint)}}},
        "responses": {"200": {"description": "the answer", "content": {
            "application/json": {"schema": answer},
            "text/event-stream": {"schema": {"type": "string"}}}}, **_ERRORS},
    }}


def _get(summary: str, operation_id: str, content_type: str, schema: dict, errors: tuple[str, ...] = ()) -> dict:
    return {"get": {"summary": summary, "operationId": operation_id,
                    "responses": {"200": {"description": "OK", "content": {content_type: {"schema": schema}}},
                                  **{code: _ERRORS[code] for code in errors}}}}


_MODEL = {"type": "object", "required": ["id", "object"], "properties": {
    "id": _STR, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STR, "loaded": _BOOL}}


def build_document(rules: set[str], api_key_required: bool) -> dict:
    """The document for an app whose URL rules are `rules` (OpenAPI path templates)."""
    paths = {
        "/v1/models": _get("Models in the local HF cache, and the loaded ones", "list_models", "application/json",
                           {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}},
                           ("401",)),
        "/v1/models/{model_id}": _get("One model", "get_model", "application/json", _MODEL, ("401", "404")),
        "/health": _get("200 while the server is up (never needs the API key)", "health", "application/json", _OBJ),
        "/metrics": _get("Prometheus metrics (never needs the API key)", "metrics", "text/plain", _STR),
        "/openapi.json": _get("This document", "openapi", "application/json", _OBJ),
    }
    for endpoint in _REQUIRED:
        if endpoint in rules:
            paths[endpoint] = _generation_operation(endpoint)
    if "/v1/models/{model_id}" in paths:
        paths["/v1/models/{model_id}"]["get"]["parameters"] = [
            {"name": "model_id", "in": "path", "required": True, "schema": _STR, "description": "may contain /"}]
    if api_key_required:
        for path, item in paths.items():
            if path.startswith("/v1/"):
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "transerve", "version": __version__,
                 "description": "An OpenAI-compatible inference server for Hugging Face transformers models."},
        "paths": {path: item for path, item in paths.items() if path in rules},
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": _STR, "type": _STR, "param": {"type": ["string", "null"]},
                               "code": {"type": ["string", "null"]}}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def openapi_path(rule: str) -> str:
    """Quart's `/v1/models/<path:model_id>` as OpenAPI's `/v1/models/{model_id}`."""
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)


@bp.get("/openapi.json")
async def openapi():
    rules = {openapi_path(rule.rule) for rule in current_app.url_map.iter_rules()}
    return jsonify(build_document(rules, current_app.config.get("API_KEY_REQUIRED", False)))
