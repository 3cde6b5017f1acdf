"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, seeded noise, logprobs.

One program per row walks the vocabulary in BLOCK_V chunks. Pass 1 applies the penalties, tracks the
greedy argmax and the softmax statistics, and parks the scaled logits in a scratch row; pass 2 turns
them into probabilities. The filters are probability thresholds found by binary search on the bit
patterns of the (non-negative) probabilities, which order like the floats themselves, so no sort is
needed: top-k is the largest p with at least k tokens at or above it, top-p the smallest p whose
strictly-larger mass is under top_p. The last pass runs the exponential race with the same integer
noise as `uniform_noise_ref`, so a seeded draw matches `sample_ref` token for token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from transerve.kernels.reference import SampleOutput

_PROMPT_FLAG = 1 << 30  # set in a token's count when the prompt has it (output counts stay below)


@triton.jit
def _uniform_noise(seed, step, idx):
    # uniform_noise_ref on uint32 lanes: multiplications wrap mod 2**32, shifts are logical.
    x = seed.to(tl.uint32) * 0x9E3779B1 + step.to(tl.uint32) * 0x85EBCA77
    x = x ^ (idx.to(tl.uint32) * 0xC2B2AE3D)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    # Clamped below 1 as in the reference: -log(1) = 0 would make the race 0/0.
    return tl.minimum(((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994)


@triton.jit
def _sample_kernel(
    logits_ptr,  # [num_seqs, vocab] fp32, unit column stride
    scratch_ptr,  # [num_seqs, vocab] fp32: scaled logits, then probabilities, of sampled rows
    counts_ptr,  # [num_seqs, vocab] int32: output count | _PROMPT_FLAG (HAS_PENALTIES)
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,  # [num_seqs] fp32, int32, fp32, fp32
    seeds_ptr, steps_ptr,  # [num_seqs] int64
    repetition_ptr, presence_ptr, frequency_ptr,  # [num_seqs] fp32 (HAS_PENALTIES)
    out_ptr,  # [num_seqs] int64: the chosen token
    logprob_ptr, lse_ptr,  # [num_seqs] fp32: its raw logprob, and the raw logsumexp (LOGPROBS)
    vocab, stride_l, stride_c,
    BLOCK_V: tl.constexpr,
    HAS_PENALTIES: tl.constexpr,
    LOGPROBS: tl.constexpr,
    PROMPT_FLAG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_l
    scratch_row = scratch_ptr + row * vocab
    temperature = tl.load(temperature_ptr + row)
    sampled = temperature > 0
    if HAS_PENALTIES:
        repetition = tl.load(repetition_ptr + row)
        presence = tl.load(presence_ptr + row)
        frequency = tl.load(frequency_ptr + row)

    # Pass 1: penalties, greedy argmax (first index on ties, like torch), softmax statistics.
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    raw_max = tl.full([], float("-inf"), tl.float32)
    raw_sum = tl.full([], 0.0, tl.float32)
    s_max = tl.full([], float("-inf"), tl.float32)
    s_sum = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        ok = idx < vocab
        x = tl.load(logits_row + idx, mask=ok, other=float("-inf"))
        if LOGPROBS:
            new_max = tl.maximum(raw_max, tl.max(x, 0))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            raw_sum = raw_sum * tl.exp(raw_max - safe) + tl.sum(tl.exp(x - safe), 0)
            raw_max = new_max
        logit = x
        if HAS_PENALTIES:
            c = tl.load(counts_ptr + row * stride_c + idx, mask=ok, other=0)
            count = c & (PROMPT_FLAG - 1)
            penalised = tl.where(logit > 0, tl.math.div_rn(logit, repetition), logit * repetition)
            logit = tl.where(c != 0, penalised, logit)
            logit = logit - frequency * count.to(tl.float32)
            logit = logit - presence * (count > 0).to(tl.float32)
        chunk_best = tl.max(logit, 0)
        chunk_idx = tl.argmax(logit, 0, tie_break_left=True) + start
        best_idx = tl.where(chunk_best > best, chunk_idx, best_idx)
        best = tl.maximum(best, chunk_best)
        if sampled:
            s = tl.math.div_rn(logit, temperature)
            tl.store(scratch_row + idx, s, mask=ok)
            new_max = tl.maximum(s_max, tl.max(s, 0))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            s_sum = s_sum * tl.exp(s_max - safe) + tl.sum(tl.exp(s - safe), 0)
            s_max = new_max

    token = best_idx
    if sampled:
        # Pass 2: probabilities, in place of the scaled logits.
        for start in range(0, vocab, BLOCK_V):
            idx = start + tl.arange(0, BLOCK_V)
            ok = idx < vocab
            s = tl.load(scratch_row + idx, mask=ok, other=float("-inf"))
            tl.store(scratch_row + idx, tl.math.div_rn(tl.exp(s - s_max), s_sum), mask=ok)
        p_top = tl.math.div_rn(1.0, s_sum)  # the most likely token's probability, exp(0) / sum
        threshold = tl.full([], 0, tl.int32)  # keep p whose bits are >= threshold
        min_p = tl.load(min_p_ptr + row)
        if min_p > 0:
            threshold = (min_p * p_top).to(tl.int32, bitcast=True)
        top_k = tl.load(top_k_ptr + row)
        if top_k > 0:  # largest t with at least top_k probabilities >= t
            lo = tl.full([], 0, tl.int32)
            hi = p_top.to(tl.int32, bitcast=True)
            while lo < hi:
                mid = lo + (hi - lo + 1) // 2
                n = tl.full([], 0, tl.int32)
                for start in range(0, vocab, BLOCK_V):
                    idx = start + tl.arange(0, BLOCK_V)
                    p = tl.load(scratch_row + idx, mask=idx < vocab, other=0.0)
                    n += tl.sum((p.to(tl.int32, bitcast=True) >= mid).to(tl.int32), 0)
                if n >= top_k:
                    lo = mid
                else:
                    hi = mid - 1
            threshold = tl.maximum(threshold, lo)
        top_p = tl.load(top_p_ptr + row)
        if top_p < 1:  # smallest t whose strictly-larger mass is under top_p
            lo = tl.full([], 0, tl.int32)
            hi = p_top.to(tl.int32, bitcast=True)
            while lo < hi:
                mid = lo + (hi - lo) // 2
                mass = tl.full([], 0.0, tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    idx = start + tl.arange(0, BLOCK_V)
                    p = tl.load(scratch_row + idx, mask=idx < vocab, other=0.0)
                    mass += tl.sum(tl.where(p.to(tl.int32, bitcast=True) > mid, p, 0.0), 0)
                if mass < top_p:
                    hi = mid
                else:
                    lo = mid + 1
            threshold = tl.maximum(threshold, lo)
        # Last pass: exponential race, p / Exp(1), over the kept tokens.
        seed = tl.load(seeds_ptr + row)
        step = tl.load(steps_ptr + row)
        race_best = tl.full([], -1.0, tl.float32)
        race_idx = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + tl.arange(0, BLOCK_V)
            ok = idx < vocab
            p = tl.load(scratch_row + idx, mask=ok, other=0.0)
            p = tl.where(p.to(tl.int32, bitcast=True) >= threshold, p, 0.0)
            race = tl.math.div_rn(p, -tl.log(_uniform_noise(seed, step, idx)))
            race = tl.where(ok, race, -1.0)
            chunk_best = tl.max(race, 0)
            chunk_idx = tl.argmax(race, 0, tie_break_left=True) + start
            race_idx = tl.where(chunk_best > race_best, chunk_idx, race_idx)
            race_best = tl.maximum(race_best, chunk_best)
        token = race_idx
    tl.store(out_ptr + row, token.to(tl.int64))
    if LOGPROBS:
        lse = raw_max + tl.log(raw_sum)
        tl.store(lse_ptr + row, lse)
        tl.store(logprob_ptr + row, tl.load(logits_row + token) - lse)


def _counts(num_seqs: int, vocab_size: int, prompt_token_ids, output_token_ids, device) -> torch.Tensor:
    """[num_seqs, vocab_size] int32 view: output occurrences, | _PROMPT_FLAG where the prompt has the token.
    A scatter, which torch does as well as a kernel of ours would."""
    counts = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.int32, device=device)  # last column: padding
    if output_token_ids is not None:
        ids = output_token_ids.long().masked_fill(output_token_ids < 0, vocab_size)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    if prompt_token_ids is not None:
        ids = prompt_token_ids.long().masked_fill(prompt_token_ids < 0, vocab_size)
        in_prompt = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)
        counts |= in_prompt.int() * _PROMPT_FLAG
    return counts[:, :vocab_size]


def sample(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32
    temperature: torch.Tensor,  # [num_seqs] float32; 0 means greedy
    top_k: torch.Tensor,  # [num_seqs] int32; 0 means off
    top_p: torch.Tensor,  # [num_seqs] float32; 1 means off
    min_p: torch.Tensor,  # [num_seqs] float32; 0 means off
    seeds: torch.Tensor,  # [num_seqs] int64
    steps: torch.Tensor,  # [num_seqs] int64: the index of the token being sampled
    *,
    repetition_penalty: torch.Tensor | None = None,  # [num_seqs] float32; 1 means off
    presence_penalty: torch.Tensor | None = None,  # [num_seqs] float32; 0 means off
    frequency_penalty: torch.Tensor | None = None,  # [num_seqs] float32; 0 means off
    prompt_token_ids: torch.Tensor | None = None,  # [num_seqs, max_prompt_len] int, -1 padded
    output_token_ids: torch.Tensor | None = None,  # [num_seqs, max_output_len] int, -1 padded
    num_logprobs: int | None = None,  # N: also return logprobs and the top N (N may be 0)
) -> torch.Tensor | SampleOutput:  # [num_seqs] int64, or SampleOutput when num_logprobs is set
    num_seqs, vocab_size = logits.shape
    device = logits.device
    assert logits.dtype == torch.float32 and logits.stride(1) == 1, (logits.dtype, logits.stride())
    for t, dtype in ((temperature, torch.float32), (top_k, torch.int32), (top_p, torch.float32),
                     (min_p, torch.float32), (seeds, torch.int64), (steps, torch.int64)):
        assert t.shape == (num_seqs,) and t.dtype == dtype and t.is_contiguous(), (t.shape, t.dtype, dtype)
    for t in (prompt_token_ids, output_token_ids):
        assert t is None or (t.dim() == 2 and t.shape[0] == num_seqs and not t.is_floating_point())
    out = torch.empty(num_seqs, dtype=torch.int64, device=device)
    if num_seqs == 0:
        return out if num_logprobs is None else SampleOutput(
            out, logits.new_empty(0), out.new_empty(0, num_logprobs), logits.new_empty(0, num_logprobs))
    penalties = (repetition_penalty, presence_penalty, frequency_penalty)
    has_penalties = any(t is not None for t in penalties)
    if has_penalties:
        ones, zeros = torch.ones_like(temperature), torch.zeros_like(temperature)
        repetition_penalty, presence_penalty, frequency_penalty = (
            (default if t is None else t.float().contiguous()) for t, default in zip(penalties, (ones, zeros, zeros)))
        counts = _counts(num_seqs, vocab_size, prompt_token_ids, output_token_ids, device)
    else:
        repetition_penalty = presence_penalty = frequency_penalty = temperature  # unused
        counts = out
    scratch = torch.empty(num_seqs, vocab_size, dtype=torch.float32, device=device)
    logprob = torch.empty(num_seqs, dtype=torch.float32, device=device)
    lse = torch.empty(num_seqs, dtype=torch.float32, device=device)
    _sample_kernel[(num_seqs,)](
        logits, scratch, counts, temperature, top_k, top_p, min_p, seeds, steps,
        repetition_penalty, presence_penalty, frequency_penalty, out, logprob, lse,
        vocab_size, logits.stride(0), counts.stride(0) if has_penalties else 0,
        BLOCK_V=min(2048, triton.next_power_of_2(vocab_size)), HAS_PENALTIES=has_penalties,
        LOGPROBS=num_logprobs is not None, PROMPT_FLAG=_PROMPT_FLAG,
        num_warps=8, enable_fp_fusion=False,  # no fused multiply-adds: penalties round like torch
    )
    if num_logprobs is None:
        return out
    top = logits.topk(num_logprobs, dim=-1)
    return SampleOutput(out, logprob, top.indices, top.values - lse[:, None])
