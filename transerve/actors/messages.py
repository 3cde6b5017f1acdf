"""Every message that crosses a mailbox. Frozen dataclasses, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anyio.abc import ObjectSendStream

from transerve.engine.request import SamplingParams
from transerve.engine.step import SampledLogprobs, SampledTokens, ScheduledStep


# handler -> tokenizer -> detokenizer: how to split the model's text into answer, thoughts and tool calls
@dataclass(frozen=True)
class OutputOptions:
    tools: bool = False  # parse tool calls (tools were given and tool_choice is not "none")
    parallel_tool_calls: bool = True  # False: the request ends after its first complete tool call
    reasoning: bool = False  # look for <think>...</think> (chat and Responses; never legacy completions)


# handler -> tokenizer
@dataclass(frozen=True)
class TokenizeRequest:
    request_id: str
    sampling_params: SamplingParams
    stop: tuple[str, ...]  # stop strings, matched by the detokenizer across token boundaries
    sink: ObjectSendStream[RequestEvent]  # where this request's events go; bounded by max_tokens
    messages: tuple[dict[str, Any], ...] | None = None  # chat: rendered with the chat template
    prompt: str | None = None  # plain completion
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    index: int = 0  # which choice of the HTTP request this is (n, or a list of prompts)
    prompt_token_ids: tuple[int, ...] | None = None  # a completion prompt given as token ids
    tools: tuple[dict[str, Any], ...] | None = None  # OpenAI function tools, for the chat template
    output: OutputOptions = OutputOptions()
    images: tuple[Any, ...] = ()  # decoded PIL images, in the order of the messages' image parts


# tokenizer -> detokenizer: the output parser's settings, resolved against the model's template
@dataclass(frozen=True)
class ParserSpec:
    tool_format: str | None  # "hermes" | "llama3_json" | "mistral"; None: no tool parsing
    reasoning: bool
    in_reasoning: bool  # the prompt itself ends inside <think>: the output starts as thoughts
    parallel_tool_calls: bool = True


# tokenizer -> detokenizer, before the request reaches the scheduler
@dataclass(frozen=True)
class OpenStream:
    request_id: str
    stop: tuple[str, ...]
    sink: ObjectSendStream[RequestEvent]
    index: int = 0
    parser: ParserSpec | None = None


# tokenizer -> scheduler
@dataclass(frozen=True)
class TokenizedRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    multimodal: Any = None  # a MultimodalPrompt (engine/multimodal.py) when the prompt has images
    constraint: Any = None  # a Constraint (engine/grammar.py) when the output must follow a grammar


# client -> scheduler: the client went away, a stop string matched, or tokenization failed
@dataclass(frozen=True)
class Abort:
    request_id: str


# scheduler -> executor
@dataclass(frozen=True)
class ExecuteStep:
    step: ScheduledStep


# executor -> scheduler
@dataclass(frozen=True)
class StepResult:
    sampled: SampledTokens = SampledTokens()
    error: str | None = None  # the step raised: nothing was sampled


# scheduler -> detokenizer
@dataclass(frozen=True)
class NewToken:
    request_id: str
    token_id: int | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: SampledLogprobs | None = None


@dataclass(frozen=True)
class StepOutput:
    tokens: tuple[NewToken, ...]


# any actor -> detokenizer -> request: the request failed before or during generation
@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str
    status_code: int = 500
    param: str | None = None


# detokenizer -> request
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: str  # the token's own text (special tokens included)
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens and their logprobs


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: the first piece of a call has its id and name, later ones add
    argument text; the pieces' arguments concatenate to the call's JSON arguments."""

    index: int  # which call of this answer
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class TextDelta:
    text: str  # answer text
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "tool_calls" | "abort"
    usage: Usage | None = None  # set on the last event
    index: int = 0
    reasoning: str = ""  # thought text (between <think> and </think>)
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of token_ids, when asked for
    stop_sequence: str | None = None  # set on the last event when a stop string ended the answer: which one


@dataclass(frozen=True)
class RequestError:
    message: str
    status_code: int = 500
    param: str | None = None
    index: int = 0


RequestEvent = TextDelta | RequestError
