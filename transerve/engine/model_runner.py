"""Runs one scheduled step: packs the batch, calls the stock HF model with our paged attention, samples.

The model is called with every scheduled token packed into one row (`input_ids` [1, total_tokens],
explicit `position_ids`). Our attention function (engine/attention.py) receives the step's `PagedBatch`
through the forward's keyword arguments. Only the sampled positions reach the LM head. Between steps the
runner keeps each request's tokens, block table row and sampling parameters (engine/batch.py), so a
step (engine/step.py) carries only what changed.
"""

from __future__ import annotations

import numpy as np
import torch

from transerve.config import EngineConfig
from transerve.engine.attention import PagedBatch
from transerve.engine.batch import PackedStep, RequestState, Rows, pack_step, record_samples, step_chunks, update_states
from transerve.engine.compiled_step import CompiledDecode
from transerve.engine.cuda_graphs import DecodeGraphs
from transerve.engine.host_tensors import arrays_to_device
from transerve.engine.kv_sizing import allocate_kv_caches, kv_cache_dtype, kv_shape
from transerve.engine.multimodal import MultimodalRunner, is_vision_language
from transerve.engine.sampling import sample_step
from transerve.engine.step import SampledTokens, ScheduledStep
from transerve.kernels import kernels_for


class ModelRunner:
    def __init__(self, model, config: EngineConfig, num_kv_blocks: int, max_model_len: int) -> None:
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = config.cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        text_config = model.config.get_text_config()
        num_kv_heads, head_dim = kv_shape(text_config)
        self.kv_dtype = kv_cache_dtype(config, self.dtype, self.device)
        # A VLM's image half; None for text models, whose steps stay exactly as they were.
        self.multimodal = MultimodalRunner(model) if is_vision_language(model.config) else None
        # Compiled CPU decode steps: a compile's dummy step writes one more block than requests get.
        compiles = self.device.type == "cpu" and not config.enforce_eager and self.multimodal is None
        shape = (num_kv_blocks + compiles, self.block_size, num_kv_heads, head_dim)
        self.kv_caches = allocate_kv_caches(text_config.num_hidden_layers, shape, self.kv_dtype, self.device)
        self.write_kv, self.paged_attention, self.sample = kernels_for(self.device)
        self.requests: dict[str, RequestState] = {}  # what the runner keeps between steps
        self.rows = Rows(self.max_blocks_per_seq, config.scheduler.max_num_seqs)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = self._capture_decode_graphs(text_config, num_kv_heads, head_dim)
        elif compiles:  # steps run eagerly until load_saved / compile_buckets (actors/background_compile.py)
            self.graphs = CompiledDecode(model, self.kv_caches, max_num_seqs=config.scheduler.max_num_seqs,
                                         max_blocks_per_seq=self.max_blocks_per_seq, block_size=self.block_size,
                                         scratch_block=num_kv_blocks)

    def _capture_decode_graphs(self, text_config, num_kv_heads: int, head_dim: int):
        """Compile every attention variant, then capture decode steps per batch-size bucket."""
        from transerve.kernels import paged_attention

        paged_attention.precompile(text_config.num_attention_heads, num_kv_heads, head_dim, self.block_size,
                                   self.dtype, self.device, getattr(text_config, "sliding_window", None))
        graphs = DecodeGraphs(self.model, self.kv_caches, self.write_kv, self.paged_attention,
                              max_num_seqs=self.config.scheduler.max_num_seqs,
                              max_blocks_per_seq=self.max_blocks_per_seq, block_size=self.block_size)
        graphs.capture()
        return graphs

    def prepare(self, step: ScheduledStep) -> PackedStep:
        """Apply the step's deltas to the per-request state and pack its inputs (every TP rank does this)."""
        update_states(self.requests, self.rows, step)
        return pack_step(self.requests, self.rows, step, self.block_size)

    @staticmethod
    def attention_arrays(packed: PackedStep) -> list[np.ndarray]:
        """The host arrays `paged_batch` takes, as device tensors, in this order."""
        return [packed.slots, packed.block_tables, packed.seq_lens, packed.query_start_loc]

    def paged_batch(self, slots, block_tables, seq_lens, query_start_loc) -> PagedBatch:
        return PagedBatch(kv_caches=self.kv_caches, slot_mapping=slots, block_tables=block_tables, seq_lens=seq_lens,
                          query_start_loc=query_start_loc, write_kv=self.write_kv, paged_attention=self.paged_attention)

    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> SampledTokens:
        """Run one step; returns the token sampled for every request whose chunk samples (and appends it to
        the request's tokens here), with logprobs for those that asked."""
        packed = self.prepare(step)
        input_ids, positions = packed.input_ids, packed.positions
        mm_inputs = None
        if self.multimodal is not None:  # image embeddings, M-RoPE positions
            positions, mm_inputs = self.multimodal.step_inputs(step_chunks(self.requests, step), input_ids.tolist(), positions, self.device)
        num_seqs = len(packed.seq_lens)
        sampler = packed.sampler_arrays()
        logits = None
        if mm_inputs is None and self.graphs is not None and packed.is_decode and self.graphs.bucket(num_seqs):
            # A pure decode step (None: its compile failed, and it runs eagerly below).
            logits = self.graphs.run(input_ids.tolist(), positions.tolist(), packed.slots.tolist(), packed.block_tables,
                                     packed.seq_lens.tolist())
        if logits is None:
            # Only partial prefill chunks: fill the cache, sample nothing (the LM head still wants a row).
            keep = packed.sample_rows if len(packed.sample_rows) else np.array([len(input_ids) - 1], np.int64)
            # Every input of the step, the sampler's included, in one host-to-device copy.
            model = [input_ids[None], positions[None], keep, *self.attention_arrays(packed)]
            tensors = arrays_to_device(model + sampler, self.device)
            (ids, pos, keep, *attention), sampler = tensors[: len(model)], tensors[len(model) :]
            logits = self.model(**(mm_inputs or {"input_ids": ids, "position_ids": pos}), logits_to_keep=keep,
                                use_cache=False, paged_batch=self.paged_batch(*attention)).logits[0]
        else:
            sampler = arrays_to_device(sampler, self.device)
        if not packed.sampled_ids:
            return SampledTokens()
        # contiguous: the CPU LM head may hand back a transposed view (engine/cpu_linear.py).
        sampled = sample_step(self.sample, logits.float().contiguous(), packed, sampler)
        record_samples(packed, self.rows, sampled)
        return sampled
