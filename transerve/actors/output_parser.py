"""Splits a model's streamed text into answer, thoughts (`<think>…</think>`) and tool calls.

Pure and synchronous: the detokenizer feeds it the text that is safe to show (stop strings already
handled) and forwards what comes out. Text that might be the start of a marker is held back until the
next piece decides it. The tool-call formats are in tool_formats.py.

A call's id and name go out as soon as `"name": "...", "arguments":` has been read; its arguments then
stream as raw JSON text, fragment by fragment. Text that opens a call but does not parse as one is
given back as answer text, as vLLM does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from transerve.actors.messages import ToolCallDelta
from transerve.actors.tool_formats import END_THINK, HEADER, MISTRAL_NAME, MISTRAL_NAME_PREFIX, THINK, TOOL_FORMATS, json_end

@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class OutputParser:
    def __init__(self, tool_format: str | None, reasoning: bool, in_reasoning: bool = False, parallel: bool = True):
        self.fmt = TOOL_FORMATS[tool_format] if tool_format else None
        self.reasoning = reasoning
        self.parallel = parallel
        self.mode = "reasoning" if in_reasoning else "start"
        self.buf = ""
        self.strip = in_reasoning  # drop the leading whitespace of the next text of the current kind
        self.content_started = False
        self.num_calls = 0  # calls whose header went out
        self.done = False  # a call is complete and parallel calls are off: nothing more is wanted
        self.raw = ""  # text consumed since the last call marker, given back if the call fails to parse
        self.in_list = False  # inside mistral's [ ... ] list of calls
        self.in_object = False  # the call's arguments sit inside a {"name": ..., ...} object
        self._scan_reset(0)

    @property
    def in_reasoning(self) -> bool:
        return self.mode == "reasoning"

    def feed(self, text: str, final: bool) -> Parsed:
        out = Parsed()
        self.buf += text
        while not self.done and self._step(out, final):
            pass
        if self.done:
            self.buf = ""
        elif final:
            self._flush(out)
        return out

    # -- emitting -------------------------------------------------------------------------------
    def _reasoning(self, out: Parsed, text: str) -> None:
        if self.strip:
            text = text.lstrip()
        if text:
            self.strip = False
            out.reasoning += text

    def _content(self, out: Parsed, text: str) -> None:
        if self.strip:
            text = text.lstrip()
        if text:
            self.strip = False
            self.content_started = True
            out.content += text

    def _consume(self, n: int) -> None:
        self.raw += self.buf[:n]
        self.buf = self.buf[n:]

    # -- the state machine: each step consumes text or changes mode (True), or waits (False) -----
    def _step(self, out: Parsed, final: bool) -> bool:
        return getattr(self, "_step_" + self.mode)(out, final)

    def _step_start(self, out: Parsed, final: bool) -> bool:
        head = self.buf.lstrip()
        if self.reasoning:
            if head.startswith(THINK):
                self.buf, self.mode, self.strip = head[len(THINK):], "reasoning", True
                return True
            if THINK.startswith(head) and not final:
                return False
        self.mode = "content"
        return True

    def _step_reasoning(self, out: Parsed, final: bool) -> bool:
        i = self.buf.find(END_THINK)
        if i >= 0:
            self._reasoning(out, self.buf[:i].rstrip())
            self.buf, self.mode, self.strip = self.buf[i + len(END_THINK):], "content", True
            return True
        if final:
            return False  # _flush sends the rest
        safe = self.buf[: len(self.buf) - _partial(self.buf, END_THINK)].rstrip()  # whitespace may precede </think>
        self._reasoning(out, safe)
        self.buf = self.buf[len(safe):]
        return False

    def _step_content(self, out: Parsed, final: bool) -> bool:
        fmt = self.fmt
        if fmt is None:
            self._content(out, self.buf)
            self.buf = ""
            return False
        if fmt.bare_json and not self.content_started and self.num_calls == 0:
            head = self.buf.lstrip()
            if not head and not final:
                return False
            if head.startswith("{"):
                self.buf, self.raw, self.mode = head, "", "call"
                return True
        i = self.buf.find(fmt.start)
        if i >= 0:
            self._content(out, self.buf[:i].rstrip())
            self.raw, self.buf, self.mode = fmt.start, self.buf[i + len(fmt.start):], "call"
            return True
        if final:
            return False
        safe = self.buf[: len(self.buf) - _partial(self.buf, fmt.start)].rstrip()  # a call may follow whitespace
        self._content(out, safe)
        self.buf = self.buf[len(safe):]
        return False

    def _step_call(self, out: Parsed, final: bool) -> bool:
        """At the start of a call, or at list punctuation between calls."""
        head = self.buf.lstrip()
        self._consume(len(self.buf) - len(head))
        if not head:
            return False
        mistral = self.fmt is TOOL_FORMATS["mistral"]
        if mistral and (head[0] == "[" and not self.in_list or self.in_list and head[0] in ",]"):
            self._consume(1)
            self.in_list = head[0] != "]"
            if not self.in_list:
                self.mode, self.strip = "content", True
            return True
        if head[0] == "{":
            match = HEADER.match(head)
            if match:
                self._open(out, json.loads(f'"{match.group(1)}"'))
                self._consume(match.end())
                self.mode, self.in_object = "args", True
                return True
            end = json_end(head)
            if end is None:
                return self._fail(out) if final else False
            try:
                call = json.loads(head[:end])
                name = call["name"]
                arguments = call.get("arguments", call.get("parameters", {}))
            except (ValueError, KeyError, TypeError):
                return self._fail(out)
            if not isinstance(name, str):
                return self._fail(out)
            self._open(out, name)
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            out.tool_calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))
            self._consume(end)
            return self._call_done()
        if mistral and not self.in_list:
            match = MISTRAL_NAME.match(head)
            if match:
                self._open(out, match.group(1))
                self._consume(match.end())
                self.mode, self.in_object = "args", False
                return True
            if MISTRAL_NAME_PREFIX.fullmatch(head) and not final:
                return False
        return self._fail(out)

    def _step_args(self, out: Parsed, final: bool) -> bool:
        """Stream the arguments value's raw JSON text until the value ends."""
        if not self.args_started:
            head = self.buf.lstrip()
            self._consume(len(self.buf) - len(head))
            if not head:
                return False
            self.args_started, self.string_args = True, head[0] == '"'
        end, complete = self._scan(self.buf)
        chunk = self.buf[:end]
        self._consume(end)
        if self.string_args:  # arguments given as a JSON string holding JSON: send it decoded, whole
            self.args_text += chunk
            if complete:
                try:
                    chunk = json.loads(self.args_text)
                except ValueError:
                    chunk = self.args_text
        if chunk and (complete or not self.string_args):
            out.tool_calls.append(ToolCallDelta(self.num_calls - 1, arguments=chunk))
        if not complete:
            return False
        if self.in_object:
            self._scan_reset(1)  # inside the call object still: read to its closing brace
            self.mode = "close_object"
        else:
            self._call_done()
        return True

    def _step_close_object(self, out: Parsed, final: bool) -> bool:
        end, complete = self._scan(self.buf)
        self._consume(end)
        return self._call_done() if complete else False

    def _step_after_call(self, out: Parsed, final: bool) -> bool:
        fmt = self.fmt
        head = self.buf.lstrip()
        if fmt.end is not None:
            if head.startswith(fmt.end):
                self.buf = head[len(fmt.end):]
            elif fmt.end.startswith(head) and not final:
                return False
            self.mode, self.strip = "content", True
        elif fmt.separator is not None:
            if head.startswith(fmt.separator):
                self.buf, self.raw, self.mode = head[len(fmt.separator):], "", "call"
            elif not head and not final:
                return False
            else:
                self.mode, self.strip = "content", True
        else:
            self.mode = "call" if self.in_list else "content"
            self.strip = True
        return True

    # -- calls ----------------------------------------------------------------------------------
    def _open(self, out: Parsed, name: str) -> None:
        out.tool_calls.append(ToolCallDelta(self.num_calls, id=f"call_{uuid.uuid4().hex[:24]}", name=name))
        self.num_calls += 1
        self._scan_reset(0)

    def _call_done(self) -> bool:
        self.raw = ""
        if not self.parallel:
            self.done = True
        self.mode = "after_call"
        return True

    def _fail(self, out: Parsed) -> bool:
        """Not a tool call after all: everything since the marker is answer text, and so is the rest."""
        self.buf, self.raw = self.raw + self.buf, ""
        self.fmt, self.in_list, self.mode = None, False, "content"
        return True

    def _scan_reset(self, depth: int) -> None:
        self.depth, self.in_string, self.escape = depth, False, False
        self.args_started, self.string_args, self.args_text = False, False, ""

    def _scan(self, text: str) -> tuple[int, bool]:
        """Advance over one JSON value (or to the close of the current container when depth starts
        at 1); returns how much of `text` belongs to it and whether it ended."""
        for k, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return k + 1, True
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                if self.depth == 0:  # the end of a bare value, and the close of what holds it
                    return k, True
                self.depth -= 1
                if self.depth == 0:
                    return k + 1, True
            elif self.depth == 0 and ch in ", \t\r\n":  # the end of a bare number, true, false or null
                return k, True
        return len(text), False

    def _flush(self, out: Parsed) -> None:
        """The model finished: whatever is held back goes out as what it most likely is."""
        if self.mode == "call":  # a marker (or a separator) with no complete call after it
            self._fail(out)
        if self.mode in ("start", "content"):
            self._content(out, self.buf.rstrip() if self.num_calls else self.buf)
        elif self.mode == "reasoning":
            self._reasoning(out, self.buf)
        elif self.mode == "args":  # cut off inside the arguments: send what there is
            text = self.args_text + self.buf if self.string_args else self.buf
            if text:
                out.tool_calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))
        self.buf = ""
