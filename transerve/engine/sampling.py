"""Everything around the sampling kernel: per-request logit edits in, token ids and logprobs out.

`sample_step` runs at the end of `ModelRunner.execute` and turns one step's sampling requests into a
single batched kernel call. (This step's banned tokens come from the engine core: `request.banned_token_ids`.)
"""

from __future__ import annotations

from typing import Callable

import torch

from transerve.engine.batch import PackedStep
from transerve.engine.host_tensors import to_device
from transerve.engine.step import SampledLogprobs, SampledTokens
from transerve.kernels import apply_token_bitmask


def sample_step(sample: Callable, logits: torch.Tensor, packed: PackedStep) -> SampledTokens:
    """One kernel call for the whole step. `logits` is [len(packed.sampled), vocab] float32, row i for
    packed.sampled[i], whose banned tokens this step are packed.bans[i]; the bitmask (constrained decoding)
    masks its rows' logits after logit_bias and before the sampling kernel, so logprobs are those of the
    masked distribution. The kernel's per-request inputs come gathered in packed.sampling."""
    device = logits.device
    requests, bans, bitmask = packed.sampled, packed.bans, packed.bitmask

    def tensor(values, dtype):
        return to_device(values, dtype, device)

    params = [r.params for r in requests]
    if any(bans) or any(p.logit_bias for p in params):  # sparse: one scatter, not a dense [requests, vocab] bias
        rows: list[int] = []
        cols: list[int] = []
        values: list[float] = []
        for row, (p, banned) in enumerate(zip(params, bans)):
            for token_id, bias in p.logit_bias:
                rows.append(row), cols.append(token_id), values.append(bias)
            for token_id in banned:
                rows.append(row), cols.append(token_id), values.append(float("-inf"))
        logits = logits.index_put((tensor(rows, torch.int64), tensor(cols, torch.int64)),
                                  tensor(values, torch.float32), accumulate=True)
    if bitmask is not None:
        words = torch.from_numpy(bitmask.words).to(device, non_blocking=True)
        logits = apply_token_bitmask(logits, words, tensor(bitmask.rows, torch.int64))
    kwargs = {}
    if any(p.has_penalties for p in params):
        kwargs.update(
            repetition_penalty=tensor([p.repetition_penalty for p in params], torch.float32),
            presence_penalty=tensor([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=tensor([p.frequency_penalty for p in params], torch.float32),
            # Requests without penalties give no tokens: their penalties are neutral anyway.
            prompt_token_ids=_padded([r.token_ids[: r.num_prompt_tokens] if r.params.has_penalties else () for r in requests], tensor),
            output_token_ids=_padded([r.token_ids[r.num_prompt_tokens:] if r.params.has_penalties else () for r in requests], tensor),
        )
    wanted = [p.num_logprobs for p in params if p.num_logprobs is not None]
    if wanted:
        kwargs["num_logprobs"] = max(wanted)
    temperature, top_k, top_p, min_p, seeds, num_output_tokens = packed.sampling
    out = sample(
        logits,
        tensor(temperature, torch.float32),
        tensor(top_k, torch.int32),
        tensor(top_p, torch.float32),
        tensor(min_p, torch.float32),
        tensor(seeds, torch.int64),
        tensor(num_output_tokens, torch.int64),
        **kwargs,
    )
    if not wanted:
        return SampledTokens({r.request_id: token_id for r, token_id in zip(requests, out.tolist())})
    token_ids, chosen = out.token_ids.tolist(), out.logprobs.tolist()
    top_ids, top_logprobs = out.top_token_ids.tolist(), out.top_logprobs.tolist()
    logprobs = {
        r.request_id: SampledLogprobs(chosen[i], tuple(top_ids[i][: n]), tuple(top_logprobs[i][: n]))
        for i, r in enumerate(requests) if (n := r.params.num_logprobs) is not None
    }
    return SampledTokens({r.request_id: token_id for r, token_id in zip(requests, token_ids)}, logprobs)


def _padded(lists: list, tensor: Callable) -> torch.Tensor:
    width = max(1, max(len(ids) for ids in lists))
    return tensor([list(ids) + [-1] * (width - len(ids)) for ids in lists], torch.int64)
