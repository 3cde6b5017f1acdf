"""Constrained decoding's request fields: chat's `response_format`, Responses' `text.format`, `tool_choice`
required or named, and vLLM's `structured_outputs` extension; each becomes the engine's GrammarSpec.

A spec that does not compile is a 400 from the tokenizer actor naming the field (engine/grammar.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from transerve.engine.request import GrammarKind, GrammarSpec
from transerve.http.errors import OpenAIError
from transerve.http.protocol.base import Part

JSON_NOTE = "the output is constrained to it (compact JSON: `, ` and `: ` separators)"
STRUCTURED_NOTE = ("extension (vLLM's): exactly one of `json` (a schema), `regex`, `choice` (a list of strings), `grammar` "
                   "(EBNF), `json_object`; the output is constrained to it")


class TextFormat(Part):
    type: Literal["text"]

    def grammar(self, param: str) -> GrammarSpec | None:
        return None


class JSONObjectFormat(Part):
    type: Literal["json_object"]

    def grammar(self, param: str) -> GrammarSpec | None:
        return GrammarSpec(GrammarKind.JSON_OBJECT, param=param)


def _schema_spec(schema: dict[str, Any] | None, param: str) -> GrammarSpec:
    # No schema is any JSON value, as OpenAI reads it; keys sorted so equal schemas share one compile.
    return GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(schema if schema is not None else {}, sort_keys=True), param)


class JSONSchema(Part):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # either way the output follows the schema


class JSONSchemaFormat(Part):
    """Chat's: `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`."""

    type: Literal["json_schema"]
    json_schema: JSONSchema

    def grammar(self, param: str) -> GrammarSpec | None:
        return _schema_spec(self.json_schema.schema_, f"{param}.json_schema.schema")


class FlatJSONSchemaFormat(Part):
    """Responses': `{"type": "json_schema", "name", "schema", "strict"}`."""

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def grammar(self, param: str) -> GrammarSpec | None:
        return _schema_spec(self.schema_, f"{param}.schema")


def _format_type(value: Any) -> str | None:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


ResponseFormat = Annotated[Annotated[TextFormat, Tag("text")] | Annotated[JSONObjectFormat, Tag("json_object")]
                           | Annotated[JSONSchemaFormat, Tag("json_schema")], Discriminator(_format_type)]
ResponsesTextFormat = Annotated[Annotated[TextFormat, Tag("text")] | Annotated[JSONObjectFormat, Tag("json_object")]
                                | Annotated[FlatJSONSchemaFormat, Tag("json_schema")], Discriminator(_format_type)]


class StructuredOutputs(Part):
    """vLLM's extension: exactly one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid")  # vLLM's other keys (structural_tag, ...) are a 400, not ignored
    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema (object or JSON text)")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = Field(None, description="EBNF (xgrammar's dialect, close to llama.cpp's GBNF)")
    json_object: bool | None = None
    disable_any_whitespace: bool | None = Field(None, description="accepted; the JSON is always compact here")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, _attr(name)) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, grammar, json_object (got {given or 'none'})")
        return self

    def grammar_spec(self, param: str = "structured_outputs") -> GrammarSpec:
        if self.json_ is not None:
            if isinstance(self.json_, dict):
                return _schema_spec(self.json_, f"{param}.json")
            return GrammarSpec(GrammarKind.JSON_SCHEMA, self.json_, f"{param}.json")
        if self.regex is not None:
            return GrammarSpec(GrammarKind.REGEX, self.regex, f"{param}.regex")
        if self.choice is not None:
            return GrammarSpec(GrammarKind.CHOICE, json.dumps(self.choice), f"{param}.choice")
        if self.grammar is not None:
            return GrammarSpec(GrammarKind.EBNF, self.grammar, f"{param}.grammar")
        return GrammarSpec(GrammarKind.JSON_OBJECT, param=f"{param}.json_object")


def _attr(name: str) -> str:
    return "json_" if name == "json" else name


class FunctionName(Part):
    name: str = Field(min_length=1)


class NamedToolChoice(Part):
    """Chat's `{"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName

    def name(self) -> str:
        return self.function.name


class ResponsesNamedToolChoice(Part):
    """Responses' `{"type": "function", "name": ...}`."""

    type: Literal["function"]
    name_: str = Field(alias="name", min_length=1)

    def name(self) -> str:
        return self.name_


def tool_calls_spec(tool_choice: Any, tools: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> GrammarSpec | None:
    """`required`: calls to any of `tools` ((name, parameters schema)); a named function: one call to it."""
    if tool_choice in (None, "auto", "none"):
        return None
    if not tools:
        raise OpenAIError("tool_choice: needs tools to call", 400, "tool_choice")
    if tool_choice != "required":
        name = tool_choice.name()
        tools = [tool for tool in tools if tool[0] == name]
        if not tools:
            raise OpenAIError(f"tool_choice: names {name!r}, which is not among the tools", 400, "tool_choice")
        parallel = False
    calls = [{"name": name, "parameters": params or {"type": "object", "properties": {}}} for name, params in tools]
    return GrammarSpec(GrammarKind.TOOL_CALLS, json.dumps({"tools": calls, "parallel": parallel}, sort_keys=True), "tools")


def one_grammar(*specs: tuple[str, GrammarSpec | None]) -> GrammarSpec | None:
    """The request's one constraint; two fields asking for one is a 400 naming the second."""
    given = [(field, spec) for field, spec in specs if spec is not None]
    if len(given) > 1:
        raise OpenAIError(f"{given[1][0]}: only one of {', '.join(f for f, _ in specs)} may constrain the output", 400,
                          given[1][0])
    return given[0][1] if given else None
