"""Everything around the sampling kernel: per-request logit edits in, token ids and logprobs out.

`banned_token_ids` runs in the engine core, which has each request's tokens; `sample_step` runs at the
end of `ModelRunner.execute` and turns one step's sequences into a single batched kernel call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from transerve.engine.request import Request

if TYPE_CHECKING:
    from transerve.engine.model_runner import SequenceInput


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


@dataclass(frozen=True)
class SampledLogprobs:
    """Of the sampled token and of the most likely ones, after logit_bias (the kernel's input)."""

    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class StepSamples(dict):
    """request_id -> sampled token id, as `execute` has always returned, plus `logprobs` for the
    requests that asked for them: a dict subclass, so every caller that wants only tokens is unchanged."""

    def __init__(self, tokens: dict[str, int] | None = None, logprobs: dict[str, SampledLogprobs] | None = None):
        super().__init__(tokens or {})
        self.logprobs: dict[str, SampledLogprobs] = logprobs or {}


def sample_step(sample: Callable, logits: torch.Tensor, seqs: list[SequenceInput]) -> StepSamples:
    """One kernel call for the whole step. `logits` is [len(seqs), vocab] float32, row i for seqs[i]."""
    device = logits.device

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, seq in enumerate(seqs):
        for token_id, bias in seq.logit_bias:
            rows.append(row), cols.append(token_id), values.append(bias)
        for token_id in seq.banned_token_ids:
            rows.append(row), cols.append(token_id), values.append(float("-inf"))
    if rows:  # logit_bias and bans are sparse: one scatter, not a dense [seqs, vocab] bias
        logits = logits.index_put((tensor(rows, torch.int64), tensor(cols, torch.int64)),
                                  tensor(values, torch.float32), accumulate=True)
    kwargs = {}
    if any(seq.repetition_penalty != 1.0 or seq.presence_penalty or seq.frequency_penalty for seq in seqs):
        kwargs.update(
            repetition_penalty=tensor([s.repetition_penalty for s in seqs], torch.float32),
            presence_penalty=tensor([s.presence_penalty for s in seqs], torch.float32),
            frequency_penalty=tensor([s.frequency_penalty for s in seqs], torch.float32),
            prompt_token_ids=_padded([s.prompt_token_ids for s in seqs], tensor),
            output_token_ids=_padded([s.output_token_ids for s in seqs], tensor),
        )
    wanted = [s.num_logprobs for s in seqs if s.num_logprobs is not None]
    if wanted:
        kwargs["num_logprobs"] = max(wanted)
    out = sample(
        logits,
        tensor([s.temperature for s in seqs], torch.float32),
        tensor([s.top_k for s in seqs], torch.int32),
        tensor([s.top_p for s in seqs], torch.float32),
        tensor([s.min_p for s in seqs], torch.float32),
        tensor([s.seed for s in seqs], torch.int64),
        tensor([s.output_index for s in seqs], torch.int64),
        **kwargs,
    )
    if not wanted:
        return StepSamples({seq.request_id: token_id for seq, token_id in zip(seqs, out.tolist())})
    token_ids, chosen = out.token_ids.tolist(), out.logprobs.tolist()
    top_ids, top_logprobs = out.top_token_ids.tolist(), out.top_logprobs.tolist()
    logprobs = {
        seq.request_id: SampledLogprobs(chosen[i], tuple(top_ids[i][: seq.num_logprobs]), tuple(top_logprobs[i][: seq.num_logprobs]))
        for i, seq in enumerate(seqs) if seq.num_logprobs is not None
    }
    return StepSamples({seq.request_id: token_id for seq, token_id in zip(seqs, token_ids)}, logprobs)


def _padded(lists: list[tuple[int, ...]], tensor: Callable) -> torch.Tensor:
    width = max(1, max(len(ids) for ids in lists))
    return tensor([list(ids) + [-1] * (width - len(ids)) for ids in lists], torch.int64)
