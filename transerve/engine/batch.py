"""The model runner's side of the step contract (engine/step.py): what it keeps of each request between
steps, and one step packed from that into the numpy arrays the model call and the sampler are built from.
Torch-free.

Everything a step needs of a request (its tokens, block table row, sampling parameters) lives in one row of
a few arrays (`Rows`), updated by the step's deltas and by the tokens the runner samples. A step is then
gathered with a handful of array operations whatever its size: no Python loop over its requests."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from transerve.engine.request import SamplingParams
from transerve.engine.step import NewRequest, SampledTokens, ScheduledStep, TokenBitmask


class RequestState:
    """A request as the runner knows it, from its NewRequest until its id is freed; its tokens and blocks
    live in its row of Rows."""

    __slots__ = ("request_id", "row", "num_prompt_tokens", "params", "seed", "multimodal")

    def __init__(self, new: NewRequest, row: int) -> None:
        self.request_id = new.request_id
        self.row = row
        self.num_prompt_tokens = len(new.prompt_token_ids)
        self.params: SamplingParams = new.sampling_params
        self.seed = new.seed
        self.multimodal: Any = new.multimodal


NUM_TOKENS, NUM_PROMPT, NUM_BLOCKS, TOP_K, SEED, SPECIAL = range(6)  # rows of Rows.ints


class Rows:
    """Per-request arrays indexed by RequestState.row. `tokens[row, :ints[NUM_TOKENS, row]]` are the request's
    token ids (prompt, then output: the runner appends what it samples); `block_tables[row, :ints[NUM_BLOCKS,
    row]]` its KV blocks, zero beyond (the padding of a shorter row in a step's table). The sampling kernel's
    inputs: `floats` = temperature, top_p, min_p; `ints[TOP_K]`, `ints[SEED]`; the index of the next sample
    (which keys its seeded noise) is NUM_TOKENS - NUM_PROMPT. SPECIAL marks requests whose sampling needs more
    than the kernel's plain inputs (logit bias, penalties, logprobs): their SamplingParams are in `params`.
    One array per kind, so a step gathers all its requests' values with one index per array. Rows and token
    columns grow as needed."""

    def __init__(self, max_blocks_per_seq: int, num_rows: int = 64, num_token_columns: int = 256) -> None:
        self.block_tables = np.zeros((num_rows, max_blocks_per_seq), np.int32)
        self.tokens = np.zeros((num_rows, num_token_columns), np.int32)
        self.ints = np.zeros((6, num_rows), np.int64)
        self.floats = np.zeros((3, num_rows), np.float32)
        self.params: list[SamplingParams | None] = [None] * num_rows
        self.free = list(range(num_rows - 1, -1, -1))
        self.longest = 0  # at least the longest row's token count: the token columns are widened before it
        self.last_request_ids: tuple[str, ...] = ()  # the last step's, and their rows
        self.last_row_ids = np.zeros(0, np.int64)

    def take(self, new: NewRequest) -> int:
        if not self.free:
            self._add_rows()
        row = self.free.pop()
        tokens = new.prompt_token_ids + new.output_token_ids
        self.longest = max(self.longest, len(tokens))
        self._fit_tokens(self.longest)
        self.tokens[row, : len(tokens)] = tokens
        p = new.sampling_params
        special = bool(p.logit_bias) or p.has_penalties or p.num_logprobs is not None
        self.ints[:, row] = (len(tokens), len(new.prompt_token_ids), 0, p.top_k, new.seed, special)
        self.floats[:, row] = (p.temperature, p.top_p, p.min_p)
        self.params[row] = p
        return row

    def release(self, row: int) -> None:
        self.block_tables[row] = 0
        self.params[row] = None
        self.free.append(row)

    def token_ids(self, row: int) -> list[int]:
        return self.tokens[row, : self.ints[NUM_TOKENS, row]].tolist()

    def block_ids(self, row: int) -> list[int]:
        return self.block_tables[row, : self.ints[NUM_BLOCKS, row]].tolist()

    def add_blocks(self, row_ids: np.ndarray, new_block_ids: tuple[tuple[int, ...], ...]) -> None:
        num_blocks = self.ints[NUM_BLOCKS]
        for row, blocks in zip(row_ids.tolist(), new_block_ids):
            if blocks:
                n = num_blocks[row]
                self.block_tables[row, n : n + len(blocks)] = blocks
                num_blocks[row] = n + len(blocks)

    def append_tokens(self, row_ids: np.ndarray, token_ids: np.ndarray) -> None:
        """One token at the end of each of these (distinct) rows."""
        num_tokens = self.ints[NUM_TOKENS]
        if self.longest >= self.tokens.shape[1]:
            self.longest = int(num_tokens.max())  # released rows' counts too: still a bound
            self._fit_tokens(self.longest + 1)
        self.longest += 1
        at = num_tokens[row_ids]
        self.tokens[row_ids, at] = token_ids
        num_tokens[row_ids] = at + 1

    def _fit_tokens(self, n: int) -> None:
        """Room for n tokens in every row (doubling: a long generation widens it a few times, not per token)."""
        if n > (width := self.tokens.shape[1]):
            grown = np.zeros((len(self.tokens), max(n, 2 * width)), np.int32)
            grown[:, :width] = self.tokens
            self.tokens = grown

    def _add_rows(self) -> None:
        n = len(self.params)
        self.block_tables = np.concatenate([self.block_tables, np.zeros_like(self.block_tables)])
        self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
        self.ints = np.concatenate([self.ints, np.zeros_like(self.ints)], axis=1)
        self.floats = np.concatenate([self.floats, np.zeros_like(self.floats)], axis=1)
        self.params += [None] * n
        self.free = list(range(2 * n - 1, n - 1, -1))


@dataclass
class PackedStep:
    """One step's tokens packed into a single row, in the step's request order: numpy arrays, one entry per
    token (input_ids, positions, slots), per request (seq_lens, query_start_loc, block_tables) or per sampled
    request (sample_rows, sampled_rows, sampled_ids, bans and the sampling arrays)."""

    input_ids: np.ndarray  # int64
    positions: np.ndarray  # int64
    slots: np.ndarray  # int64: the KV cache slot of each token
    seq_lens: np.ndarray  # int32, per request: tokens in the cache after this step
    query_start_loc: np.ndarray  # int32 [requests + 1]
    block_tables: np.ndarray  # int32 [requests, longest row], padded with block 0
    sample_rows: np.ndarray  # int64: packed positions whose logits are sampled
    sampled_rows: np.ndarray  # their requests' rows in Rows
    sampled_ids: tuple[str, ...]  # and ids
    bans: tuple[tuple[int, ...], ...]  # and this step's bans
    # temperature f32, top_k i32, top_p f32, min_p f32, seed i64, number of output tokens i64
    sampling: tuple[np.ndarray, ...]
    bitmask: TokenBitmask | None = None  # the step's, its rows renumbered to sampled rows
    params: list[SamplingParams] | None = None  # of the sampled requests, when one of them is Rows.special
    # Logit edits (rows i64, token ids i64, added values f32: logit_bias, and -inf for bans) and penalties
    # (repetition, presence, frequency f32; prompt and output token ids i64 [sampled, longest], -1 padded).
    logit_edits: tuple[np.ndarray, ...] = ()
    penalties: tuple[np.ndarray, ...] = ()
    sampled_token_ids: np.ndarray | None = None  # what sample_step sampled, row by row (on the rank that samples)

    @property
    def is_decode(self) -> bool:
        """Every request runs one token and samples it."""
        return len(self.input_ids) == len(self.sample_rows) == len(self.seq_lens)

    def sampler_arrays(self) -> list[np.ndarray]:
        """What sample_step takes to the device, in its order."""
        return [*self.sampling, *self.logit_edits, *self.penalties]


def update_states(states: dict[str, RequestState], rows: Rows, step: ScheduledStep) -> None:
    """Drop the freed requests, then take in the new ones (a resumed request replaces nothing: it was freed)."""
    for request_id in step.freed_request_ids:
        state = states.pop(request_id, None)
        if state is not None:
            rows.release(state.row)
    for new in step.new_requests:
        states[new.request_id] = RequestState(new, rows.take(new))


def pack_step(states: dict[str, RequestState], rows: Rows, step: ScheduledStep, block_size: int) -> PackedStep:
    """Apply the step's block deltas and lay out its tokens (states must be updated for the step)."""
    n = step.num_requests
    if step.request_ids == rows.last_request_ids and not step.new_requests:
        row_ids = rows.last_row_ids  # the same requests as the step before (decoding, mostly): their rows too
    else:
        row_ids = np.fromiter(map(_row, map(states.__getitem__, step.request_ids)), np.int64, n)
        rows.last_request_ids, rows.last_row_ids = step.request_ids, row_ids
    if any(step.new_block_ids):
        rows.add_blocks(row_ids, step.new_block_ids)
    ints = rows.ints[:, row_ids]
    if step.num_scheduled_tokens.count(1) == n and all(step.samples):
        # A decode step: each request runs its last token, all from its row (the test checks it is the step's).
        token_rows, ends = row_ids, ints[NUM_TOKENS]
        positions = ends - 1
        query_start_loc = np.arange(n + 1, dtype=np.int32)
    else:
        starts = np.array(step.num_computed_tokens, np.int64)
        counts = np.array(step.num_scheduled_tokens, np.int64)
        ends = starts + counts
        assert (ends <= ints[NUM_TOKENS]).all(), "a step runs tokens the runner does not know"
        query_start_loc = np.zeros(n + 1, np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        token_rows = np.repeat(row_ids, counts)
        positions = np.arange(query_start_loc[-1], dtype=np.int64) - np.repeat(query_start_loc[:-1] - starts, counts)
    table = rows.block_tables
    block, offset = np.divmod(positions, block_size)
    slots = np.multiply(table[token_rows, block], block_size, dtype=np.int64)
    slots += offset
    last = np.subtract(query_start_loc[1:], 1, dtype=np.int64)  # each request's last packed token
    if all(step.samples):
        sample_rows, sampled_rows, sampled, sampled_ids, bans = last, row_ids, ints, step.request_ids, step.banned_token_ids
        sample_index = None
    else:
        samples = np.array(step.samples, bool)
        sample_rows, sampled_rows, sampled = last[samples], row_ids[samples], ints[:, samples]
        sampled_ids = tuple(itertools.compress(step.request_ids, step.samples))
        bans = tuple(itertools.compress(step.banned_token_ids, step.samples))
        sample_index = np.cumsum(samples) - 1  # step index -> sampled row
    floats = rows.floats[:, sampled_rows]
    packed = PackedStep(
        input_ids=rows.tokens[token_rows, positions].astype(np.int64), positions=positions, slots=slots,
        seq_lens=ends.astype(np.int32), query_start_loc=query_start_loc,
        block_tables=table[row_ids, : max(1, int(ints[NUM_BLOCKS].max(initial=0)))],
        sample_rows=sample_rows, sampled_rows=sampled_rows, sampled_ids=sampled_ids, bans=bans,
        sampling=(floats[0], sampled[TOP_K].astype(np.int32), floats[1], floats[2], sampled[SEED],
                  sampled[NUM_TOKENS] - sampled[NUM_PROMPT]),
    )
    if (mask := step.token_bitmask) is not None:
        index = mask.rows if sample_index is None else tuple(sample_index[list(mask.rows)].tolist())
        packed.bitmask = TokenBitmask(index, mask.words)
    if sampled[SPECIAL].any():
        packed.params = list(map(rows.params.__getitem__, sampled_rows.tolist()))
        packed.penalties = _penalties(rows, sampled_rows, packed.params)
    if any(bans) or (packed.params and any(p.logit_bias for p in packed.params)):
        packed.logit_edits = _logit_edits(packed.params or list(map(rows.params.__getitem__, sampled_rows.tolist())), bans)
    return packed


_row = operator.attrgetter("row")


def _logit_edits(params: list[SamplingParams], bans: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...]:
    """Sparse: one scatter of (row, token, value), not a dense [requests, vocab] bias."""
    edits = [(i, token_id, bias) for i, p in enumerate(params) for token_id, bias in p.logit_bias]
    edits += [(i, token_id, float("-inf")) for i, banned in enumerate(bans) for token_id in banned]
    i, t, v = zip(*edits)
    return np.array(i, np.int64), np.array(t, np.int64), np.array(v, np.float32)


def _penalties(rows: Rows, sampled_rows: np.ndarray, params: list[SamplingParams]) -> tuple[np.ndarray, ...]:
    """The penalty inputs, or () when no sampled request has penalties. Requests without them give no tokens
    (their penalties are neutral anyway)."""
    on = np.array([p.has_penalties for p in params], bool)
    if not on.any():
        return ()
    values = np.array([(p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in params], np.float32).T
    prompt, total = rows.ints[NUM_PROMPT, sampled_rows], rows.ints[NUM_TOKENS, sampled_rows]
    num_prompt, num_output = np.where(on, prompt, 0), np.where(on, total - prompt, 0)

    def window(start: np.ndarray, length: np.ndarray) -> np.ndarray:  # tokens[start : start + length] per row, -1 padded
        cols = np.arange(max(1, int(length.max())))
        at = np.minimum(start[:, None] + cols, rows.tokens.shape[1] - 1)
        return np.where(cols < length[:, None], rows.tokens[sampled_rows[:, None], at], -1).astype(np.int64)

    return (values[0], values[1], values[2], window(np.zeros_like(num_prompt), num_prompt),
            window(prompt, num_output))


def step_chunks(states: dict[str, RequestState], step: ScheduledStep) -> list[tuple[RequestState, int, int]]:
    """(request, first position, tokens) of each request of the step, in packing order."""
    return list(zip(map(states.__getitem__, step.request_ids), step.num_computed_tokens, step.num_scheduled_tokens))


def record_samples(packed: PackedStep, rows: Rows, sampled: SampledTokens) -> None:
    """Append each sampled token to its request's tokens: it is the next step's input. (The rank that sampled
    them has them in step order already: packed.sampled_token_ids.)"""
    if ids := packed.sampled_ids:
        token_ids = packed.sampled_token_ids
        if token_ids is None:
            token_ids = np.fromiter(map(sampled.token_ids.__getitem__, ids), np.int32, len(ids))
        rows.append_tokens(packed.sampled_rows, token_ids)
