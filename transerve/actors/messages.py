"""Every message that crosses a mailbox. Frozen dataclasses, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anyio.abc import ObjectSendStream

from transerve.engine.model_runner import SequenceInput
from transerve.engine.request import SamplingParams


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


# tokenizer -> detokenizer, before the request reaches the scheduler
@dataclass(frozen=True)
class OpenStream:
    request_id: str
    stop: tuple[str, ...]
    sink: ObjectSendStream[RequestEvent]


# tokenizer -> scheduler
@dataclass(frozen=True)
class TokenizedRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams


# client -> scheduler: the client went away, a stop string matched, or tokenization failed
@dataclass(frozen=True)
class Abort:
    request_id: str


# scheduler -> executor
@dataclass(frozen=True)
class ExecuteStep:
    seqs: tuple[SequenceInput, ...]


# executor -> scheduler
@dataclass(frozen=True)
class StepResult:
    sampled: tuple[tuple[str, int], ...]  # (request_id, token_id)
    error: str | None = None


# scheduler -> detokenizer
@dataclass(frozen=True)
class NewToken:
    request_id: str
    token_id: int | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_cached_tokens: int


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


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # set on the last event: "stop" | "length" | "abort"
    usage: Usage | None = None  # set on the last event


@dataclass(frozen=True)
class RequestError:
    message: str
    status_code: int = 500
    param: str | None = None


RequestEvent = TextDelta | RequestError
