"""The tool-call syntaxes the output parser knows, and how to tell which one a model speaks.

- hermes (Qwen, Hermes, SmolLM3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated;
- llama3_json (Llama 3.x): a reply that is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;`;
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}` (optionally `name[CALL_ID]id[ARGS]{...}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

THINK, END_THINK = "<think>", "</think>"
HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
MISTRAL_NAME = re.compile(r"([A-Za-z_][\w.\-]*)(?:\[CALL_ID\][\w\-]*)?\[ARGS\]")
MISTRAL_NAME_PREFIX = re.compile(r"[A-Za-z_][\w.\-]*(\[[A-Z_]*(\][\w\-]*(\[[A-Z]*)?)?)?")


@dataclass(frozen=True)
class ToolFormat:
    start: str  # the marker that opens tool calls
    end: str | None = None  # the marker that closes each call
    bare_json: bool = False  # a reply starting with "{" is a call
    separator: str | None = None  # between calls after one start marker


TOOL_FORMATS = {
    "hermes": ToolFormat("<tool_call>", end="</tool_call>"),
    "llama3_json": ToolFormat("<|python_tag|>", bare_json=True, separator=";"),
    "mistral": ToolFormat("[TOOL_CALLS]"),
}


def detect_tool_format(chat_template: str, vocab: set[str] | dict) -> str:
    """The tool-call syntax a model was trained on, read from its chat template and vocabulary."""
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template or "[TOOL_CALLS]" in vocab:
        return "mistral"
    if "<|python_tag|>" in chat_template or "<|start_header_id|>" in chat_template:
        return "llama3_json"
    return "hermes"  # the most common syntax among open models


def tool_call_structure(tool_format: str, tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """An xgrammar structural tag for `tool_choice` required or named: one call (several if `parallel`) to
    one of `tools` ({"name", "parameters"}), its arguments valid against the tool's schema, written the
    way this format writes calls, so the output parser reads it like any other call."""
    key = "parameters" if tool_format == "llama3_json" else "arguments"
    before, after, separator = {"hermes": ("<tool_call>\n", "\n</tool_call>", "\n"), "llama3_json": ("", "", "; "),
                                "mistral": ("", "", ", ")}[tool_format]
    tags = [{"type": "tag", "begin": f'{before}{{"name": {json.dumps(tool["name"])}, "{key}": ',
             # At most one whitespace character between tokens: a small model could pad forever.
             "content": {"type": "json_schema", "json_schema": tool["parameters"], "max_whitespace_cnt": 1},
             "end": "}" + after} for tool in tools]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
             "stop_after_first": not parallel}
    if tool_format == "mistral":  # [TOOL_CALLS][{...}, {...}]
        calls = {"type": "sequence", "elements": [{"type": "const_string", "value": TOOL_FORMATS["mistral"].start + "["},
                                                  calls, {"type": "const_string", "value": "]"}]}
    return {"type": "structural_tag", "format": calls}


def marker_tokens(tool_format: str | None, reasoning: bool) -> tuple[str, ...]:
    """Marker strings the detokenizer must not drop even when the tokenizer calls them special."""
    markers = [THINK, END_THINK] if reasoning else []
    if tool_format is not None:
        fmt = TOOL_FORMATS[tool_format]
        markers += [m for m in (fmt.start, fmt.end, "[ARGS]", "[CALL_ID]") if m]
    return tuple(markers)


def json_end(text: str) -> int | None:
    """Index just past the JSON object that starts `text`, or None while it is incomplete."""
    depth, in_string, escape = 0, False, False
    for k, ch in enumerate(text):
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
    return None
