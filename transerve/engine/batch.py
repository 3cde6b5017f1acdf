"""The model runner's side of the step contract (engine/step.py): what it keeps of each request between
steps, and one step packed from that into the flat lists the model call is built from. Torch-free.

What every step needs of every request (its block table row, sampling parameters, output count) lives in
one row of a few arrays (`Rows`), updated by the step's deltas, so a step gathers its batch with one
index per array instead of rebuilding nested lists in Python."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transerve.engine.request import SamplingParams
from transerve.engine.step import NewRequest, SampledTokens, ScheduledStep, TokenBitmask


class RequestState:
    """A request as the runner knows it, from its NewRequest until its id is freed."""

    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "block_ids", "params", "seed", "multimodal", "row")

    def __init__(self, new: NewRequest, row: int) -> None:
        self.row = row  # its row in Rows
        self.request_id = new.request_id
        self.token_ids: list[int] = [*new.prompt_token_ids, *new.output_token_ids]  # the runner appends its samples
        self.num_prompt_tokens = len(new.prompt_token_ids)
        self.block_ids: list[int] = []  # the block table row
        self.params: SamplingParams = new.sampling_params
        self.seed = new.seed
        self.multimodal: Any = new.multimodal

    @property
    def num_output_tokens(self) -> int:
        """Also the index of the next token sampled: it keys the request's seeded noise."""
        return len(self.token_ids) - self.num_prompt_tokens


class Rows:
    """Per-request arrays indexed by RequestState.row: the block table (zero-padded), and the sampling
    kernel's per-request inputs: `floats` = temperature, top_p, min_p; `ints` = top_k, seed, number of
    output tokens (the index of the next sample, which keys its seeded noise). Grows as needed."""

    def __init__(self, max_blocks_per_seq: int, num_rows: int = 64) -> None:
        self.block_tables = np.zeros((num_rows, max_blocks_per_seq), np.int32)
        self.floats = np.zeros((3, num_rows), np.float32)
        self.ints = np.zeros((3, num_rows), np.int64)
        self.free = list(range(num_rows - 1, -1, -1))

    def take(self, new: NewRequest) -> int:
        if not self.free:
            n = len(self.ints[0])
            self.block_tables = np.concatenate([self.block_tables, np.zeros_like(self.block_tables)])
            self.floats = np.concatenate([self.floats, np.zeros_like(self.floats)], axis=1)
            self.ints = np.concatenate([self.ints, np.zeros_like(self.ints)], axis=1)
            self.free = list(range(2 * n - 1, n - 1, -1))
        row = self.free.pop()
        p = new.sampling_params
        self.floats[:, row] = (p.temperature, p.top_p, p.min_p)
        self.ints[:, row] = (p.top_k, new.seed, len(new.output_token_ids))
        return row

    def release(self, row: int) -> None:
        self.block_tables[row] = 0  # the padding of a shorter row in a step's table
        self.free.append(row)


