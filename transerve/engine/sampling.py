"""Everything around the sampling kernel: per-request logit edits in, token ids and logprobs out.

`sample_step` runs at the end of `ModelRunner.execute` and turns one step's sampling requests into a
single batched kernel call. Its inputs were gathered on the host by engine/batch.py (`PackedStep.sampler_arrays`)
and reach the device with the step's other inputs. (This step's banned tokens come from the engine core:
`request.banned_token_ids`.)
"""

from __future__ import annotations

from typing import Callable

import torch

from transerve.engine.batch import PackedStep
from transerve.engine.step import SampledLogprobs, SampledTokens
from transerve.kernels import apply_token_bitmask


def sample_step(sample: Callable, logits: torch.Tensor, packed: PackedStep, inputs: list[torch.Tensor]) -> SampledTokens:
    """One kernel call for the whole step. `logits` is [len(packed.sampled_ids), vocab] float32, row i for
    packed.sampled_ids[i]; `inputs` are packed.sampler_arrays() on the logits' device. Logit bias and bans
    are one sparse scatter; the bitmask (constrained decoding) masks its rows' logits after them and before
    the sampling kernel, so logprobs are those of the masked distribution."""
    temperature, top_k, top_p, min_p, seeds, num_output_tokens, *rest = inputs
    if packed.logit_edits:
        rows, cols, values, *rest = rest
        logits = logits.index_put((rows, cols), values, accumulate=True)
    if (bitmask := packed.bitmask) is not None:
        words = torch.from_numpy(bitmask.words).to(logits.device, non_blocking=True)
        logits = apply_token_bitmask(logits, words, torch.tensor(bitmask.rows, dtype=torch.int64, device=logits.device))
    kwargs = {}
    if packed.penalties:
        names = ("repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_token_ids", "output_token_ids")
        kwargs.update(zip(names, rest))
    params = packed.params or ()
    wanted = [p.num_logprobs for p in params if p.num_logprobs is not None]
    if wanted:
        kwargs["num_logprobs"] = max(wanted)
    out = sample(logits, temperature, top_k, top_p, min_p, seeds, num_output_tokens, **kwargs)
    request_ids = packed.sampled_ids
    packed.sampled_token_ids = (out if not wanted else out.token_ids).cpu().numpy()
    token_ids = packed.sampled_token_ids.tolist()
    if not wanted:
        return SampledTokens(dict(zip(request_ids, token_ids)))
    chosen = out.logprobs.tolist()
    top_ids, top_logprobs = out.top_token_ids.tolist(), out.top_logprobs.tolist()
    logprobs = {
        request_ids[i]: SampledLogprobs(chosen[i], tuple(top_ids[i][:n]), tuple(top_logprobs[i][:n]))
        for i, p in enumerate(params) if (n := p.num_logprobs) is not None
    }
    return SampledTokens(dict(zip(request_ids, token_ids)), logprobs)
