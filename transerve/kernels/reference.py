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

import functools

import weakref
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
    # Every layer of a step writes through the same slot_mapping: check it for padding (-1) once a step.
    keep = _per_step("write_kv", (slot_mapping,), None, lambda: (slot_mapping >= 0) if bool((slot_mapping < 0).any()) else None)
    if keep is not None:  # rare (padded CUDA-graph batches)
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    slot_mapping = slot_mapping.long()
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


class _Group(NamedTuple):
    """Sequences attended together: their query tokens padded to [num_seqs, max_q], and where each
    padded row reads its context from (token slots into the flattened cache)."""

    token_idx: torch.Tensor  # [num_group_tokens] int64: rows of `query` / `out`
    seq_of_token: torch.Tensor  # [num_group_tokens] int64: which padded sequence each token is in
    row: torch.Tensor  # [num_group_tokens] int64: its index among that sequence's queries
    slots: torch.Tensor  # [num_seqs, ctx_len] int64: cache slot of every context position
    allowed: torch.Tensor  # [num_seqs, 1, max_q, ctx_len] bool: causal (and sliding-window) mask


class _Decodes(NamedTuple):
    """All of a step's single-token decodes, laid out head-major for batched matmuls."""

    token_idx: torch.Tensor  # [num_seqs] int64: rows of `query` / `out`
    head_slots: torch.Tensor  # [num_seqs * num_kv_heads * ctx_len] int64: rows of the cache as [slots * kv_heads, head_dim]
    bias: torch.Tensor  # [num_seqs * num_kv_heads, heads_per_kv, ctx_len]: 0 where allowed, -inf elsewhere


# For each user ("write_kv", "attention"): (weak references and versions of its step's metadata, {key: value}).
_last_step: dict[str, tuple] = {}


def _per_step(user: str, metadata: tuple[torch.Tensor, ...], key, build):
    """`build()`, computed once per step and reused by every layer.

    A step calls attention once per layer with the very same metadata tensors, so values are keyed by
    their identity and version: weak references, so a freed tensor never matches even if its id is
    reused, and versions, so a tensor refilled in place does not either."""
    entry = _last_step.get(user)
    if entry is None or not all(ref() is t and version == _version(t) for (ref, version), t in zip(entry[0], metadata)):
        entry = (tuple((weakref.ref(t), _version(t)) for t in metadata), {})
        _last_step[user] = entry
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def _plan(block_tables, seq_lens, query_start_loc, block_size: int, sliding_window: int | None,
          heads: tuple[int, int, torch.dtype]) -> list[_Group | _Decodes]:
    """Index and mask tensors for one step's attention. Layers may differ in window (Gemma, Mistral):
    one plan each. `heads`: (num_kv_heads, num_heads, dtype), which the decodes' layout depends on."""
    return _per_step("attention", (block_tables, seq_lens, query_start_loc), (block_size, sliding_window, heads),
                     lambda: _build_plan(block_tables, seq_lens, query_start_loc, block_size, sliding_window, heads))


def _version(t: torch.Tensor) -> int | None:
    # Inference-mode tensors (the model runner's) have no version counter; they are built per step.
    return None if t.is_inference() else t._version


