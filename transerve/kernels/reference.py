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

import torch

_MASK32 = 0xFFFFFFFF


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
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new queries over its cached context (new tokens included).

    All single-token decodes are one batched computation; each prefill chunk is one more, so padding
    never multiplies a long prompt by the batch size."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    block_size = k_cache.shape[1]
    out = torch.empty_like(query)
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
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
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

    # [num_seqs, num_kv_heads, group * max_q, head_dim] x [num_seqs, num_kv_heads, head_dim, ctx_len]
    q = q.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)).float() * scale
    scores = scores.view(num_seqs, num_kv_heads, group, max_q, ctx_len)

    q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]  # [num_seqs, max_q]
    k_pos = torch.arange(ctx_len, device=device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores.masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(query.dtype)  # padded rows are all -inf

    out = torch.matmul(probs.view(num_seqs, num_kv_heads, group * max_q, ctx_len), values.permute(0, 2, 1, 3))
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_seqs, max_q, num_heads, head_dim)
    return out[seq_of_token, row]


def uniform_noise_ref(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_seqs, vocab_size] uniforms in (0, 1) from a counter-based hash of (seed, step, token).

    Integer-only (murmur3's finaliser on 32 bits), so the Triton sampler draws the very same numbers,
    and a request's draws depend on its own seed and position alone, never on its batch."""
    x = (seeds.long() * 0x9E3779B1 + steps.long() * 0x85EBCA77) & _MASK32
    x = x[:, None] ^ ((torch.arange(vocab_size, device=seeds.device, dtype=torch.long) * 0xC2B2AE3D) & _MASK32)
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    x ^= x >> 16
    return ((x >> 8).float() + 0.5) * (1.0 / 16777216.0)


def sample_ref(
    logits: torch.Tensor,  # [num_seqs, vocab_size] float32
    temperature: torch.Tensor,  # [num_seqs] float32; 0 means greedy
    top_k: torch.Tensor,  # [num_seqs] int32; 0 means off
    top_p: torch.Tensor,  # [num_seqs] float32; 1 means off
    min_p: torch.Tensor,  # [num_seqs] float32; 0 means off
    seeds: torch.Tensor,  # [num_seqs] int64
    steps: torch.Tensor,  # [num_seqs] int64: the index of the token being sampled
) -> torch.Tensor:  # [num_seqs] int64
    """Greedy where temperature is 0, otherwise an exponential race (Gumbel-max) over the filtered
    distribution, which draws exactly from softmax(logits / T) restricted to the kept tokens."""
    greedy = logits.argmax(dim=-1)
    if bool((temperature <= 0).all()):
        return greedy
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits.float() / t[:, None]
    probs = torch.softmax(scaled, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if bool((min_p > 0).any()):
        keep &= probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        keep_sorted = (top_k[:, None] <= 0) | (rank < top_k[:, None])
        # Keep a token while the mass before it is under top_p: the top token always survives.
        keep_sorted &= (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]
        keep &= torch.zeros_like(keep).scatter_(-1, order, keep_sorted)
    race = probs.masked_fill(~keep, 0.0) / -torch.log(uniform_noise_ref(seeds, steps, probs.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)
