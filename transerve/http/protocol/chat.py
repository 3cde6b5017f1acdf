"""POST /v1/chat/completions: the body, its messages, content parts and tools; and how they are shown to
the chat template (Responses builds the same messages from its input items)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from transerve.engine.request import GrammarSpec
from transerve.http.protocol.base import HONOURED, IGNORED, PARTLY, Part, invalid, only, rejected, spec
from transerve.http.protocol.sampling import MAX_LOGPROBS, MaxTokens, OpenAIServiceFields, SamplingRequest
from transerve.http.protocol.structured import (
    JSON_NOTE, STRUCTURED_NOTE, NamedToolChoice, ResponseFormat, StructuredOutputs, one_grammar, tool_calls_spec,
)

PARALLEL_NOTE = "false ends the answer after the first complete call"
# apply_chat_template's own arguments: a request may not swap the template or change how it is applied.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize", "return_dict",
    "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
    "conversation"})


class TextPart(Part):
    type: Literal["text", "input_text", "output_text"]
    text: str

    def template(self, param: str) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class ImageURL(Part):
    url: str = Field(description="a data: URL (base64) or an http(s) URL")
    detail: str | None = None


class ImageURLPart(Part):
    """Chat's image part (vision-language models)."""

    type: Literal["image_url"]
    image_url: ImageURL | str

    def template(self, param: str) -> dict[str, Any]:
        url = self.image_url.url if isinstance(self.image_url, ImageURL) else self.image_url
        return {"type": "image", "url": url, "param": f"{param}.image_url"}


class InputImagePart(Part):
    """Responses' image part (vision-language models)."""

    type: Literal["input_image"]
    image_url: str | None = Field(None, description="a data: URL (base64) or an http(s) URL")
    file_id: str | None = None
    detail: str | None = None

    @model_validator(mode="after")
    def _by_url(self) -> InputImagePart:
        if self.image_url is None:
            raise invalid("file_id" if self.file_id is not None else "image_url",
                          "images by file_id are not supported (no files are stored); send image_url")
        return self

    def template(self, param: str) -> dict[str, Any]:
        return {"type": "image", "url": self.image_url, "param": f"{param}.image_url"}


def _part_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextPart", "input_text": "TextPart", "output_text": "TextPart", "image_url": "ImageURLPart",
            "input_image": "InputImagePart"}.get(kind, kind)


ContentPart = Annotated[Annotated[TextPart, Tag("TextPart")] | Annotated[ImageURLPart, Tag("ImageURLPart")]
                        | Annotated[InputImagePart, Tag("InputImagePart")], Discriminator(_part_type)]
Content = str | list[ContentPart]


def template_content(content: Content | None, param: str) -> str | list[dict[str, Any]]:
    """Text parts joined into one string; with images, the parts kept (the images' places)."""
    if content is None or isinstance(content, str):
        return content or ""
    if all(isinstance(part, TextPart) for part in content):
        return "".join(part.text for part in content)
    return [part.template(f"{param}[{j}]") for j, part in enumerate(content)]


def _arguments_mapping(arguments: str | dict[str, Any]) -> Any:
    """Chat templates read a call's arguments as a mapping, where OpenAI sends a JSON string."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    return arguments


Arguments = Annotated[str | dict[str, Any], AfterValidator(_arguments_mapping)]


class FunctionCall(Part):
    name: str
    arguments: Arguments = Field(default_factory=dict)


class ToolCall(Part):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": self.function.arguments}}


class ChatMessage(Part):
    model_config = ConfigDict(extra="allow")  # other keys (name, refusal, ...) reach the chat template as sent

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise invalid("content", "is required (only an assistant message may have none)")
        return self

    def template(self, param: str) -> dict[str, Any]:
        out = {**(self.model_extra or {}), "role": "system" if self.role == "developer" else self.role,
               "content": template_content(self.content, f"{param}.content")}
        if self.tool_calls:
            out["tool_calls"] = [call.template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionSpec(Part):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object")
    strict: bool | None = None


def template_tool(function: FunctionSpec | Any) -> dict[str, Any]:
    """A tool in chat's shape, as chat templates read it."""
    out: dict[str, Any] = {"name": function.name}
    if function.description is not None:
        out["description"] = function.description
    out["parameters"] = function.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


class ChatTool(Part):
    type: Literal["function"]
    function: FunctionSpec


