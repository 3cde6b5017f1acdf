"""Runs one scheduled step: packs the batch, calls the stock HF model with our paged attention, samples.

The model is called with every scheduled token packed into one row (`input_ids` [1, total_tokens],
explicit `position_ids`). Our attention function, registered with transformers' AttentionInterface,
receives the step's `PagedBatch` through the forward's keyword arguments: it writes the new K/V into
the paged cache of its layer and attends over the cache. Only the sampled positions reach the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from transerve.config import EngineConfig
from transerve.engine.cpu_linear import use_skinny_linears
from transerve.engine.multimodal import MultimodalRunner, is_vision_language
from transerve.engine.sampling import StepSamples, sample_step
from transerve.kernels import kernels_for

ATTN_IMPLEMENTATION = "transerve_paged"


@dataclass(frozen=True)
class SequenceInput:
    """One request's share of a step, as the executor needs it (no engine state crosses over)."""

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens to run
    start_position: int  # position of token_ids[0]; tokens before it are already in the cache
    block_ids: tuple[int, ...]
    sample: bool  # whether to sample a token from the last position
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    output_index: int  # index of the token to be sampled among the outputs: keys the seeded noise
    # The rest matter only when `sample` is set, and are empty or neutral unless the request asks.
    logit_bias: tuple[tuple[int, float], ...] = ()
    banned_token_ids: tuple[int, ...] = ()  # this step's bans (min_tokens, n-grams, bad words)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_token_ids: tuple[int, ...] = ()  # given only when a penalty is set: penalties count tokens
    output_token_ids: tuple[int, ...] = ()
    num_logprobs: int | None = None
    multimodal: object = None  # the request's MultimodalPrompt (engine/multimodal.py) when it has images


