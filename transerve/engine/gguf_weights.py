"""A GGUF's quantized linear weights, kept quantized: the model's linears rebuilt from the file's blocks.

The float model is loaded as today (dequantized by transformers); then each linear whose GGUF tensor is
Q4_0, Q4_1 or Q8_0 is replaced by a QuantizedLinear holding that tensor's own bytes. Names come from
gguf's tensor name map (what transformers uses); the Q/K row permutation transformers applies to llama q_proj/k_proj
weights is applied to the block rows (blocks run along the input, so permuting rows keeps them whole).
Tensors of other types, and architectures whose conversion does more than permute rows, stay float.
"""

from __future__ import annotations

import numpy as np
import torch

from transerve.engine.block_kernels import BLOCK, FILE_BLOCK_BYTES as _BLOCK_BYTES
from transerve.engine.quantized import QuantizedLinear


def use_gguf_linears(model: torch.nn.Module, gguf_path: str) -> tuple[dict[str, int], dict[str, int]]:
    """Replace the linears of `model` (loaded from this GGUF) by QuantizedLinears over the file's blocks.
    Returns how many linears of each format were replaced, and how many of each other type stay float."""
    from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor

    reader = GGUFReader(gguf_path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    arch_id = next((key for key, name in MODEL_ARCH_NAMES.items() if name == arch), None)
    if processor not in (TensorProcessor, LlamaTensorProcessor) or arch_id is None:
        return {}, {}  # its conversion reshapes or splits tensors: keep the float weights
    config = model.config.get_text_config()
    # gguf's own HF -> GGUF name map (transformers' get_gguf_hf_weights_map rebuilds it per module: slow)
    gguf_names = get_tensor_name_map(arch_id, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    if "output.weight" not in tensors and getattr(config, "tie_word_embeddings", False) and "token_embd.weight" in tensors:
        tensors["output.weight"] = tensors["token_embd.weight"]  # the LM head reads the embedding's blocks
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    for module_name, module in linears:
        gguf_name = gguf_names.get_name(module_name)
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None:
            continue
        if tensor.tensor_type.name not in _BLOCK_BYTES:
            if tensor.tensor_type.name not in ("F32", "F16", "BF16"):
                skipped[tensor.tensor_type.name] = skipped.get(tensor.tensor_type.name, 0) + 1
            continue
        rows = np.asarray(tensor.data)
        if rows.shape[0] != module.out_features or rows.shape[1] * BLOCK != module.in_features * _BLOCK_BYTES[tensor.tensor_type.name]:
            continue
        if processor is LlamaTensorProcessor and gguf_name.endswith((".attn_q", ".attn_k")):
            heads = config.num_attention_heads if gguf_name.endswith(".attn_q") else config.num_key_value_heads
            rows = LlamaTensorProcessor()._reverse_permute_weights(rows, heads, heads)
        bias = None if module.bias is None else module.bias.detach().float()
        model.set_submodule(module_name, QuantizedLinear.from_rows(tensor.tensor_type.name, rows, bias))
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts, skipped
