"""Frozen configuration, built once from CLI flags and checked on construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Exactly this many KV blocks when set; otherwise sized from `memory_fraction` of free memory.
    num_kv_blocks: int | None = None
    memory_fraction: float = 0.9
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto (the weights' dtype) | float32 | float16 | bfloat16; other than auto: CPU only

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, float16 or bfloat16, got {self.kv_cache_dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


# max_num_seqs and max_num_batched_tokens by device type, where the flags leave them unset (None). A GPU
# step costs little more at 256 sequences or 8192 tokens than at 64 or 1024 (vLLM batches thousands of
# tokens per step on an H100); the CUDA-graph batch sizes follow max_num_seqs (engine/cuda_graphs.py).
SCHEDULER_DEFAULTS = {"cpu": (64, 1024), "cuda": (256, 8192)}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # None (from the CLI): SCHEDULER_DEFAULTS for the device, see `for_device`
    # Tokens per step across all requests: long prompts are prefilled in chunks of at most this.
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # None: the model's own context length
    # Accepted requests not yet in the running batch; past this an engine answers 429 at once, since a
    # client is better served retrying later (or elsewhere) than by waiting in an unbounded queue.
    max_queued_requests: int = 512
    # Schedule step N+1 while step N runs, so the model never waits on the host (engine/scheduler.py).
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be at least 0, got {self.max_queued_requests}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with what is unset filled in for the device type ("cpu", "cuda")."""
        seqs, tokens = SCHEDULER_DEFAULTS.get(device_type, SCHEDULER_DEFAULTS["cpu"])
        return dataclasses.replace(self, max_num_seqs=self.max_num_seqs or seqs,
                                   max_num_batched_tokens=self.max_num_batched_tokens or tokens)


# The sampling a server may set as its default (--override-generation-config), with each value's range.
# They are the keys of a model's generation defaults (engine/models.py: generation_defaults).
# --quantization (engine/quantize.py): auto keeps a GGUF's own quantized weights on CPU where the kernels
# are built, else float; none: float; gguf: a GGUF's weights quantized (asked for: a log line if it cannot);
# int8: a float model's linears too (Q8_0 blocks, weight-only; CPU only).
QUANTIZATION_MODES = ("auto", "none", "gguf", "int8")
SAMPLING_DEFAULT_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (0, 2**31), "min_p": (0.0, 1.0)}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    trust_remote_code: bool = False
    # On CUDA, no decode CUDA graphs; on CPU, no compiled decode steps (engine/compiled_step.py: a server
    # compiles them in the background, minutes cold on a small CPU, cached on disk after).
    enforce_eager: bool = False
    # Ranks that each hold 1/N of the weights and KV heads (transerve/parallel/); 1: one device, no workers.
    tensor_parallel_size: int = 1
    # Weights the linears compute with: one of QUANTIZATION_MODES.
    quantization: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Sampling defaults for every model, over each model's own generation_config: (name, value) pairs.
    override_generation_config: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name, value in self.override_generation_config:
            if name not in SAMPLING_DEFAULT_RANGES:
                raise ValueError(f"override_generation_config: {name!r} is not a sampling default transerve "
                                 f"understands (one of {', '.join(SAMPLING_DEFAULT_RANGES)})")
            lo, hi = SAMPLING_DEFAULT_RANGES[name]
            kinds = (int,) if name == "top_k" else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
                kind = "an integer" if name == "top_k" else "a number"
                raise ValueError(f"override_generation_config: {name} must be {kind} between {lo} and {hi}, got {value!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {self.quantization!r}")
        if self.quantization == "int8" and self.tensor_parallel_size > 1:
            raise ValueError("--quantization int8 does not combine with --tensor-parallel-size (shards are float)")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "localhost"
    port: int = 8000
    model: str | None = None  # served for every request when set (--force-model)
    preload: tuple[str, ...] = ()  # loaded at start when no model is forced
    log_level: str = "info"
    mailbox_size: int = 1024  # bound of every actor mailbox
    # Unload a model idle this long (seconds); None: never. The pinned model (--force-model) stays.
    model_timeout_s: float | None = 300.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>`
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from; "*" for any; () for none
    max_request_bytes: int = 64 * 1024 * 1024  # larger bodies get a 413 before they are read whole
    shutdown_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    playground: bool = True  # the web playground at GET /

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        for origin in self.allowed_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"allowed origin {origin!r} must be '*' or scheme://host[:port] with no path")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be at least 0, got {self.shutdown_timeout_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be debug, info, warning, error or critical, got {self.log_level!r}")
        if self.mailbox_size < 1:
            raise ValueError(f"mailbox_size must be positive, got {self.mailbox_size}")