def _template_kwargs_allowed(kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    for name in kwargs or ():
        if name in RESERVED_TEMPLATE_KWARGS:
            raise invalid(name, "is not allowed: it is how the server applies the template")
    return kwargs


TemplateKwargs = Annotated[dict[str, Any], AfterValidator(_template_kwargs_allowed)]
ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice
TOOL_CHOICE_NOTE = ("`auto`, `none` (tools are then not shown to the model), `required` (one or more calls) and a named "
                    "function (one call to it): the calls are constrained to the model's tool-call syntax with each tool's "
                    "`parameters` schema")


class ChatCompletionRequest(SamplingRequest, OpenAIServiceFields):
    endpoint: ClassVar[str] = "/v1/chat/completions"

    messages: list[ChatMessage] = spec(
        HONOURED, "system / developer / user / assistant (with tool_calls) / tool (with tool_call_id); string, text-part or "
        "(vision-language models) image_url-part content", ..., min_length=1)
    max_completion_tokens: MaxTokens | None = spec(HONOURED, "default: the rest of the context")
    max_tokens: MaxTokens | None = spec(HONOURED, "the same as max_completion_tokens")
    logprobs: bool = spec(HONOURED, "logprobs of the model's distribution after logit_bias", False)
    top_logprobs: int | None = spec(HONOURED, "0 to 20, needs logprobs", ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = spec(PARTLY, "`function` tools, rendered by the model's chat template; other tool types "
                                        "are a 400")
    tool_choice: ToolChoice | None = spec(HONOURED, TOOL_CHOICE_NOTE)
    parallel_tool_calls: bool = spec(HONOURED, PARALLEL_NOTE, True)
    response_format: ResponseFormat | None = spec(
        HONOURED, "`text`, `json_object`, `json_schema` (`strict` true or false alike): " + JSON_NOTE)
    structured_outputs: StructuredOutputs | None = spec(HONOURED, STRUCTURED_NOTE)
    reasoning_effort: str | None = spec(
        HONOURED, "passed to the chat template as `reasoning_effort` (templates that know it use it)")
    chat_template_kwargs: TemplateKwargs | None = spec(HONOURED, "extension: extra variables for the chat template, e.g. "
                                                       "enable_thinking")
    modalities: Annotated[list[Literal["text"]], only(lambda v: v == ["text"], "only ['text'] is supported"),
                          Field(min_length=1, max_length=1)] | None = spec(PARTLY, "`[\"text\"]` only")
    audio: Any = rejected("no audio output")
    functions: Any = rejected("deprecated by OpenAI: use tools")
    function_call: Any = rejected("deprecated by OpenAI: use tool_choice")
    prediction: dict[str, Any] | None = spec(
        IGNORED, "predicted outputs only make OpenAI faster; the answer is the same without")
    verbosity: str | None = spec(IGNORED, "a hint to OpenAI's own models; open models have no such control")
    web_search_options: Any = rejected("no web search")
    moderation: Any = rejected("no moderation models here")
    tool_prompt: Any = rejected("text-generation-inference's own field: the chat template presents the tools")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        return self

    def max_tokens_asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template(f"messages[{i}]") for i, m in enumerate(self.messages)]

    def template_tools(self) -> tuple[dict[str, Any], ...] | None:
        """The tools as the chat template sees them; None when there are none or tool_choice is none."""
        if not self.tools or self.tool_choice == "none":
            return None
        return tuple(template_tool(tool.function) for tool in self.tools)

    def template_kwargs(self) -> tuple[tuple[str, Any], ...]:
        return template_kwargs(self.chat_template_kwargs, self.reasoning_effort)

    def grammar_spec(self) -> GrammarSpec | None:
        tools = [(tool.function.name, tool.function.parameters) for tool in self.tools or ()]
        return one_grammar(
            ("tool_choice", tool_calls_spec(self.tool_choice, tools, self.parallel_tool_calls)),
            ("response_format", self.response_format and self.response_format.grammar("response_format")),
            ("structured_outputs", self.structured_outputs and self.structured_outputs.grammar_spec()))


def template_kwargs(kwargs: dict[str, Any] | None, reasoning_effort: str | None) -> tuple[tuple[str, Any], ...]:
    """Extra chat template variables; a reasoning effort is passed as `reasoning_effort`."""
    kwargs = kwargs or {}
    if reasoning_effort is not None:
        kwargs = {"reasoning_effort": reasoning_effort, **kwargs}
    return tuple(kwargs.items())
