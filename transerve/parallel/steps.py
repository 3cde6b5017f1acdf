"""The step on every rank. Rank 0 sends each ScheduledStep (engine/step.py) to the other ranks before it
runs the step itself; every rank then runs the forward on its shard, meeting the others in the
all-reduces of the row-parallel linears; only rank 0 computes logits and samples.

A worker's ModelRunner keeps the same per-request state as rank 0's (engine/batch.py), driven by the
same deltas; the one thing it cannot know is what rank 0 sampled, which is the next step's input. So
each message carries, beside the step, the tokens rank 0 sampled in the step before.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from transerve.engine.batch import PackedStep, record_samples
from transerve.engine.host_tensors import arrays_to_device
from transerve.engine.model_runner import ModelRunner
from transerve.engine.step import SampledTokens, ScheduledStep

if TYPE_CHECKING:
    from transerve.parallel.workers import WorkerRanks

log = logging.getLogger(__name__)


class TensorParallelError(RuntimeError):
    """A rank died or a step failed part way: the ranks are out of step for good, so the server stops."""


class TensorParallelRunner:
    """Rank 0's runner: the executor's `execute(step)`, with the other ranks in tow."""

    multimodal = None  # tensor parallelism serves text models

    def __init__(self, runner: ModelRunner, ranks: WorkerRanks) -> None:
        self.runner = runner
        self.ranks = ranks
        self._sampled: Mapping[str, int] = {}  # what the last step sampled: the workers' next input

    @property
    def model(self):
        return self.runner.model

    def execute(self, step: ScheduledStep) -> SampledTokens:
        if self.ranks.failure is not None:
            raise TensorParallelError(self.ranks.failure)
        try:
            # The token bitmask only shapes rank 0's sampling, and is the one large field of a step.
            for_workers = step if step.token_bitmask is None else dataclasses.replace(step, token_bitmask=None)
            self.ranks.send(pickle.dumps((for_workers, self._sampled), protocol=pickle.HIGHEST_PROTOCOL))
            sampled = self.runner.execute(step)
        except TensorParallelError:
            raise
        except Exception as exc:
            # Whichever rank failed, the others may be waiting in a collective this step never reaches.
            if dead := self.ranks.wait_dead_rank():  # a collective fails when its peer dies: name the rank
                self.ranks.fail(dead)
                raise TensorParallelError(dead) from exc
            self.ranks.fail(f"a tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}")
            raise
        self._sampled = sampled.token_ids
        return sampled


def serve_steps(runner: ModelRunner, receive) -> None:
    """A worker's loop: run every step rank 0 sends until it sends None or is gone (`receive` raises EOFError)."""
    decoder = runner.model.get_decoder()
    last: PackedStep | None = None
    while True:
        try:
            message = pickle.loads(receive())
        except EOFError:
            log.info("rank 0 is gone; stopping")
            return
        if message is None:
            return
        step, sampled = message
        last = forward_shard(runner, decoder, step, last, sampled)


@torch.inference_mode()
def forward_shard(runner: ModelRunner, decoder, step: ScheduledStep, last: PackedStep | None,
                  sampled: Mapping[str, int]) -> PackedStep:
    """Run `step` on this rank's shard, up to the hidden states (no LM head: only rank 0 samples).
    `last` and `sampled`: the step before and what rank 0 sampled in it, recorded as rank 0 did."""
    if last is not None and last.sampled_ids:
        record_samples(last, runner.rows, SampledTokens(sampled))
    packed = runner.prepare(step)
    ids, positions, *attention = arrays_to_device([packed.input_ids[None], packed.positions[None],
                                                   *runner.attention_arrays(packed)], runner.device)
    decoder(input_ids=ids, position_ids=positions, use_cache=False, paged_batch=runner.paged_batch(*attention))
    return packed
