"""write_kv and paged_attention (Triton) against their torch references on fresh random inputs.

CPU: Triton's interpreter, small shapes (`python -m pytest tests/test_kernels.py`). GPU: compiled, real
shapes, with TRANSERVE_KERNEL_TESTS=gpu. Caches and outputs start as NaN, so a slot or an output
element the kernel forgets to write, or a stale slot it reads, fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from kernel_utils import ATOL, DEVICE, GPU, import_kernels, paged_batch, randn
from transerve.kernels.reference import paged_attention_ref, write_kv_ref

K = import_kernels()
DTYPES = [torch.float16, torch.bfloat16] if GPU else [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed_and_interpreter(monkeypatch):
    torch.manual_seed(0)
    if not GPU:  # triton also reads it at launch, when it lazily imports more of itself
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _assert_attention(batch, out, sliding_window=None):
    expected = paged_attention_ref(
        batch.query.float(), batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.query_start_loc, batch.scale, sliding_window,
    )
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    assert not out.isnan().any(), "an output element was not written, or a stale cache slot was read"
    torch.testing.assert_close(out.float(), expected, atol=ATOL[out.dtype], rtol=0)


def _run(batch, sliding_window=None, **knobs):
    out = torch.full_like(batch.query, float("nan")).contiguous()
    if knobs:
        result = K.paged_attention.launch(
            batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            batch.scale, sliding_window, out, **knobs,
        )
    else:
        result = K.paged_attention.paged_attention(
            batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            batch.scale, sliding_window, out=out,
        )
    assert result is out
    return out


# ---------------------------------------------------------------- write_kv

@pytest.mark.parametrize("dtype", DTYPES + ([torch.float32] if GPU else []))
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 64, 16), (1, 80, 32), (4, 128, 16)])
def test_write_kv_matches_reference(dtype, num_kv_heads, head_dim, block_size):
    num_tokens = 300 if GPU else 37
    num_blocks = 4096 if GPU else 64
    # key/value as the model runner passes them: transposed views of [1, kv_heads, tokens, head_dim].
    key = randn(1, num_kv_heads, num_tokens, head_dim, dtype=dtype)[0].transpose(0, 1)
    value = randn(1, num_kv_heads, num_tokens, head_dim, dtype=dtype)[0].transpose(0, 1)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::5] = -1  # skipped tokens
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(4)]
    K.kv_cache.write_kv(key, value, caches[0], caches[1], slots)
    write_kv_ref(key, value, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0, equal_nan=True)
    written = caches[0].view(-1, num_kv_heads, head_dim)[slots[slots >= 0]]
    assert not written.isnan().any()


def test_write_kv_accepts_int32_slots_and_empty_steps():
    cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    key = randn(3, 2, 64)
    K.kv_cache.write_kv(key, key, cache, cache.clone(), torch.tensor([0, 17, 63], dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(cache.view(-1, 2, 64)[[0, 17, 63]], key, atol=0, rtol=0)
    K.kv_cache.write_kv(key[:0], key[:0], cache, cache.clone(), torch.zeros(0, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------- paged attention

def _lens(small, large):
    return large if GPU else small


# (q_lens, context_lens): decodes only, prefill only, and mixed batches with chunked prefill over a
# cached prefix, including chunks that end inside a block and a sequence of exactly one block.
MIXED = _lens(
    ([1, 7, 1, 20, 1], [9, 0, 40, 13, 0]),
    ([1] * 24 + [300, 77, 1, 1000, 16], [int(x) for x in torch.randint(0, 2000, (24,))] + [0, 500, 4095, 24, 1]),
)
DECODE = _lens(([1, 1, 1, 1], [0, 15, 33, 70]), ([1] * 64, [int(x) for x in torch.randint(0, 4096, (64,))]))
PREFILL = _lens(([16, 5], [0, 11]), ([512, 333], [0, 1111]))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (14, 2)])  # GQA 1, 4, 7
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_paged_attention_gqa_and_head_sizes(num_heads, num_kv_heads, head_dim):
    dtype = torch.bfloat16 if GPU else torch.float32
    batch = paged_batch(*MIXED, num_heads, num_kv_heads, head_dim, 16, dtype)
    _assert_attention(batch, _run(batch))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_paged_attention_dtypes_and_block_sizes(dtype, block_size, lens):
    batch = paged_batch(*lens, 8, 2, 96, block_size, dtype)
    _assert_attention(batch, _run(batch))


@pytest.mark.parametrize("num_splits", [2, 4, 16])
def test_split_kv_matches_reference(num_splits):
    # Splits of different sizes per sequence, some of them empty (a 3-token context with 16 splits).
    lens = _lens(([1, 1, 1], [200, 2, 95]), ([1] * 8, [8000, 2, 95, 4096, 1, 300, 12000, 63]))
    dtype = torch.bfloat16 if GPU else torch.float32
    batch = paged_batch(*lens, 14, 2, 64, 16, dtype)
    _assert_attention(batch, _run(batch, num_splits=num_splits))


def test_split_kv_is_chosen_for_few_long_decodes():
    choose = K.paged_attention.choose_num_splits
    device = torch.device("cuda") if GPU else torch.device("cpu")
    assert choose(2, 2, 2, 8192, device) > 1  # few sequences, long context
    assert choose(2, 9, 2, 8192, device) == 1  # a prefill in the batch
    assert choose(2, 2, 2, 256, device) == 1  # too short to be worth it
    assert choose(4096, 4096, 8, 8192, device) == 1  # enough programs already


@pytest.mark.parametrize("window", [1, 8, 37])
@pytest.mark.parametrize("num_splits", [None, 2])
def test_sliding_window(window, num_splits):
    lens = _lens(([1, 9, 1], [30, 20, 3]), ([1, 600, 1], [3000, 300, 3]))
    batch = paged_batch(*lens, 8, 2, 64, 16, torch.float32 if not GPU else torch.float16)
    if num_splits is not None:  # decodes only, so the split kernel really runs
        batch = paged_batch([1, 1, 1], lens[1], 8, 2, 64, 16, batch.query.dtype)
    out = _run(batch, window, **({"num_splits": num_splits} if num_splits else {}))
    _assert_attention(batch, out, window)


def test_large_block_count_and_tile_knobs():
    # Block ids spread over a big cache (on GPU, past 2**31 elements: 64-bit offsets needed).
    num_blocks = 540_000 if GPU else 8192
    dtype = torch.float16 if GPU else torch.float32
    batch = paged_batch([1, 5, 1], [40, 100, 17], 4, 2, 128, 16, dtype, spare_blocks=num_blocks)
    _assert_attention(batch, _run(batch))
    for tile in (16, 32, 128):
        _assert_attention(batch, _run(batch, tile=tile))


def test_reference_same_signature_and_out_argument():
    import inspect

    assert list(inspect.signature(paged_attention_ref).parameters) == list(
        inspect.signature(K.paged_attention.paged_attention).parameters)
    assert list(inspect.signature(write_kv_ref).parameters) == list(inspect.signature(K.kv_cache.write_kv).parameters)
    batch = paged_batch([3, 1], [4, 9], 4, 2, 64, 16, torch.float32)
    out = torch.full_like(batch.query, float("nan"))
    result = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                                 batch.query_start_loc, batch.scale, out=out)
    assert result is out and not out.isnan().any()


def test_reference_replans_when_the_step_metadata_changes():
    """The reference reuses its index plan across the layers of a step; a new step (new tensors, or
    the same tensors refilled in place) must get a new plan, never the previous step's."""
    batch = paged_batch([1, 1, 5], [7, 30, 2], 4, 2, 64, 16, torch.float32)
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, batch.scale)
    first = paged_attention_ref(batch.query, *args)
    torch.testing.assert_close(paged_attention_ref(batch.query, *args), first, atol=0, rtol=0)
    # Shorten the second sequence in place: its last position drops out of its context.
    batch.seq_lens[1] -= 1
    shorter = paged_attention_ref(batch.query, *args)
    fresh = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables.clone(),
                                batch.seq_lens.clone(), batch.query_start_loc.clone(), batch.scale)
    torch.testing.assert_close(shorter, fresh, atol=0, rtol=0)
    assert (shorter[1] - first[1]).abs().max() > 1e-3  # the other sequences only see different padding:
    torch.testing.assert_close(shorter[[0, 2, 3, 4, 5, 6]], first[[0, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("num_heads,num_kv_heads,sliding_window", [(8, 2, None), (4, 4, None), (6, 2, 7)])
def test_reference_decodes_equal_dense_attention_per_sequence(num_heads, num_kv_heads, sliding_window):
    """A step's decodes share two batched matmuls over a head-major gather; each row must equal plain
    SDPA of that query over its own sequence's context, read block by block from the cache."""
    torch.manual_seed(3)
    lens = [5, 40, 17, 1, 33, 9]
    batch = paged_batch([1] * len(lens), lens, num_heads, num_kv_heads, 64, 16, torch.float32)
    got = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                              batch.query_start_loc, batch.scale, sliding_window)
    assert not got.isnan().any()
    for i, n in enumerate(batch.seq_lens.tolist()):
        slots = [int(batch.block_tables[i, p // 16]) * 16 + p % 16 for p in range(n)]
        keys = batch.k_cache.view(-1, num_kv_heads, 64)[slots].transpose(0, 1)  # [kv_heads, n, head_dim]
        values = batch.v_cache.view(-1, num_kv_heads, 64)[slots].transpose(0, 1)
        allowed = torch.arange(n) > n - 1 - sliding_window if sliding_window else None
        expected = torch.nn.functional.scaled_dot_product_attention(
            batch.query[i][:, None], keys, values, attn_mask=allowed, scale=batch.scale,
            enable_gqa=num_heads != num_kv_heads)[:, 0]
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_reference_prefills_of_similar_sizes_share_a_call_and_equal_dense_attention(sliding_window):
    """New requests with similar prompts are attended in one padded SDPA call, a long prompt in its own (so it
    is never padded by the batch); every row must still equal causal SDPA over its own sequence's context."""
    from transerve.kernels.reference import _prefill_groups

    q_lens, context_lens = [7, 6, 1, 60, 7, 5], [32, 33, 40, 0, 30, 32]  # a decode among them, in the middle
    chunks = [(i, q, c + q) for i, (q, c) in enumerate(zip(q_lens, context_lens)) if q > 1]
    assert _prefill_groups(chunks) == [[0, 1, 4, 5], [3]]
    torch.manual_seed(4)
    batch = paged_batch(q_lens, context_lens, 6, 2, 64, 16, torch.float32)
    got = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                              batch.query_start_loc, batch.scale, sliding_window)
    assert not got.isnan().any()
    starts = batch.query_start_loc.tolist()
    for i, (n_q, n) in enumerate(zip(q_lens, batch.seq_lens.tolist())):
        slots = [int(batch.block_tables[i, p // 16]) * 16 + p % 16 for p in range(n)]
        keys = batch.k_cache.view(-1, 2, 64)[slots].transpose(0, 1)  # [kv_heads, n, head_dim]
        values = batch.v_cache.view(-1, 2, 64)[slots].transpose(0, 1)
        q_pos = torch.arange(n - n_q, n)[:, None]
        allowed = torch.arange(n)[None, :] <= q_pos
        if sliding_window:
            allowed &= torch.arange(n)[None, :] > q_pos - sliding_window
        expected = torch.nn.functional.scaled_dot_product_attention(
            batch.query[starts[i]:starts[i + 1]].transpose(0, 1), keys, values, attn_mask=allowed, scale=batch.scale,
            enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[starts[i]:starts[i + 1]], expected, rtol=1e-5, atol=1e-5)


def test_reference_write_kv_rechecks_padding_when_the_slots_change():
    """write_kv_ref checks slot_mapping for padding (-1) once per step; slots refilled in place with a
    -1 must still skip that token, not write it to slot -1 (the cache's last row)."""
    k_cache = torch.zeros(4, 16, 2, 8)
    v_cache = torch.zeros(4, 16, 2, 8)
    slots = torch.tensor([3, 5])
    write_kv_ref(torch.ones(2, 2, 8), torch.ones(2, 2, 8), k_cache, v_cache, slots)
    slots[1] = -1
    write_kv_ref(torch.full((2, 2, 8), 2.0), torch.full((2, 2, 8), 2.0), k_cache, v_cache, slots)
    flat = k_cache.view(64, 2, 8)
    assert flat[3].eq(2).all() and flat[5].eq(1).all() and flat[63].eq(0).all()