def _build_plan(block_tables, seq_lens, query_start_loc, block_size, sliding_window, heads) -> list[_Group | _Decodes]:
    """All single-token decodes form one group; prefill chunks form groups of similar sizes (`_prefill_groups`)."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    prefills = _prefill_groups([(i, n, lens[i]) for i, n in enumerate(q_lens) if n > 1])
    groups = [_group(seqs, starts, lens, block_tables, block_size, sliding_window) for seqs in prefills]
    if decodes:
        groups.insert(0, _decodes(_group(decodes, starts, lens, block_tables, block_size, sliding_window), *heads))
    return groups


def _prefill_groups(chunks: list[tuple[int, int, int]]) -> list[list[int]]:
    """Prefill chunks (index, query length, context length) in groups that one SDPA call each attends, padded to
    the group's longest query and context: a group grows while its padded size stays within twice the chunks'
    own, so 32 new requests of similar prompts are one call, not 32, and a long prompt is never padded by the
    batch. Each group lists its chunks in step order."""
    groups: list[list[int]] = []
    members: list[int] = []
    max_q = max_ctx = cells = 0  # the open group's longest query and context, and its chunks' own size
    for i, q, ctx in sorted(chunks, key=lambda c: (c[2], c[1])):
        if members and (len(members) + 1) * max(max_q, q) * max(max_ctx, ctx) > 2 * (cells + q * ctx):
            groups.append(sorted(members))
            members, max_q, max_ctx, cells = [], 0, 0, 0
        members.append(i)
        max_q, max_ctx, cells = max(max_q, q), max(max_ctx, ctx), cells + q * ctx
    if members:
        groups.append(sorted(members))
    return groups


def _group(seqs, starts, lens, block_tables, block_size, sliding_window) -> _Group:
    device = block_tables.device
    q_lens = [starts[i + 1] - starts[i] for i in seqs]
    max_q, ctx_len = max(q_lens), max(lens[i] for i in seqs)
    seq_lens = torch.tensor([lens[i] for i in seqs], device=device)
    k_pos = torch.arange(ctx_len, device=device)
    # Positions past a sequence's end read its position 0 instead of whatever the cache holds there
    # (NaN in the tests): masked out either way, but a NaN value times probability 0 is still NaN.
    pos = torch.where(k_pos[None, :] < seq_lens[:, None], k_pos[None, :], 0)
    tables = block_tables[torch.tensor(seqs, device=device)].long()
    slots = tables.gather(1, pos // block_size) * block_size + pos % block_size
    q_pos = (seq_lens - torch.tensor(q_lens, device=device))[:, None] + torch.arange(max_q, device=device)[None, :]
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    token_idx = torch.tensor([starts[i] + r for i, n in zip(seqs, q_lens) for r in range(n)], device=device)
    seq_of_token = torch.tensor([s for s, n in enumerate(q_lens) for _ in range(n)], device=device)
    row = torch.tensor([r for n in q_lens for r in range(n)], device=device)
    return _Group(token_idx, seq_of_token, row, slots, allowed[:, None])


def _decodes(g: _Group, num_kv_heads: int, num_heads: int, dtype: torch.dtype) -> _Decodes:
    num_seqs, ctx_len = g.slots.shape
    kv_heads = torch.arange(num_kv_heads, device=g.slots.device)
    head_slots = (g.slots[:, None, :] * num_kv_heads + kv_heads[None, :, None]).view(-1)
    bias = torch.zeros(g.allowed.shape, dtype=dtype, device=g.slots.device).masked_fill_(~g.allowed, float("-inf"))
    bias = bias.expand(num_seqs, num_kv_heads, num_heads // num_kv_heads, ctx_len)
    return _Decodes(g.token_idx, head_slots, bias.reshape(num_seqs * num_kv_heads, num_heads // num_kv_heads, ctx_len))


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
    """Causal attention of each sequence's new queries over its cached context (new tokens included),
    gathered token by token from the cache: two batched matmuls for all the step's decodes, one SDPA
    call per prefill chunk."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = query.shape[1]
    k_flat = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_flat = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    groups = _plan(block_tables, seq_lens, query_start_loc, block_size, sliding_window, (num_kv_heads, num_heads, query.dtype))
    # A step of decodes only, or of one prefill, is one group over every query row in order: its
    # result is the output, with no gather of its queries and no scatter into `out`.
    whole = len(groups) == 1 and out is None
    if out is None and not whole:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for g in groups:
        if isinstance(g, _Decodes):
            rows = _attend_decodes(query if whole else query[g.token_idx], k_cache, v_cache, scale, g)
        else:
            num_seqs, max_q, ctx_len = g.allowed.shape[0], g.allowed.shape[2], g.slots.shape[1]
            q = query.new_zeros(num_seqs, max_q, num_heads, head_dim)
            q[g.seq_of_token, g.row] = query[g.token_idx]
            # index_select, not advanced indexing: 2-4x faster on CPU. [num_seqs, kv_heads, ctx_len, head_dim]
            keys = k_flat.index_select(0, g.slots.view(-1)).view(num_seqs, ctx_len, num_kv_heads, head_dim)
            values = v_flat.index_select(0, g.slots.view(-1)).view(num_seqs, ctx_len, num_kv_heads, head_dim)
            # GQA without repeating K/V; padded query rows come out as garbage and are dropped below.
            result = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), keys.to(query.dtype).transpose(1, 2), values.to(query.dtype).transpose(1, 2),
                attn_mask=g.allowed, scale=scale, enable_gqa=num_heads != num_kv_heads,
            )
            rows = result.transpose(1, 2)[g.seq_of_token, g.row]
        if whole:
            return rows
        out[g.token_idx] = rows
    return out


