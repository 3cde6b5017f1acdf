"""POST /v1/responses: the body, its input items, and the chat messages they make (nothing is stored:
every request carries its whole input)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag

from transerve.http.errors import OpenAIError
from transerve.http.protocol.base import HONOURED, IGNORED, PARTLY, Part, only, rejected, spec
from transerve.engine.request import GrammarSpec
from transerve.http.protocol.chat import (
    PARALLEL_NOTE, TOOL_CHOICE_NOTE, Arguments, Content, TemplateKwargs, template_content, template_kwargs, template_tool,
)
from transerve.http.protocol.sampling import (
    LOGIT_BIAS_NOTE, MAX_LOGPROBS, PENALTY_NOTE, SEED_NOTE, STOP_NOTE, LogitBias, MaxTokens, OpenAIServiceFields, Sampling,
    SamplingRequest, Stop,
)
from transerve.http.protocol.structured import (
    JSON_NOTE, ResponsesNamedToolChoice, ResponsesTextFormat, one_grammar, tool_calls_spec,
)

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class InputMessage(Part):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Content

    def template(self, param: str) -> dict[str, Any]:
        return {"role": "system" if self.role == "developer" else self.role,
                "content": template_content(self.content, f"{param}.content")}


class FunctionCallItem(Part):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: Arguments = Field(default_factory=dict)


class FunctionCallOutputItem(Part):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningItem(Part):
    """Earlier thoughts: dropped, as chat templates drop them from past turns anyway."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return {"message": "InputMessage", "function_call": "FunctionCallItem", "function_call_output": "FunctionCallOutputItem",
            "reasoning": "ReasoningItem"}.get(kind, kind)


InputItem = Annotated[Annotated[InputMessage, Tag("InputMessage")] | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
                      | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
                      | Annotated[ReasoningItem, Tag("ReasoningItem")], Discriminator(_item_type)]


class ResponsesTool(Part):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object")
    strict: bool | None = None


class Reasoning(Part):
    effort: str | None = None
    summary: str | None = None


class TextConfig(Part):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(SamplingRequest, OpenAIServiceFields):
    endpoint: ClassVar[str] = "/v1/responses"

    input: str | Annotated[list[InputItem], Field(min_length=1)] = spec(
        HONOURED, "a string, or messages / input items: message (with input_text and, for vision-language models, "
        "input_image parts), function_call, function_call_output (reasoning items are dropped)", ...)
    instructions: str | None = spec(HONOURED, "a system message before the input")
    max_output_tokens: MaxTokens | None = spec(HONOURED, "default: the rest of the context")
    tools: list[ResponsesTool] | None = spec(PARTLY, "`function` tools; built-in tools (web search, file search, ...) are a 400")
    tool_choice: Literal["auto", "none", "required"] | ResponsesNamedToolChoice | None = spec(HONOURED, TOOL_CHOICE_NOTE)
    parallel_tool_calls: bool = spec(HONOURED, PARALLEL_NOTE, True)
    top_logprobs: int | None = spec(HONOURED, "0 to 20, in output_text.logprobs", ge=0, le=MAX_LOGPROBS)
    include: Annotated[list[Literal["message.output_text.logprobs", "reasoning.encrypted_content"]], only(
        lambda v: isinstance(v, list) and all(e in (LOGPROBS_INCLUDE, "reasoning.encrypted_content") for e in v),
        "only 'message.output_text.logprobs' and 'reasoning.encrypted_content' are supported")] | None = spec(
        PARTLY, "`message.output_text.logprobs` honoured; `reasoning.encrypted_content` ignored (reasoning comes back as "
        "plain text); others name outputs of tools we do not have: 400")
    reasoning: Reasoning | None = spec(PARTLY, "`effort` is passed to the chat template as `reasoning_effort`; `summary` "
                                       "ignored (the reasoning item holds the thoughts themselves)")
    text: TextConfig | None = spec(PARTLY, "format `text`, `json_object`, `json_schema` (`strict` true or false alike): "
                                   + JSON_NOTE + "; `verbosity` ignored")
    truncation: Annotated[Literal["disabled"], only(
        lambda v: v == "disabled", "'auto' is not supported: a prompt that does not fit is an error")] | None = spec(
        PARTLY, "`disabled` (a prompt that does not fit is a 400); `auto` is a 400")
    max_tool_calls: int | None = spec(IGNORED, "limits built-in tool calls, and there are none", ge=1)
    chat_template_kwargs: TemplateKwargs | None = spec(HONOURED, "extension: extra variables for the chat template")
    background: Annotated[Literal[False], only(
        lambda v: v is False, "only false is supported: nothing is stored to poll")] | None = spec(
        PARTLY, "false only: nothing is stored to poll")
    previous_response_id: Any = rejected("nothing is stored: send the whole conversation in input")
    conversation: Any = rejected("nothing is stored: send the whole conversation in input")
    prompt: Any = rejected("stored prompt templates live at OpenAI")
    context_management: Any = rejected("no server-side compaction")
    moderation: Any = rejected("no moderation models here")
    background_options: Any = rejected("no background mode")
    access_programs: Any = rejected("no programmatic tool calling")
    image: Any = rejected("no image generation")
    # Chat's, not OpenAI Responses': extensions here.
    stop: Stop | None = spec(HONOURED, "extension: " + STOP_NOTE)
    logit_bias: LogitBias | None = spec(HONOURED, "extension: " + LOGIT_BIAS_NOTE)
    presence_penalty: float = spec(HONOURED, "extension: " + PENALTY_NOTE, 0.0, ge=-2, le=2)
    frequency_penalty: float = spec(HONOURED, "extension: " + PENALTY_NOTE, 0.0, ge=-2, le=2)
    seed: int | None = spec(HONOURED, "extension: " + SEED_NOTE, ge=-(2**63), le=2**63 - 1)
    n: Any = rejected("a Response has one output: send several requests")

    def max_tokens_asked(self) -> int | None:
        return self.max_output_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is None and LOGPROBS_INCLUDE in (self.include or ()):
            return 0
        return self.top_logprobs

    def reasoning_effort(self) -> str | None:
        return self.reasoning.effort if self.reasoning is not None else None

    def sampling(self, defaults: Mapping[str, Any], vocab_size: int) -> Sampling:
        sampling = super().sampling(defaults, vocab_size)
        if sampling.n != 1:
            raise OpenAIError("a Response has one output: generation_config.num_return_sequences must be 1", 400,
                              "generation_config")
        return sampling

    def template_messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages, ready for the chat template."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        calls_open = False  # the last message is an assistant turn that function_call items extend
        for i, item in enumerate(self.input):
            param = f"input[{i}]"
            if isinstance(item, InputMessage):
                messages.append(item.template(param))
                calls_open = item.role == "assistant"
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                if calls_open:
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                    calls_open = True
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": template_content(item.output, f"{param}.output")})
                calls_open = False
        return messages

    def template_tools(self) -> tuple[dict[str, Any], ...] | None:
        if not self.tools or self.tool_choice == "none":
            return None
        return tuple(template_tool(tool) for tool in self.tools)

    def template_kwargs(self) -> tuple[tuple[str, Any], ...]:
        return template_kwargs(self.chat_template_kwargs, self.reasoning_effort())

    def grammar_spec(self) -> GrammarSpec | None:
        text_format = self.text.format if self.text is not None else None
        tools = [(tool.name, tool.parameters) for tool in self.tools or ()]
        return one_grammar(("tool_choice", tool_calls_spec(self.tool_choice, tools, self.parallel_tool_calls)),
                           ("text.format", text_format and text_format.grammar("text.format")))
