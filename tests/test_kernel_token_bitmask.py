"""The Triton token-bitmask kernel against `apply_token_bitmask_ref`, and the reference against a plain
reading of the bits: masked tokens become -inf, allowed ones keep their logits, other rows are untouched."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, GPU, import_kernels
from transerve.kernels.reference import apply_token_bitmask_ref

K = import_kernels()
VOCAB = 151_936 if GPU else 1000


@pytest.fixture(autouse=True)
def _seed_and_interpreter(monkeypatch):
    torch.manual_seed(0)
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(num_seqs: int, rows: list[int], vocab: int, words: int):
    logits = torch.randn(num_seqs, vocab, device=DEVICE)
    bitmask = torch.randint(-2**31, 2**31, (len(rows), words), dtype=torch.int32, device=DEVICE)
    return logits, bitmask, torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def _allowed(word_row: list[int], vocab: int) -> list[bool]:
    return [t // 32 < len(word_row) and bool((word_row[t // 32] >> (t % 32)) & 1) for t in range(vocab)]


def test_reference_masks_exactly_the_clear_bits_of_the_given_rows():
    logits, bitmask, rows = _case(4, [2, 0], 100, 4)  # 128 bits cover the vocabulary
    before = logits.clone()
    out = apply_token_bitmask_ref(logits, bitmask, rows)
    for k, row in enumerate(rows.tolist()):
        allowed = torch.tensor(_allowed(bitmask[k].tolist(), 100))
        assert torch.equal(out[row][allowed], before[row][allowed])
        assert torch.isneginf(out[row][~allowed]).all()
    for row in (1, 3):  # unconstrained rows pay nothing and change nothing
        assert torch.equal(out[row], before[row])


def test_reference_masks_tokens_beyond_the_bitmask():
    logits, bitmask, rows = _case(1, [0], 100, 2)  # 64 bits for 100 tokens
    out = apply_token_bitmask_ref(logits, bitmask, rows)
    assert torch.isneginf(out[0, 64:]).all()


@pytest.mark.parametrize("num_seqs,rows,words", [(3, [1], None), (8, [7, 0, 3, 4], None), (2, [0, 1], 3), (5, [], None)])
def test_kernel_matches_reference(num_seqs, rows, words):
    words = words if words is not None else -(-VOCAB // 32)
    logits, bitmask, index = _case(num_seqs, rows, VOCAB, words)
    expected = apply_token_bitmask_ref(logits.clone(), bitmask, index)
    got = K.token_bitmask.apply_token_bitmask(logits, bitmask, index)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rows", [[4, 1, 5], [0, 1, 2, 3, 4, 5]])
def test_cpu_dispatch_matches_reference(monkeypatch, rows):
    from transerve.kernels import apply_token_bitmask

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, bitmask, rows = _case(6, rows, 1000, 32)  # 1024 bits: a padded vocabulary
    logits = logits.cpu()
    expected = apply_token_bitmask_ref(logits.clone(), bitmask.cpu(), rows.cpu())
    assert torch.equal(apply_token_bitmask(logits, bitmask.cpu(), rows.cpu()), expected)