def _attend_decodes(query, k_cache, v_cache, scale: float, d: _Decodes) -> torch.Tensor:
    """One query per sequence: K and V gathered head-major, so that scores and output are two batched
    matmuls over contiguous memory (the attention alone, on CPU: 1.3-2.8x faster than SDPA over the
    token-major gather at batch 1 to 32 and short contexts). [num_seqs, num_heads, head_dim]"""
    num_seqs, num_heads, head_dim = query.shape
    batch, heads_per_kv, ctx_len = d.bias.shape
    keys = k_cache.view(-1, head_dim).index_select(0, d.head_slots).view(batch, ctx_len, head_dim).to(query.dtype)
    values = v_cache.view(-1, head_dim).index_select(0, d.head_slots).view(batch, ctx_len, head_dim).to(query.dtype)
    grouped = query.reshape(batch, heads_per_kv, head_dim)  # query head h reads kv head h // heads_per_kv
    scores = torch.baddbmm(d.bias, grouped, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), values).view(num_seqs, num_heads, head_dim)


def uniform_noise_ref(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[num_seqs, vocab_size] uniforms in (0, 1) from a counter-based hash of (seed, step, token).

    Integer-only (murmur3's finaliser on 32 bits), so the Triton sampler draws the very same numbers,
    and a request's draws depend on its own seed and position alone, never on its batch."""
    tokens = torch.arange(vocab_size, device=seeds.device)
    return _uniform_at(seeds[:, None], steps[:, None], tokens[None, :])


def _uniform_at(seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """uniform_noise_ref's value at (seed, step, token), elementwise over broadcastable int tensors."""
    # Computed in int32 (3x faster than int64 on CPU): multiplication wraps to the same low 32 bits,
    # and right shifts are masked to be logical, so the bits equal the uint32 arithmetic of the kernel.
    x = _as_int32((seeds.long() * 0x9E3779B1 + steps.long() * 0x85EBCA77) & _MASK32)
    x = x ^ _as_int32((tokens.long() * 0xC2B2AE3D) & _MASK32)
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


def _top_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, head: int = 1024) -> torch.Tensor:
    """The head of each row's probabilities sorted descending: enough for every top-k and nucleus.

    Sorting the whole vocabulary is most of a filtered sampling step on CPU; a top-`head` selection is
    several times cheaper and nearly always holds the nucleus. When some row's nucleus reaches past
    it (a very flat distribution), the full sort it is."""
    vocab_size = probs.shape[-1]
    head = min(vocab_size, max(head, int(top_k.max())))
    if head == vocab_size:
        return probs.sort(dim=-1, descending=True).values
    top = probs.topk(head, dim=-1).values
    mass_before_last = top.sum(dim=-1) - top[:, -1]
    if bool(((top_p >= 1) | (mass_before_last >= top_p)).all()):
        return top
    return probs.sort(dim=-1, descending=True).values


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
        sorted_probs = _top_probs(probs, top_k, top_p)
        vocab_size = probs.shape[-1]
        kth = sorted_probs.gather(1, (top_k.long().clamp(1, vocab_size) - 1)[:, None])[:, 0]
        threshold = torch.where(top_k > 0, torch.maximum(threshold, kth), threshold)
        # The last token whose preceding mass is under top_p: the top token always qualifies.
        in_nucleus = ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p[:, None]).sum(dim=-1).clamp(min=1)
        pth = sorted_probs.gather(1, (in_nucleus - 1)[:, None])[:, 0]
        threshold = torch.where(top_p < 1, torch.maximum(threshold, pth), threshold)
    # Greedy rows take no part in the race: their answer is `greedy` whatever it gives.
    kept = (probs >= threshold[:, None]) & (temperature > 0)[:, None]
    if int(kept.sum()) * 8 < kept.numel():
        # Few survivors (top-k, top-p, min-p, or mostly greedy rows): hash noise for them alone, not for
        # the whole vocabulary of every row. The same values at the same places: the same winner.
        rows, tokens = kept.nonzero(as_tuple=True)
        race = torch.zeros_like(probs)
        race[rows, tokens] = probs[rows, tokens] / -torch.log(_uniform_at(seeds[rows], steps[rows], tokens))
    else:
        race = probs.masked_fill(~kept, 0.0) / -torch.log(uniform_noise_ref(seeds, steps, probs.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Constrained decoding: logits[rows[k], t] = -inf unless bit t % 32 of bitmask[k, t // 32] is set.

    logits [num_seqs, vocab] float32, edited in place and returned; bitmask [len(rows), words] int32; rows int64.
    Tokens past the bitmask's width (32 * words) are masked too."""
    vocab = logits.shape[1]
    # Byte by byte through a 256 x 8 table (the words are little-endian): far cheaper than shifting int32s.
    table = _byte_bits(bitmask.device)
    allowed = table[bitmask.contiguous().view(torch.uint8).long()].flatten(1)[:, :vocab]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    if rows.numel() == logits.shape[0] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
        return logits.masked_fill_(~allowed, float("-inf"))  # every row, in order: no gather
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


@functools.cache
def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte b."""
    return ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool().to(device)
