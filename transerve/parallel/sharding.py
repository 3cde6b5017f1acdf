"""One rank's shard of a stock transformers decoder, cut in place after loading.

Which linears are split, and how, comes from the model's own tensor-parallel plan (its config's
`base_model_tp_plan`, e.g. Llama's: q/k/v/gate/up "colwise", o/down "rowwise"); the cutting is ours,
plain tensors instead of transformers' DTensor layers, so the model stays a stock model that our paged
attention runs. A colwise linear keeps its rank's rows of the weight (its heads of q/k/v, its part of
the MLP); a rowwise one keeps the matching input columns and sums its partial outputs over the ranks
with one all-reduce. The attention function then simply sees num_heads / N query heads and
num_kv_heads / N KV heads, and the rank's config says so, so the KV cache holds only the rank's heads.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from transerve.engine.cpu_linear import SkinnyLinear
from transerve.engine.kv_sizing import kv_shape

COLWISE, ROWWISE = "colwise", "rowwise"
# Per-head norms (Qwen3's q_norm/k_norm) act on head_dim: every rank keeps them whole.
REPLICATED = {"replicated_with_grad_allreduce"}


def check_shardable(text_config, world_size: int) -> None:
    """Raise ValueError, before any rank starts, when the model cannot be cut `world_size` ways."""
    plan = getattr(text_config, "base_model_tp_plan", None) or {}
    model_type = getattr(text_config, "model_type", "this model")
    if not plan:
        raise ValueError(f"{model_type} has no tensor-parallel plan in transformers (base_model_tp_plan); "
                         "serve it with --tensor-parallel-size 1")
    unsupported = sorted({style for style in plan.values() if style not in (COLWISE, ROWWISE, *REPLICATED)})
    if unsupported:
        raise ValueError(f"{model_type}'s tensor-parallel plan uses {', '.join(unsupported)}, which transerve does "
                         "not shard yet; serve it with --tensor-parallel-size 1")
    num_kv_heads, _ = kv_shape(text_config)
    sizes = {"attention heads": text_config.num_attention_heads, "KV heads": num_kv_heads,
             "MLP width (intermediate_size)": getattr(text_config, "intermediate_size", world_size)}
    for what, size in sizes.items():
        if size % world_size:
            fits = [n for n in range(1, min(sizes.values()) + 1) if all(s % n == 0 for s in sizes.values())]
            raise ValueError(f"--tensor-parallel-size {world_size} does not divide the model's {size} {what}; "
                             f"sizes that divide heads, KV heads and MLP width: {', '.join(map(str, fits))}")


def shard_model(model: torch.nn.Module, rank: int, world_size: int) -> int:
    """Cut `model` (a CausalLM whose weights are all loaded) down to rank `rank`'s shard, in place, and
    make its config describe the shard's heads. Returns how many linears were cut."""
    text_config = model.config.get_text_config()
    check_shardable(text_config, world_size)
    rules = [(re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$"), style)
             for pattern, style in text_config.base_model_tp_plan.items() if style in (COLWISE, ROWWISE)]
    cut = 0
    for name, module in model.base_model.named_modules():
        style = next((style for pattern, style in rules if pattern.match(name)), None)
        if style is None:
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}; tensor parallelism cuts plain linear weights only")
        _cut_linear(module, rank, world_size, dim=0 if style == COLWISE else 1)
        if style == ROWWISE:
            module.register_forward_hook(_sum_over_ranks)
        cut += 1
    num_kv_heads, head_dim = kv_shape(text_config)
    # head_dim first: some configs derive it from hidden_size / num_attention_heads.
    text_config.head_dim = head_dim
    text_config.num_attention_heads //= world_size
    text_config.num_key_value_heads = num_kv_heads // world_size
    return cut


def _cut_linear(linear: torch.nn.Linear, rank: int, world_size: int, dim: int) -> None:
    size = linear.weight.shape[dim] // world_size
    weight = linear.weight.detach().narrow(dim, rank * size, size).contiguous()
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if dim == 0:
        linear.out_features = size
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.detach().narrow(0, rank * size, size).contiguous(), requires_grad=False)
    else:
        linear.in_features = size
        if linear.bias is not None and rank != 0:  # added once, by rank 0, before the sum
            linear.bias = None
    if isinstance(linear, SkinnyLinear) and linear.weight_t is not None:  # the one-row copy follows the cut
        linear.weight_t = weight.t().contiguous()


def _sum_over_ranks(module, args, output: torch.Tensor) -> torch.Tensor:
    # contiguous: the CPU linears return a transposed view (engine/cpu_linear.py); collectives want dense memory.
    output = output.contiguous()
    dist.all_reduce(output)
    return output
