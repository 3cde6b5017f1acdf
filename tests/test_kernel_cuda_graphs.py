"""DecodeGraphs (transerve/engine/cuda_graphs.py): a padded, static-buffer decode step gives the logits
of the eager step. On CPU the closures run eagerly with the reference kernels (the padding and buffer
logic); with TRANSERVE_KERNEL_TESTS=gpu they are captured as CUDA graphs over the Triton kernels."""

from __future__ import annotations

import copy

import pytest
import numpy as np
import torch

from kernel_utils import DEVICE, GPU
from transerve.engine.cuda_graphs import DecodeGraphs
from transerve.engine.attention import ATTN_IMPLEMENTATION, PagedBatch, register_attention
from transerve.kernels import kernels_for

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    register_attention()
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTN_IMPLEMENTATION)
    return model.to(device=DEVICE, dtype=torch.float32).eval()


def _caches(num_blocks):
    shape = (num_blocks, BLOCK_SIZE, 2, 32)
    return [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)) for _ in range(2)]


def _eager(model, caches, kernels, ids, positions, slots, tables, seq_lens, q_lens, keep):
    width = max(map(len, tables))
    batch = PagedBatch(
        kv_caches=caches, slot_mapping=torch.tensor(slots, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32),
        write_kv=kernels[0], paged_attention=kernels[1],
    )
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=DEVICE), position_ids=torch.tensor([positions], device=DEVICE),
                    logits_to_keep=torch.tensor(keep, device=DEVICE), use_cache=False, paged_batch=batch)
    return out.logits[0].float()


def test_padded_decode_step_matches_eager(model):
    kernels = kernels_for(DEVICE)
    caches = _caches(32)
    tables = [[5, 9], [2], [30, 31, 7]]  # scattered blocks
    prompt_lens = [20, 3, 40]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in prompt_lens]

    def slot(table, pos):
        return table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    # Prefill the three prompts eagerly, filling the cache.
    ids = sum(prompts, [])
    positions = [p for n in prompt_lens for p in range(n)]
    slots = [slot(t, p) for t, n in zip(tables, prompt_lens) for p in range(n)]
    keep = torch.tensor(prompt_lens).cumsum(0).sub(1).tolist()
    _eager(model, caches, kernels, ids, positions, slots, tables, prompt_lens, prompt_lens, keep)

    # One decode step, eagerly and through the graphs (3 sequences padded to the bucket of 4).
    graph_caches = [(k.clone(), v.clone()) for k, v in caches]
    new = [7, 8, 9]
    positions = list(prompt_lens)
    slots = [slot(t, p) for t, p in zip(tables, positions)]
    seq_lens = [n + 1 for n in prompt_lens]
    want = _eager(model, caches, kernels, new, positions, slots, tables, seq_lens, [1, 1, 1], [0, 1, 2])
    graphs = DecodeGraphs(model, graph_caches, kernels[0], kernels[1], max_num_seqs=8, max_blocks_per_seq=16,
                          block_size=BLOCK_SIZE)
    assert graphs.use_graphs == GPU and graphs.bucket(3) == 4 and graphs.bucket(9) is None
    graphs.capture()
    width = max(len(t) for t in tables)
    padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)  # as the runner's rows give it
    for _ in range(2):  # replays read the buffers afresh each time
        got = graphs.run(new, positions, slots, padded, seq_lens)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for (k, v), (gk, gv) in zip(caches, graph_caches):  # same K/V written, nothing for the padding row
        torch.testing.assert_close(gk, k, atol=1e-5, rtol=0)
        torch.testing.assert_close(gv, v, atol=1e-5, rtol=0)
