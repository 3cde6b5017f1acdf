"""GET /openapi.json: an OpenAPI 3.1 description of this server's API.

The request bodies are the protocol models' JSON Schemas (their nested parts under components/schemas),
so the document describes exactly what the server validates, each field with its status and note; the
rest (errors, models, health) is small and written out here. Only the routes the app really has are
described.
"""

from __future__ import annotations

import re
from functools import cache

from pydantic.json_schema import models_json_schema
from quart import Blueprint, current_app, jsonify

from transerve import __version__
from transerve.http.protocol import REQUESTS

bp = Blueprint("openapi", __name__)

_STR, _BOOL, _OBJ = {"type": "string"}, {"type": "boolean"}, {"type": "object"}
_SUMMARY = {"/v1/chat/completions": "Chat completion (JSON, or server-sent events with stream=true)",
            "/v1/completions": "Text completion (JSON, or server-sent events with stream=true)",
            "/v1/responses": "A Response (JSON, or server-sent events with stream=true)",
            "/v1/audio/transcriptions": "Transcribe audio (JSON, text, SRT, WebVTT, or server-sent events with stream=true)",
            "/v1/audio/translations": "Translate speech into English text (JSON, text, SRT, WebVTT)",
            "/v1/messages": "Anthropic Messages API: a Message (JSON, or Anthropic's server-sent events with stream=true)",
            "/v1/messages/count_tokens": "Anthropic Messages API: the prompt's length in tokens",
            "/v1/embeddings": "Embed text or token ids (vectors as floats or base64 float32)"}
_ANSWER = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion", "/v1/responses": "response"}
_TRANSCRIPT = {"type": "object", "required": ["text"], "properties": {"text": _STR}}
_ANTHROPIC = {  # Anthropic's answers are typed by `type`, not `object`
    "/v1/messages": {"type": "object", "required": ["id", "type", "content"],
                     "properties": {"id": _STR, "type": {"const": "message"}, "content": {"type": "array"}}},
    "/v1/messages/count_tokens": {"type": "object", "required": ["input_tokens"],
                                  "properties": {"input_tokens": {"type": "integer", "minimum": 0}}}}
_REF = "#/components/schemas/{model}"


@cache
def request_schemas() -> tuple[dict[str, dict], dict[str, dict]]:
    """({endpoint: a $ref to its body's schema}, every schema those refs need, by name)."""
    refs, defs = models_json_schema([(model, "validation") for model in REQUESTS.values()], ref_template=_REF)
    return {endpoint: refs[(model, "validation")] for endpoint, model in REQUESTS.items()}, defs.get("$defs", {})


def _int(lo: int) -> dict:
    return {"type": "integer", "minimum": lo}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {"400": _error("malformed or out-of-range field (`param` names it), or a prompt too long for the context"),
           "401": _error("missing or wrong API key (only when the server has one)"),
           "404": _error("unknown model"), "413": _error("request body over --max-request-bytes"),
           "429": {**_error("queue full (--max-queued-requests); retry after Retry-After seconds"),
                   "headers": {"Retry-After": {"schema": _int(0)}}},
           "500": _error("the model step failed (its requests fail; the server keeps serving)"),
           "503": _error("the server is shutting down or the model is being unloaded")}


_EMBEDDINGS = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"const": "list"}, "model": _STR, "usage": _OBJ,
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"const": "embedding"}, "index": _int(0),
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, _STR]}}}}}}


def _answers(endpoint: str) -> dict:
    if endpoint in _ANTHROPIC:
        return {"application/json": {"schema": _ANTHROPIC[endpoint]}, "text/event-stream": {"schema": _STR}}
    if endpoint == "/v1/embeddings":
        return {"application/json": {"schema": _EMBEDDINGS}}
    if endpoint not in _ANSWER:  # a transcript: JSON, or text as response_format asks
        return {"application/json": {"schema": _TRANSCRIPT}, "text/plain": {"schema": _STR}, "text/vtt": {"schema": _STR},
                "text/event-stream": {"schema": _STR}}
    answer = {"type": "object", "required": ["id", "object"], "properties": {"id": _STR, "object": {"const": _ANSWER[endpoint]}}}
    return {"application/json": {"schema": answer}, "text/event-stream": {"schema": _STR}}


def _generation_operation(endpoint: str) -> dict:
    body = {"schema": request_schemas()[0][endpoint]}
    return {"post": {
        "summary": _SUMMARY[endpoint], "operationId": endpoint.strip("/").replace("/", "_"),
        "requestBody": {"required": True, "content": {REQUESTS[endpoint].media_type: body}},
        "responses": {"200": {"description": "the answer", "content": _answers(endpoint)}, **_ERRORS},
    }}


def _get(summary: str, operation_id: str, content_type: str, schema: dict, errors: tuple[str, ...] = ()) -> dict:
    return {"get": {"summary": summary, "operationId": operation_id,
                    "responses": {"200": {"description": "OK", "content": {content_type: {"schema": schema}}},
                                  **{code: _ERRORS[code] for code in errors}}}}


_MODEL = {"type": "object", "required": ["id", "object"], "properties": {
    "id": _STR, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STR, "loaded": _BOOL,
    "generation_defaults": {"type": "object", "additionalProperties": {"type": "number"},
                            "description": "extension: the sampling a request that sets none gets (loaded text models)"},
    "precision": {"type": "string", "description": "extension: what a loaded text model's linears compute in "
                  "(a GGUF's own quantized formats such as 'Q4_1+Q8_0', 'int8', or a float dtype)"}}}


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
    for endpoint in REQUESTS:
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
            "schemas": {**request_schemas()[1], "Error": {"type": "object", "required": ["error"], "properties": {"error": {
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
