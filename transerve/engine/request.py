"""Request state as the engine sees it: token ids, progress through the KV cache, status, this step's bans."""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # end-of-sequence token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"  # the client went away or the request failed

    is_finished: bool  # set on each member below: read for every token, so a plain attribute


for _status in RequestStatus:
    _status.is_finished = _status not in (RequestStatus.WAITING, RequestStatus.RUNNING)
del _status


class GrammarKind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # spec: the schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; spec unused
    REGEX = "regex"
    CHOICE = "choice"  # spec: a JSON list of the strings to choose from
    EBNF = "grammar"  # xgrammar's EBNF (GBNF-like), as vLLM's `structured_outputs.grammar`
    TOOL_CALLS = "tool_calls"  # spec: JSON {"tools": [{"name", "parameters"}], "parallel": bool}; in the model's syntax
    STRUCTURAL_TAG = "structural_tag"  # xgrammar's structural tag (JSON): what TOOL_CALLS becomes for a model


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match (engine/grammar.py compiles it); `param` is the request field it came
    from, named in the 400 when it does not compile."""

    kind: GrammarKind
    spec: str = ""
    param: str = field(default="", compare=False)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: as many as the context and the KV cache leave room for
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence ids
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # 1 means off; over prompt and output tokens
    presence_penalty: float = 0.0  # over output tokens
    frequency_penalty: float = 0.0  # over output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit); -inf bans the token
    num_logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top N
    min_tokens: int = 0  # end-of-sequence and stop token ids are banned until this many tokens
    no_repeat_ngram_size: int = 0  # 0 means off; n bans any token that would repeat an n-gram
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete
    grammar: GrammarSpec | None = None  # constrained decoding: only tokens that keep the output in the grammar

    # Cached (read for every request in every step); a frozen dataclass keeps them true.
    @functools.cached_property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @functools.cached_property
    def has_bans(self) -> bool:
        """Whether banned tokens depend on the request's tokens so far (recomputed every step)."""
        return self.min_tokens > 0 or self.no_repeat_ngram_size > 0 or bool(self.bad_words_ids)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be non-negative, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.num_logprobs is not None and self.num_logprobs < 0:
            raise ValueError(f"num_logprobs must be non-negative, got {self.num_logprobs}")
        if self.min_tokens < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("min_tokens and no_repeat_ngram_size must be non-negative")


class ContextLengthError(ValueError):
    """A request that cannot fit; `field` is what to change: "prompt" or "max_tokens"."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def fit_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_model_len: int, kv_capacity: int) -> SamplingParams:
    """The one place max_tokens is defaulted and clamped: `params` with max_tokens set to what this prompt
    may generate. A max_tokens the request asked for that passes the context is an error; one that only
    passes the KV cache (`kv_capacity` tokens) is cut, so a request running alone never preempts itself."""
    if num_prompt_tokens < 1:  # the first output token is sampled from the last prompt token's logits
        raise ContextLengthError("the prompt is empty (no tokens): give at least one token", "prompt")
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ContextLengthError(f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                                 f"{num_prompt_tokens} tokens", "prompt")
    if params.max_tokens is not None and params.max_tokens > room:
        raise ContextLengthError(f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                                 f"{num_prompt_tokens} tokens and {params.max_tokens} more were asked for (max_tokens)",
                                 "max_tokens")
    cache_room = min(kv_capacity, max_model_len) - num_prompt_tokens
    if cache_room < 1:
        raise ContextLengthError(f"the prompt ({num_prompt_tokens} tokens) needs more KV cache than this server has "
                                 f"({kv_capacity} tokens); raise --num-kv-blocks", "prompt")
    return dataclasses.replace(params, max_tokens=min(params.max_tokens or room, cache_room))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # the request's own seed, or one drawn for it: sampling never depends on the batch
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Async scheduling: a step is scheduled before the one in front of it is applied. Tokens of steps not yet
    # applied, and tokens those steps sample that the core has not seen yet (the runner feeds them in itself).
    num_in_flight_tokens: int = 0
    num_pending_tokens: int = 0
    # Set when the scheduler takes the request (Scheduler.add); read for every token: what ends it.
    stop_ids: frozenset[int] = frozenset()  # its stop token ids, and end of sequence unless ignore_eos
    max_num_tokens: int = 0  # prompt and max_tokens, within the context length
    needs_known_tokens: bool = False  # its bans or grammar mask are computed from its tokens: never runs ahead
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full blocks, for prefix caching
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    num_preemptions: int = 0
    multimodal: Any = None  # a MultimodalPrompt (engine/multimodal.py): the prompt's images, opaque here
    constraint: Any = None  # a Constraint (engine/grammar.py): the compiled grammar the output follows

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """All tokens (prompt, then output) in [start, end)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


def banned_token_ids(request: Request) -> tuple[int, ...]:
    """Tokens the request must not sample next: end of sequence before min_tokens, any token that
    would repeat an n-gram (transformers' no_repeat_ngram_size, over prompt and output), and the last
    token of a bad word whose other tokens were just generated."""
    params = request.sampling_params
    banned: set[int] = set()
    if request.num_output_tokens < params.min_tokens:
        banned.update(request.eos_token_ids)
        banned.update(params.stop_token_ids)
    n = params.no_repeat_ngram_size
    if n or params.bad_words_ids:
        tokens = request.prompt_token_ids + request.output_token_ids
        if n and len(tokens) >= n - 1:
            tail = tokens[len(tokens) - (n - 1):] if n > 1 else []
            for start in range(len(tokens) - n + 1):
                if tokens[start:start + n - 1] == tail:
                    banned.add(tokens[start + n - 1])
        for word in params.bad_words_ids:
            prefix = list(word[:-1])
            if len(word) > 1 and tokens[len(tokens) - len(prefix):] == prefix:
                banned.add(word[-1])
    return tuple(sorted(banned))
