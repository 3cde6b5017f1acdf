"""What an engine tells the outside about its state: a frozen, torch-free snapshot the scheduler actor
publishes after each step (as vLLM's SchedulerStats), read by /metrics through the engine's client."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    num_waiting: int = 0  # requests queued, preempted ones included
    num_running: int = 0  # requests in the running batch
    kv_blocks_used: int = 0  # KV cache blocks held by requests
    kv_blocks_free: int = 0  # free KV cache blocks (prefix-cached ones included: they are reused on demand)
    num_preemptions: int = 0  # since start: requests preempted because the KV cache ran out
    num_failed_steps: int = 0  # since start: model steps that raised