@dataclass
class PackedStep:
    """One step's tokens packed into a single row, in the step's request order."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV cache slot of each token
    seq_lens: list[int] = field(default_factory=list)  # per request: tokens in the cache after this step
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    block_tables: Any = None  # numpy int32 [requests, longest row], padded with block 0
    sample_rows: list[int] = field(default_factory=list)  # packed positions whose logits are sampled
    sampled: list[RequestState] = field(default_factory=list)  # the requests those rows sample for
    bans: list[tuple[int, ...]] = field(default_factory=list)  # and their bans, row by row
    bitmask: TokenBitmask | None = None  # the step's, its rows renumbered to sampled rows
    # numpy, one entry per sampled row: temperature, top_k, top_p, min_p, seed, number of output tokens
    sampling: tuple = ()
    chunks: list[tuple[RequestState, int, int]] = field(default_factory=list)  # (request, start, tokens)


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
    # A decode step of a few requests is cheaper request by request: numpy's fixed cost per call dominates.
    if step.num_requests >= DECODE_ARRAYS_FROM and step.num_scheduled_tokens.count(1) == step.num_requests and all(step.samples):
        packed, sample_row_ids = _pack_decodes(states, rows, step, block_size)
        sample_index = range(step.num_requests)
    else:
        packed, sample_row_ids, sample_index = _pack_any(states, rows, step, block_size)
    if len(sample_row_ids):
        floats, ints = rows.floats[:, sample_row_ids], rows.ints[:, sample_row_ids]
        packed.sampling = (floats[0], ints[0].astype(np.int32), floats[1], floats[2], ints[1], ints[2])
    if (mask := step.token_bitmask) is not None:
        packed.bitmask = TokenBitmask(tuple(sample_index[i] for i in mask.rows), mask.words)
    return packed


def _pack_decodes(states: dict[str, RequestState], rows: Rows, step: ScheduledStep, bs: int) -> tuple[PackedStep, list[int]]:
    """A decode step (every request runs one token and samples it): pack_step's layout, array by array."""
    # map() over C getters: these run once per request per step.
    sampled = list(map(states.__getitem__, step.request_ids))
    table = rows.block_tables
    if any(step.new_block_ids):
        for state, new_blocks in zip(sampled, step.new_block_ids):
            if new_blocks:
                blocks = state.block_ids
                table[state.row, len(blocks) : len(blocks) + len(new_blocks)] = new_blocks
                blocks.extend(new_blocks)
    positions = list(step.num_computed_tokens)
    n = len(positions)
    row_ids = np.array(list(map(_row, sampled)))
    block_tables = table[row_ids, : max(positions) // bs + 1]  # a decode holds just the blocks up to its position
    at = np.array(positions)
    slots = block_tables[np.arange(n), at // bs].astype(np.int64) * bs + at % bs
    packed = PackedStep(
        input_ids=list(map(operator.getitem, map(_token_ids, sampled), positions)), positions=positions,
        slots=slots.tolist(), seq_lens=(at + 1).tolist(), query_start_loc=list(range(n + 1)),
        block_tables=block_tables, sample_rows=list(range(n)), sampled=sampled, bans=list(step.banned_token_ids),
        chunks=list(zip(sampled, positions, itertools.repeat(1))),
    )
    return packed, row_ids


DECODE_ARRAYS_FROM = 16  # requests
_row, _token_ids = operator.attrgetter("row"), operator.attrgetter("token_ids")


def _pack_any(states: dict[str, RequestState], rows: Rows, step: ScheduledStep, block_size: int):
    """Any step: prefill chunks and decodes, sampling or not, request by request."""
    packed = PackedStep()
    input_ids, positions, slots, seq_lens = packed.input_ids, packed.positions, packed.slots, packed.seq_lens
    query_start_loc = packed.query_start_loc
    row_ids, sample_row_ids = [], []
    width = 1
    table = rows.block_tables
    sample_index = {}  # step index -> sampled row
    bs = block_size
    for i, (request_id, start, n, new_blocks, sample, bans) in enumerate(zip(
        step.request_ids, step.num_computed_tokens, step.num_scheduled_tokens, step.new_block_ids, step.samples,
        step.banned_token_ids,
    )):
        state = states[request_id]
        blocks = state.block_ids
        if new_blocks:
            table[state.row, len(blocks) : len(blocks) + len(new_blocks)] = new_blocks
            blocks.extend(new_blocks)
        if len(blocks) > width:
            width = len(blocks)
        end = start + n
        assert end <= len(state.token_ids), f"request {request_id}: {end} tokens scheduled, {len(state.token_ids)} known"
        if n == 1:  # a decode: the common case, without the ranges
            input_ids.append(state.token_ids[start])
            positions.append(start)
            slots.append(blocks[start // bs] * bs + start % bs)
        else:
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
        seq_lens.append(end)
        query_start_loc.append(query_start_loc[-1] + n)
        row_ids.append(state.row)
        packed.chunks.append((state, start, n))
        if sample:
            sample_index[i] = len(packed.sampled)
            packed.sample_rows.append(query_start_loc[-1] - 1)
            packed.sampled.append(state)
            packed.bans.append(bans)
            sample_row_ids.append(state.row)
    packed.block_tables = table[row_ids, :width]
    return packed, sample_row_ids, sample_index


def record_samples(packed: PackedStep, rows: Rows, sampled: SampledTokens) -> None:
    """Append each sampled token to its request's tokens: it is the next step's input."""
    token_ids = sampled.token_ids
    for state in packed.sampled:
        state.token_ids.append(token_ids[state.request_id])
    rows.ints[2, list(map(_row, packed.sampled))] += 1