@dataclass
class PagedBatch:
    """What the attention function needs for one step. Built per step, read by every layer."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    write_kv: Callable
    paged_attention: Callable


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, heads, tokens, head_dim] -> [1, tokens, heads, head_dim]."""
    batch: PagedBatch = kwargs["paged_batch"]
    k_cache, v_cache = batch.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)
    batch.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, batch.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = batch.paged_attention(
        q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, kwargs.get("sliding_window")
    )
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make `attn_implementation="transerve_paged"` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    # The paged kernel applies causality itself: skip building dense masks.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(path: str, config: EngineConfig, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    register_attention()
    auto_class, attn = AutoModelForCausalLM, ATTN_IMPLEMENTATION
    if is_vision_language(AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)):
        # Paged attention is for the language model only; the vision tower attends within each image.
        auto_class, attn = AutoModelForImageTextToText, {"text_config": ATTN_IMPLEMENTATION, "vision_config": "sdpa"}
    model = auto_class.from_pretrained(path, dtype=dtype, attn_implementation=attn, trust_remote_code=config.trust_remote_code)
    model = model.to(device).eval()
    # CPU float32 only: decode-sized batches run up to 3x faster, a single decoding sequence ~15% faster
    # when a transposed copy of the weights fits in an eighth of free RAM (and 2 GiB).
    use_skinny_linears(model, min(_available_ram() // 8, TRANSPOSED_COPY_CAP_BYTES))
    return model


TRANSPOSED_COPY_CAP_BYTES = 2 * 1024**3


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
        shape = (num_kv_blocks, self.block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(text_config.num_hidden_layers)
        ]
        self.write_kv, self.paged_attention, self.sample = kernels_for(self.device)
        self.graphs = None
        # A VLM's image half; None for text models, whose steps stay exactly as they were.
        self.multimodal = MultimodalRunner(model) if is_vision_language(model.config) else None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = self._capture_decode_graphs(text_config, num_kv_heads, head_dim)

    def _capture_decode_graphs(self, text_config, num_kv_heads: int, head_dim: int):
        """Compile every attention variant, then capture decode steps per batch-size bucket."""
        from transerve.engine.cuda_graphs import DecodeGraphs
        from transerve.kernels import paged_attention

        paged_attention.precompile(text_config.num_attention_heads, num_kv_heads, head_dim, self.block_size,
                                   self.dtype, self.device, getattr(text_config, "sliding_window", None))
        graphs = DecodeGraphs(self.model, self.kv_caches, self.write_kv, self.paged_attention,
                              max_num_seqs=self.config.scheduler.max_num_seqs,
                              max_blocks_per_seq=self.max_blocks_per_seq, block_size=self.block_size)
        graphs.capture()
        return graphs

    @torch.inference_mode()
    def execute(self, seqs: tuple[SequenceInput, ...]) -> dict[str, int]:
        """Run one step; returns the sampled token of every sequence that asked for one (a StepSamples,
        which also carries the logprobs of the sequences that asked for them)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        keep: list[int] = []
        bs = self.block_size
        for seq in seqs:
            n = len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(seq.start_position, seq.start_position + n))
            slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(seq.start_position, seq.start_position + n))
            seq_lens.append(seq.start_position + n)
            query_start_loc.append(query_start_loc[-1] + n)
            if seq.sample:
                keep.append(query_start_loc[-1] - 1)
        max_blocks = max(len(seq.block_ids) for seq in seqs)
        tables = [list(seq.block_ids) + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        if not keep:  # only partial prefill chunks: fill the cache, sample nothing
            keep = [len(input_ids) - 1]
            sampled_seqs: list[SequenceInput] = []
        else:
            sampled_seqs = [seq for seq in seqs if seq.sample]
        mm_inputs = None
        if self.multimodal is not None:  # image embeddings, M-RoPE positions
            positions, mm_inputs = self.multimodal.step_inputs(seqs, input_ids, positions, self.device)
        if mm_inputs is None and self.graphs is not None and len(input_ids) == len(keep) == len(seqs) and self.graphs.bucket(len(seqs)):
            logits = self.graphs.run(input_ids, positions, slots, tables, seq_lens)  # a pure decode step
        else:
            batch = PagedBatch(
                kv_caches=self.kv_caches,
                slot_mapping=tensor(slots, torch.int64),
                block_tables=tensor(tables, torch.int32),
                seq_lens=tensor(seq_lens, torch.int32),
                query_start_loc=tensor(query_start_loc, torch.int32),
                write_kv=self.write_kv,
                paged_attention=self.paged_attention,
            )
            logits = self.model(
                **(mm_inputs or {"input_ids": tensor([input_ids], torch.int64), "position_ids": tensor([positions], torch.int64)}),
                logits_to_keep=tensor(keep, torch.int64),
                use_cache=False,
                paged_batch=batch,
            ).logits[0]
        if not sampled_seqs:
            return StepSamples()
        # contiguous: the CPU LM head may hand back a transposed view (engine/cpu_linear.py).
        return sample_step(self.sample, logits.float().contiguous(), sampled_seqs)


def kv_shape(text_config) -> tuple[int, int]:
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return num_kv_heads, head_dim


def kv_bytes_per_block(model, block_size: int) -> int:
    text_config = model.config.get_text_config()
    num_kv_heads, head_dim = kv_shape(text_config)
    element_size = next(model.parameters()).element_size()
    return 2 * text_config.num_hidden_layers * block_size * num_kv_heads * head_dim * element_size


def choose_num_kv_blocks(model, config: EngineConfig, max_model_len: int) -> int:
    """--num-kv-blocks if given; else a fraction of free device memory (on CPU, of available RAM,
    capped so an idle server does not reserve the machine), never more than max_num_seqs full contexts."""
    if config.cache.num_kv_blocks is not None:
        return config.cache.num_kv_blocks
    per_block = kv_bytes_per_block(model, config.cache.block_size)
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave (1 - fraction) of the card, plus room for activations, for everything else.
        budget = free - (1.0 - config.cache.memory_fraction) * total - 2 * 1024**3
    else:
        budget = min(_available_ram() * config.cache.memory_fraction * 0.5, CPU_KV_CACHE_CAP_BYTES)
    most_useful = config.scheduler.max_num_seqs * -(-max_model_len // config.cache.block_size)
    num_blocks = min(int(budget // per_block), most_useful)
    if num_blocks < 1:
        raise RuntimeError("no memory left for the KV cache: lower --max-model-len or free device memory")
    return num_blocks


CPU_KV_CACHE_CAP_BYTES = 4 * 1024**3


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3
