"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API): the bodies, their content
blocks and tools, and the chat request they become (the engine sees a chat conversation, built by the
same code as chat's and Responses')."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from transerve.http.protocol.base import HONOURED, IGNORED, PARTLY, Part, RequestBody, invalid, openai_error, rejected, spec
from transerve.http.protocol.chat import ChatCompletionRequest
from transerve.http.protocol.sampling import MaxTokens


class TextBlock(Part):
    type: Literal["text"]
    text: str

    def chat(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


class Base64Source(Part):
    type: Literal["base64"]
    media_type: str = Field(description="image/jpeg, image/png, image/gif or image/webp")
    data: str


class URLSource(Part):
    type: Literal["url"]
    url: str


class ImageBlock(Part):
    """An image (vision-language models), by base64 data or URL."""

    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]

    def chat(self) -> dict[str, Any]:
        s = self.source
        url = f"data:{s.media_type};base64,{s.data}" if isinstance(s, Base64Source) else s.url
        return {"type": "image_url", "image_url": {"url": url}}


class ToolUseBlock(Part):
    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(Part):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool | None = None

    def chat(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else [block.chat() for block in self.content]
        return {"role": "tool", "tool_call_id": self.tool_use_id, "content": content}


class ThinkingBlock(Part):
    """Earlier thoughts sent back: dropped, as chat templates drop them from past turns anyway."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Part):
    type: Literal["redacted_thinking"]
    data: str


def _block_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return {"text": "TextBlock", "image": "ImageBlock", "tool_use": "ToolUseBlock", "tool_result": "ToolResultBlock",
            "thinking": "ThinkingBlock", "redacted_thinking": "RedactedThinkingBlock"}.get(kind, kind)


Block = Annotated[Annotated[TextBlock, Tag("TextBlock")] | Annotated[ImageBlock, Tag("ImageBlock")]
                  | Annotated[ToolUseBlock, Tag("ToolUseBlock")] | Annotated[ToolResultBlock, Tag("ToolResultBlock")]
                  | Annotated[ThinkingBlock, Tag("ThinkingBlock")]
                  | Annotated[RedactedThinkingBlock, Tag("RedactedThinkingBlock")], Discriminator(_block_type)]
_ONLY = {"user": (TextBlock, ImageBlock, ToolResultBlock), "system": (TextBlock,),
         "assistant": (TextBlock, ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)}


class Message(Part):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_of_the_role(self) -> Message:
        for block in self.content if isinstance(self.content, list) else ():
            if not isinstance(block, _ONLY[self.role]):
                raise invalid("content", f"a {self.role} message cannot hold {block.type} blocks")
        return self

    def chat(self) -> list[dict[str, Any]]:
        """This turn as chat messages: tool results become tool messages, tool uses an assistant's tool_calls."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role != "user":
            text = "".join(b.text for b in self.content if isinstance(b, TextBlock))
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in self.content if isinstance(b, ToolUseBlock)]
            return [{"role": self.role, "content": text, **({"tool_calls": calls} if calls else {})}]
        out, parts = [], []
        for block in self.content + [None]:
            if parts and not isinstance(block, (TextBlock, ImageBlock)):
                text_only = all(p["type"] == "text" for p in parts)
                out.append({"role": "user", "content": "".join(p["text"] for p in parts) if text_only else parts})
                parts = []
            if isinstance(block, ToolResultBlock):
                out.append(block.chat())
            elif block is not None:
                parts.append(block.chat())
        return out


class Tool(Part):
    type: Literal["custom"] | None = Field(None, description="client tools only; server tools (web search, ...) are a 400")
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="a JSON Schema object")

    def chat(self) -> dict[str, Any]:
        function = {"name": self.name, "parameters": self.input_schema}
        return {"type": "function", "function": function | ({"description": self.description} if self.description else {})}


class ToolChoice(Part):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, min_length=1)
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise invalid("name", "is required with type 'tool', and only then")
        return self

    def chat(self) -> str | dict[str, Any]:
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return {"any": "required"}.get(self.type, self.type)


class Thinking(Part):
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1)
    display: str | None = None


class OutputFormat(Part):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Part):
    format: OutputFormat | None = None
    effort: str | None = None


SYSTEM_NOTE = "a string or text blocks: a system message before the conversation"
THINKING_NOTE = ("`enabled` / `adaptive` / `disabled` switch the chat template's thinking (`enable_thinking`); thoughts come "
                 "back as thinking blocks; `budget_tokens` is not enforced (max_tokens bounds thoughts and answer together)")
HEADER_NOTE = "the SDK sends it as a header; one workspace and one user here"


