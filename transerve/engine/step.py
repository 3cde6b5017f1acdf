"""What crosses between the engine core and the model runner: one step's work, and what it sampled.

Torch-free and plain data, so the same values can go to a worker thread, a tensor-parallel rank or
another process unchanged.

A request's data crosses once, as a `NewRequest`, in the step that admits it, or that resumes it after
a preemption (its KV blocks were freed, so it starts over with every token it has so far). After that a
step carries only deltas: where its chunk starts, how many tokens it runs, the KV blocks it gained, whether
it samples, this step's banned tokens, and (constrained decoding) its token bitmask. The runner keeps what it was given (tokens, block table row,
sampling parameters) and appends the token it samples for a request, which is the token the core keeps
unless it finishes the request; until a request's id comes back in `freed_request_ids`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from transerve.engine.request import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """A request the runner has no state for: admitted, or resumed after preemption."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]  # what it generated before a preemption; empty for a fresh request
    sampling_params: SamplingParams
    seed: int  # keys the request's sampling noise with the index of the token sampled
    multimodal: Any = None  # a MultimodalPrompt (engine/multimodal.py) when the prompt has images; opaque here


@dataclass(frozen=True)
class TokenBitmask:
    """Constrained decoding: which tokens each constrained request may sample this step. Row k of `words`
    (a numpy int32 array [len(rows), ceil(vocab / 32)], vocab being the LM head's rows) is for the request
    at index rows[k] of the step; bit t % 32 of word t // 32 set means token t is allowed."""

    rows: tuple[int, ...]
    words: Any


@dataclass(frozen=True)
class ScheduledStep:
    """One step. The per-request tuples are aligned: entry i is request_ids[i], in the order the runner packs
    them. The KV blocks of a request in `new_requests` come in its `new_block_ids` entry, all of them."""

    new_requests: tuple[NewRequest, ...]
    request_ids: tuple[str, ...]
    num_computed_tokens: tuple[int, ...]  # tokens whose K/V are in the cache: the position of the chunk's first token
    num_scheduled_tokens: tuple[int, ...]  # tokens to run this step
    new_block_ids: tuple[tuple[int, ...], ...]  # appended to the request's block table row
    samples: tuple[bool, ...]  # whether the chunk ends at the request's last token, so a token is sampled
    banned_token_ids: tuple[tuple[int, ...], ...]  # this step's bans (min_tokens, n-grams, bad words)
    # Finished, aborted or preempted since the last step: the runner drops their state before the rest.
    freed_request_ids: tuple[str, ...] = ()
    token_bitmask: TokenBitmask | None = None  # None: no request in this step is constrained

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def without(self, request_ids: Collection[str]) -> ScheduledStep:
        """This step less the entries of `request_ids`: the requests of a failed step, in the step queued behind
        it (async scheduling), whose input is a token that was never sampled; the core fails them."""
        keep = [i for i, request_id in enumerate(self.request_ids) if request_id not in request_ids]
        if len(keep) == self.num_requests:
            return self
        mask = self.token_bitmask
        if mask is not None:
            renumber = {old: new for new, old in enumerate(keep)}
            kept_rows = [k for k, row in enumerate(mask.rows) if row in renumber]
            mask = TokenBitmask(tuple(renumber[mask.rows[k]] for k in kept_rows), mask.words[kept_rows]) if kept_rows else None
        columns = (self.request_ids, self.num_computed_tokens, self.num_scheduled_tokens, self.new_block_ids, self.samples,
                   self.banned_token_ids)
        return ScheduledStep(tuple(new for new in self.new_requests if new.request_id not in request_ids),
                             *(tuple(column[i] for i in keep) for column in columns), self.freed_request_ids, mask)


@dataclass(frozen=True)
class SampledLogprobs:
    """Of the sampled token and of the most likely ones, after logit_bias (the sampling kernel's input)."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class SampledTokens:
    """A step's result: the token sampled for each request whose chunk sampled, and the logprobs of
    those that asked for them."""

    token_ids: Mapping[str, int] = field(default_factory=dict)
    logprobs: Mapping[str, SampledLogprobs] = field(default_factory=dict)
