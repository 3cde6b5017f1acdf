"""What every request model shares: each field's status and note carried on the field, null read as
absent, unknown fields refused, and pydantic's errors turned into OpenAI's 400s naming the field.

A field is honoured, honoured for some values (`partly`: the others are a 400 that names it), accepted
and ignored (with the reason), or rejected (a 400 that names it when given a non-null value). Its
status lands in the JSON Schema as `x-status`, its note as the description; the README tables and
/openapi.json are both read off the models.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import cache
from typing import Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from transerve.http.errors import OpenAIError


class Status(str, enum.Enum):
    HONOURED = "honoured"
    PARTLY = "partly"
    IGNORED = "ignored"
    REJECTED = "rejected"


HONOURED, PARTLY, IGNORED, REJECTED = Status.HONOURED, Status.PARTLY, Status.IGNORED, Status.REJECTED
STATUS_KEY = "x-status"


def spec(status: Status, note: str = "", default: Any = None, **constraints: Any) -> Any:
    """A field with its status and note (what transerve does with it, and why)."""
    return Field(default, description=note or None, json_schema_extra={STATUS_KEY: status.value}, **constraints)


def rejected(note: str) -> Any:
    """A field the server refuses: any non-null value is a 400 naming it."""
    return spec(REJECTED, note)


def status_of(field) -> Status:
    return Status(field.json_schema_extra[STATUS_KEY])


def only(accepts: Callable[[Any], bool], message: str) -> BeforeValidator:
    """For a `partly` field: a value it does not take is a 400 naming the field, saying why."""

    def check(value: Any) -> Any:
        if value is not None and not accepts(value):
            raise PydanticCustomError("unsupported_value", message)
        return value

    return BeforeValidator(check)


def invalid(field: str, message: str) -> PydanticCustomError:
    """An error a model validator raises about one of its fields (the model's own loc plus `field`)."""
    return PydanticCustomError("invalid_value", message, {"field": field})


JSON, FORM = "application/json", "multipart/form-data"


def _json_schema(schema: dict[str, Any], cls: type) -> None:
    """Null is accepted wherever a field of a JSON body is optional (a form has no null: a field is
    there or not); rejected fields are not offered at all."""
    properties = schema.get("properties", {})
    for name in [n for n, p in properties.items() if p.get(STATUS_KEY) == REJECTED.value]:
        del properties[name]
    if getattr(cls, "media_type", JSON) == FORM:
        for prop in properties.values():
            _drop_null(prop)
        return
    required = set(schema.get("required", ()))
    for name, prop in properties.items():
        if name in required or prop.get("type") == "null" or {"type": "null"} in prop.get("anyOf", ()):
            continue
        meta = {k: prop.pop(k) for k in ("title", "description", "default", STATUS_KEY) if k in prop}
        properties[name] = {"anyOf": [prop, {"type": "null"}], **meta}


def _drop_null(prop: dict[str, Any]) -> None:
    if prop.get("default", ...) is None:
        del prop["default"]
    forms = [f for f in prop.get("anyOf", ()) if f != {"type": "null"}]
    if len(forms) == 1:
        del prop["anyOf"]
        prop.update(forms[0])
    elif forms:
        prop["anyOf"] = forms


@cache
def _field_names() -> frozenset[str]:
    """Every field name of every protocol model: what in an error's loc is a field, not a union member
    (pydantic puts member labels, like `str` or a class name, and dict keys in locs too)."""
    names, todo = set(), [Part]
    while todo:
        cls = todo.pop()
        names.update(cls.model_fields)
        todo += cls.__subclasses__()
    return frozenset(names)


class Part(BaseModel):
    """A nested object of a request (a message, a content part, a tool): null fields read as absent,
    keys it does not declare ignored, as OpenAI's own objects grow new optional keys often."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, json_schema_extra=_json_schema)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        _field_names.cache_clear()  # a new model's fields count as fields in error locs too

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None}
        return data


class RequestBody(Part):
    """An endpoint's whole body: a field it does not know is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    endpoint: ClassVar[str]
    media_type: ClassVar[str] = JSON

    @model_validator(mode="before")
    @classmethod
    def _refuse_rejected(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in _rejected_fields(cls):
                if data.get(name) is not None:
                    note = cls.model_fields[name].description
                    raise PydanticCustomError("rejected", f"{name!r} is not supported: {note}", {"field": name})
        return data

    @classmethod
    def parse(cls, raw: bytes | str):
        """The body, validated; any problem is an OpenAI-style 400 whose `param` names the field."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise openai_error(exc, cls.endpoint) from None

    @classmethod
    def fields(cls) -> dict[str, tuple[Status, str]]:
        """Every field by its wire name: (status, note)."""
        return {name: (status_of(f), f.description or "") for name, f in cls.model_fields.items()}


@cache
def _rejected_fields(cls: type[RequestBody]) -> tuple[str, ...]:
    return tuple(name for name, f in cls.model_fields.items() if status_of(f) == REJECTED)


# Turning pydantic's errors into one OpenAI error.

_NOT_THIS_KIND = ("_type", "literal_error", "union_tag_not_found")
_SHOW_INPUT = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error", "string_pattern_mismatch",
               "int_type", "float_type", "string_type", "bool_type", "finite_number", "int_parsing", "float_parsing",
               "bool_parsing"}


def _split(loc: tuple) -> tuple[str, list[tuple[int, str]]]:
    """(`messages[2].content`, the union members or dict keys passed on the way, with where)."""
    param, others, fields = "", [], _field_names()
    for seg in loc:
        if isinstance(seg, int):
            param += f"[{seg}]"
        elif seg in fields:
            param += f".{seg}" if param else seg
        else:
            others.append((len(param), seg))
    return param, others


def _wrong_kind(error: dict) -> bool:
    """An error saying only that a union member is the wrong kind of value (a list is not a string)."""
    loc = error["loc"]
    return bool(loc) and isinstance(loc[-1], str) and loc[-1] not in _field_names() and error["type"].endswith(_NOT_THIS_KIND)


def openai_error(exc: ValidationError, endpoint: str) -> OpenAIError:
    errors = exc.errors(include_url=False)
    errors = [e for e in errors if not _wrong_kind(e)] or errors
    error = errors[0]
    kind, ctx = error["type"], error.get("ctx") or {}
    param, others = _split(error["loc"])
    if kind == "json_invalid":
        return OpenAIError(f"the request body is not valid JSON: {ctx.get('error', error['msg'])}", 400, code="invalid_json")
    if kind in ("model_type", "model_attributes_type") and not error["loc"]:
        return OpenAIError("the request body must be a JSON object", 400, code="invalid_json")
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        where = _split(error["loc"][:-1])[0]
        return OpenAIError(f"unknown field {name!r}: {where or endpoint} does not take it", 400,
                           f"{where}.{name}" if where else name, "unsupported_parameter")
    if kind == "rejected":
        return OpenAIError(error["msg"], 400, ctx["field"], "unsupported_parameter")
    if "field" in ctx:  # a model validator naming one of the model's fields
        param = f"{param}.{ctx['field']}" if param else ctx["field"]
    message = error["msg"].removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        param, message = f"{param}.type", f"{ctx.get('tag')!r} is not supported here"
    elif kind == "missing" and not others:
        return OpenAIError(f"{param!r} is required", 400, param)
    elif kind in _SHOW_INPUT:
        got = repr(error.get("input"))
        message += f", got {got if len(got) <= 80 else got[:77] + '...'}"
    if others:
        # Errors inside different members of a union (or under different keys of a mapping): the value
        # fits none of its forms, so the field that holds the union is named.
        at, label = others[0]
        if any(_split(e["loc"])[1][:1] != [(at, label)] for e in errors[1:]):
            message = f"matches none of the accepted forms ({param}: {message})"
            param = param[:at]
    return OpenAIError(f"{param}: {message}", 400, param or None)
