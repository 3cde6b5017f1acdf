"""The model runner's side of the step contract (engine/step.py): what it keeps of each request between
steps, and one step packed from that into the flat lists the model call is built from. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transerve.engine.request import SamplingParams
from transerve.engine.step import NewRequest, SampledTokens, ScheduledStep, TokenBitmask


class RequestState:
    """A request as the runner knows it, from its NewRequest until its id is freed."""

    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "block_ids", "params", "seed", "multimodal")

    def __init__(self, new: NewRequest) -> None:
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


@dataclass
class PackedStep:
    """One step's tokens packed into a single row, in the step's request order."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV cache slot of each token
    seq_lens: list[int] = field(default_factory=list)  # per request: tokens in the cache after this step
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    block_tables: list[list[int]] = field(default_factory=list)  # padded to the longest row with block 0
    sample_rows: list[int] = field(default_factory=list)  # packed positions whose logits are sampled
    sampled: list[RequestState] = field(default_factory=list)  # the requests those rows sample for
    bans: list[tuple[int, ...]] = field(default_factory=list)  # and their bans, row by row
    bitmask: TokenBitmask | None = None  # the step's, its rows renumbered to sampled rows
    chunks: list[tuple[RequestState, int, int]] = field(default_factory=list)  # (request, start, tokens)


def update_states(states: dict[str, RequestState], step: ScheduledStep) -> None:
    """Drop the freed requests, then take in the new ones (a resumed request replaces nothing: it was freed)."""
    for request_id in step.freed_request_ids:
        states.pop(request_id, None)
    for new in step.new_requests:
        states[new.request_id] = RequestState(new)


def pack_step(states: dict[str, RequestState], step: ScheduledStep, block_size: int) -> PackedStep:
    """Apply the step's block deltas and lay out its tokens (states must be updated for the step)."""
    packed = PackedStep()
    input_ids, positions, slots, seq_lens = packed.input_ids, packed.positions, packed.slots, packed.seq_lens
    query_start_loc = packed.query_start_loc
    rows = []
    sample_index = {}  # step index -> sampled row
    bs = block_size
    for i, (request_id, start, n, new_blocks, sample, bans) in enumerate(zip(
        step.request_ids, step.num_computed_tokens, step.num_scheduled_tokens, step.new_block_ids, step.samples,
        step.banned_token_ids,
    )):
        state = states[request_id]
        blocks = state.block_ids
        if new_blocks:
            blocks.extend(new_blocks)
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
        rows.append(blocks)
        packed.chunks.append((state, start, n))
        if sample:
            sample_index[i] = len(packed.sampled)
            packed.sample_rows.append(query_start_loc[-1] - 1)
            packed.sampled.append(state)
            packed.bans.append(bans)
    width = max(len(row) for row in rows)
    packed.block_tables = [row if len(row) == width else row + [0] * (width - len(row)) for row in rows]
    if (mask := step.token_bitmask) is not None:
        packed.bitmask = TokenBitmask(tuple(sample_index[i] for i in mask.rows), mask.words)
    return packed


def record_samples(packed: PackedStep, sampled: SampledTokens) -> None:
    """Append each sampled token to its request's tokens: it is the next step's input."""
    for state in packed.sampled:
        state.token_ids.append(sampled.token_ids[state.request_id])