class Conversation(RequestBody):
    """What a message and a token count share: the conversation and what it is shown."""

    model: str | None = spec(HONOURED, "repo or repo@revision, loaded on first use; the pinned model when the server has one")
    messages: list[Message] = spec(
        HONOURED, "user / assistant (/ system) turns: string or block content: text, image (base64 or url source; "
        "vision-language models), tool_use, tool_result; thinking blocks sent back are dropped; the last turn must be the "
        "user's (no assistant prefill)", ..., min_length=1)
    system: str | list[TextBlock] | None = spec(HONOURED, SYSTEM_NOTE)
    tools: list[Tool] | None = spec(PARTLY, "client tools (name, description, input_schema), rendered by the model's chat "
                                    "template; server tools are a 400")
    tool_choice: ToolChoice | None = spec(
        HONOURED, "`auto`, `none` (tools are then not shown), `any` (one or more calls), `tool` (one call to it): `any` and "
        "`tool` are constrained to the model's tool-call syntax with each tool's input_schema; `disable_parallel_tool_use` "
        "ends the answer after the first call")
    thinking: Thinking | None = spec(PARTLY, THINKING_NOTE)
    output_config: OutputConfig | None = spec(
        PARTLY, "`format` (json_schema): the text is constrained to the schema; `effort` is passed to the chat template as "
        "`reasoning_effort`")
    cache_control: dict[str, Any] | None = spec(IGNORED, "prefix caching is automatic: any shared prompt prefix is reused")
    speed: str | None = spec(IGNORED, "one speed here")
    user_profile_id: str | None = spec(IGNORED, HEADER_NOTE)
    workspace_id: str | None = spec(IGNORED, HEADER_NOTE)

    @model_validator(mode="after")
    def _user_turn_last(self) -> Conversation:
        if self.messages[-1].role == "assistant":
            raise invalid("messages", "prefill is not supported: the last message must be the user's")
        return self

    def chat(self, **fields: Any) -> ChatCompletionRequest:
        """The chat request this conversation is, with `fields` (sampling) added."""
        messages = [{"role": "system", "content": self.system if isinstance(self.system, str) else
                     "".join(b.text for b in self.system)}] if self.system else []
        messages += [m for message in self.messages for m in message.chat()]
        body: dict[str, Any] = {"model": self.model, "messages": messages, **fields}
        if self.tools:
            body["tools"] = [tool.chat() for tool in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice.chat()
            body["parallel_tool_calls"] = not self.tool_choice.disable_parallel_tool_use
        if self.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
        if self.output_config is not None:
            if self.output_config.format is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": self.output_config.format.schema_}}
            body["reasoning_effort"] = self.output_config.effort
        try:
            return ChatCompletionRequest.model_validate_json(json.dumps(body))
        except ValidationError as exc:  # what the chat request refuses (rare: the blocks were checked above)
            raise openai_error(exc, self.endpoint) from None


class MessagesRequest(Conversation):
    endpoint: ClassVar[str] = "/v1/messages"

    max_tokens: MaxTokens = spec(HONOURED, "required, as in Anthropic's API; thoughts count toward it", ...)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = spec(
        PARTLY, "up to 4 strings, matched across token boundaries, never shown; `stop_reason` `stop_sequence` names the one "
        "that matched")
    temperature: float | None = spec(HONOURED, "0 to 1; 0 is greedy", ge=0, le=1)
    top_p: float | None = spec(HONOURED, ge=0, le=1)
    top_k: int | None = spec(HONOURED, ge=0, le=2**31)
    stream: bool = spec(HONOURED, "message_start, content_block_start / _delta (text_delta, thinking_delta, input_json_delta) "
                        "/ _stop, message_delta (stop_reason, usage), message_stop; an `error` event on a failure", False)
    metadata: dict[str, Any] | None = spec(IGNORED, "`user_id` is for Anthropic's abuse monitoring; nothing here uses it")
    service_tier: str | None = spec(IGNORED, "one tier here")
    inference_geo: str | None = spec(IGNORED, "inference runs on this machine")
    diagnostics: dict[str, Any] | None = spec(IGNORED, "no prompt-cache diagnostics here")
    context_management: dict[str, Any] | None = spec(
        IGNORED, "no server-side context editing: the whole conversation is kept (a prompt that does not fit is a 400)")
    container: Any = rejected("no code execution containers")
    mcp_servers: Any = rejected("no MCP connector: run MCP tools on the client and send them as tools")

    def chat_request(self) -> ChatCompletionRequest:
        return self.chat(max_tokens=self.max_tokens, stop=self.stop_sequences, temperature=self.temperature, top_p=self.top_p,
                         top_k=self.top_k)


class CountTokensRequest(Conversation):
    endpoint: ClassVar[str] = "/v1/messages/count_tokens"

    def chat_request(self) -> ChatCompletionRequest:
        return self.chat()
