"""Pure-torch references of every kernel: the CPU path and the test oracle.

Each `name_ref` has the same signature as the Triton launcher `name` in its own module.

Shapes used throughout:
  k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
  block_tables      [num_seqs, max_blocks_per_seq] int32, padded with 0
  seq_lens          [num_seqs] int32: tokens in the cache for each sequence after this step
  query_start_loc   [num_seqs + 1] int32: cumulative query lengths; the queries of sequence i are
                    its last (query_start_loc[i+1] - query_start_loc[i]) positions
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_MASK32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1


def write_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64: block * block_size + offset; -1 skips the token
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_seqs, max_blocks * block_size, num_kv_heads, head_dim]: each sequence's cache, padded."""
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    return cache[block_tables.long()].view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]: written in place when given
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new queries over its cached context (new tokens included).

    All single-token decodes are one batched computation; each prefill chunk is one more, so padding
    never multiplies a long prompt by the batch size."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    block_size = k_cache.shape[1]
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    decodes = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    if decodes:
        idx = torch.tensor(decodes, device=query.device)
        num_blocks = -(-max(lens[i] for i in decodes) // block_size)
        q_loc = torch.arange(len(decodes) + 1, device=query.device, dtype=query_start_loc.dtype)
        token_idx = query_start_loc[idx].long()
        out[token_idx] = _attend_padded(
            query[token_idx], k_cache, v_cache, block_tables[idx, :num_blocks], seq_lens[idx], q_loc, scale, sliding_window
        )
    for i in range(len(lens)):
        if starts[i + 1] - starts[i] > 1:
            num_blocks = -(-lens[i] // block_size)
            q_loc = query_start_loc[i : i + 2] - starts[i]
            out[starts[i] : starts[i + 1]] = _attend_padded(
                query[starts[i] : starts[i + 1]], k_cache, v_cache, block_tables[i : i + 1, :num_blocks],
                seq_lens[i : i + 1], q_loc, scale, sliding_window,
            )
    return out


def _attend_padded(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """paged_attention_ref for sequences padded to the longest query, in a few batched matmuls."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    group = num_heads // k_cache.shape[2]
    device = query.device
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    max_q = int(q_lens.max())
    seq_lens = seq_lens.long()

    # Pad queries to [num_seqs, max_q]; `row` is each query's index inside its sequence.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=device) - query_start_loc[:-1].long()[seq_of_token]
    q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
    q[seq_of_token, row] = query

    keys = _gather_context(k_cache, block_tables).to(query.dtype)
    values = _gather_context(v_cache, block_tables).to(query.dtype)
    ctx_len = keys.shape[1]
    # Slots past a sequence's end hold whatever the cache had (NaN in the tests): zero them, since
    # masking adds -inf to a NaN score and a probability of 0 times a NaN value is still NaN.
    beyond = (torch.arange(ctx_len, device=device)[None, :] >= seq_lens[:, None])[:, :, None, None]
    keys = keys.masked_fill(beyond, 0.0)
    values = values.masked_fill(beyond, 0.0)

    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [num_seqs, max_q]
    k_pos = torch.arange(ctx_len, device=device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    # One fused SDPA call (GQA without repeating K/V); padded query rows come out as garbage and are
    # dropped by the final gather.
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed[:, None],
        scale=scale, enable_gqa=group > 1,
    )
    out = out.transpose(1, 2)  # [num_seqs, max_q, num_heads, head_dim]
    return out[seq_of_token, row]


def uniform_noise_ref(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_seqs, vocab_size] uniforms in (0, 1) from a counter-based hash of (seed, step, token).

    Integer-only (murmur3's finaliser on 32 bits), so the Triton sampler draws the very same numbers,
    and a request's draws depend on its own seed and position alone, never on its batch."""
    # Computed in int32 (3x faster than int64 on CPU): multiplication wraps to the same low 32 bits,
    # and right shifts are masked to be logical, so the bits equal the uint32 arithmetic of the kernel.
    x = _as_int32((seeds.long() * 0x9E3779B1 + steps.long() * 0x85EBCA77) & _MASK32)
    token = _as_int32((torch.arange(vocab_size, device=seeds.device, dtype=torch.long) * 0xC2B2AE3D) & _MASK32)
    x = x[:, None] ^ token
    x ^= (x >> 16) & 0xFFFF
    x *= _as_signed(0x85EBCA6B)
    x ^= (x >> 13) & 0x7FFFF
    x *= _as_signed(0xC2B2AE35)
    x ^= (x >> 16) & 0xFFFF
    # (k + 0.5) / 2**24 rounds to exactly 1.0 in float32 for the top k, and -log(1) = 0 would turn the
    # race into 0/0 (NaN wins argmax: a random token); the largest float below 1 keeps it in (0, 1).
    return ((((x >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / 16777216.0)).clamp_max(_BELOW_ONE)


def _as_signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) to int32 with the same bits."""
    return (x - (((x >> 31) & 1) << 32)).to(torch.int32)


class SampleOutput(NamedTuple):
    """What `sample(..., num_logprobs=N)` returns; without `num_logprobs` it returns `token_ids` alone.

    Logprobs are of the raw model distribution (log_softmax of the logits before penalties and
    temperature), as vLLM reports them by default."""

    token_ids: torch.Tensor  # [num_seqs] int64
    logprobs: torch.Tensor  # [num_seqs] float32: the chosen token's
    top_token_ids: torch.Tensor  # [num_seqs, N] int64, most likely first (ties: torch.topk's order)
    top_logprobs: torch.Tensor  # [num_seqs, N] float32


def apply_penalties_ref(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32
    repetition_penalty: torch.Tensor | None,  # [num_seqs] float32; 1 means off
    presence_penalty: torch.Tensor | None,  # [num_seqs] float32; 0 means off
    frequency_penalty: torch.Tensor | None,  # [num_seqs] float32; 0 means off
    prompt_token_ids: torch.Tensor | None,  # [num_seqs, max_prompt_len] int, padded with -1
    output_token_ids: torch.Tensor | None,  # [num_seqs, max_output_len] int, padded with -1
) -> torch.Tensor:
    """vLLM's penalties, in its order: repetition over prompt and output tokens (divide positive logits,
    multiply negative ones), then frequency (times the output count), then presence (output only)."""
    num_seqs, vocab_size = logits.shape
    counts = torch.zeros(num_seqs, vocab_size + 1, dtype=torch.int32, device=logits.device)
    if output_token_ids is not None:
        ids = output_token_ids.long().masked_fill(output_token_ids < 0, vocab_size)  # padding -> spare column
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    seen = counts > 0
    if prompt_token_ids is not None:
        ids = prompt_token_ids.long().masked_fill(prompt_token_ids < 0, vocab_size)
        seen.scatter_(1, ids, True)
    counts, seen = counts[:, :vocab_size], seen[:, :vocab_size]
    if repetition_penalty is not None:
        rep = repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if frequency_penalty is not None:
        logits = logits - frequency_penalty[:, None] * counts.float()
    if presence_penalty is not None:
        logits = logits - presence_penalty[:, None] * (counts > 0).float()
    return logits


def sample_ref(
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
) -> torch.Tensor | SampleOutput:  # [num_seqs] int64 token ids, or SampleOutput when num_logprobs is set
    """Greedy where temperature is 0, otherwise an exponential race (Gumbel-max) over the filtered
    distribution, which draws exactly from softmax(logits / T) restricted to the kept tokens.

    Filters are probability thresholds, so tokens tied at a boundary are kept together: top-k keeps
    tokens at least as likely as the k-th; top-p keeps tokens whose strictly-more-likely mass is under
    top_p (the top token always survives); min-p keeps tokens at least min_p times the top one."""
    raw = logits
    if repetition_penalty is not None or presence_penalty is not None or frequency_penalty is not None:
        logits = apply_penalties_ref(
            logits.float(), repetition_penalty, presence_penalty, frequency_penalty, prompt_token_ids, output_token_ids
        )
    token_ids = _choose(logits, temperature, top_k, top_p, min_p, seeds, steps)
    if num_logprobs is None:
        return token_ids
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    top_ids = raw.topk(num_logprobs, dim=-1).indices
    return SampleOutput(token_ids, logprobs.gather(1, token_ids[:, None])[:, 0], top_ids, logprobs.gather(1, top_ids))


def _choose(logits, temperature, top_k, top_p, min_p, seeds, steps) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    probs = torch.softmax(scaled, dim=-1)
    threshold = torch.zeros_like(probs[:, 0])
    if bool((min_p > 0).any()):
        threshold = torch.maximum(threshold, min_p * probs.max(dim=-1).values)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_probs = probs.sort(dim=-1, descending=True).values
        vocab_size = probs.shape[-1]
        kth = sorted_probs.gather(1, (top_k.long().clamp(1, vocab_size) - 1)[:, None])[:, 0]
        threshold = torch.where(top_k > 0, torch.maximum(threshold, kth), threshold)
        # The last token whose preceding mass is under top_p: the top token always qualifies.
        kept = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]).sum(dim=-1).clamp(min=1)
        pth = sorted_probs.gather(1, (kept - 1)[:, None])[:, 0]
        threshold = torch.where(top_p < 1, torch.maximum(threshold, pth), threshold)
    race = probs.masked_fill(probs < threshold[:, None], 0.0) / -torch.log(uniform_noise_ref(seeds, steps, probs.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)
