"""Quantized CPU linears: the fused C++ kernel computes with exactly the file's weights (its torch reference
is the oracle), and a SmolLM2 built from its GGUF's own blocks answers like the float32-dequantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from transerve.engine import block_kernels, quantized
from transerve.engine.quantize import precision
from transerve.engine.gguf_weights import use_gguf_linears
from transerve.engine.quantized import QuantizedLinear
from transerve.engine.models import bundled_gguf_path

FORMATS = ["Q4_0", "Q4_1", "Q8_0"]


def gguf_rows(fmt: str, weight: np.ndarray) -> np.ndarray:
    """A float weight [out, in] as a GGUF tensor's raw block rows, quantized by the gguf package."""
    return quantize(weight.astype(np.float32), GGMLQuantizationType[fmt])


def assert_fused_equals_reference(linear, weight: torch.Tensor, rows: int, bias=None):
    torch.manual_seed(rows)
    x = torch.randn(1, rows, linear.in_features)  # the model runner's packed [1, tokens, hidden]
    with torch.inference_mode():
        out = linear(x)
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_are_exactly_the_files_blocks(fmt):
    weight = np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32)
    rows = gguf_rows(fmt, weight)
    linear = QuantizedLinear.from_rows(fmt, rows)
    expected = torch.from_numpy(dequantize(rows, GGMLQuantizationType[fmt]))
    assert torch.equal(linear.dequantized_weight(), expected)
    assert linear.fmt == fmt and (linear.in_features, linear.out_features) == (96, 40)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 33])  # row passes of 16, 8, 4, 2 and 1
def test_fused_matmul_equals_dequantize_then_float32(fmt, rows):
    weight = np.random.default_rng(1).standard_normal((200, 96)).astype(np.float32)  # 200: 12 tiles of 16 and one of 8
    blocks = gguf_rows(fmt, weight)
    bias = torch.randn(200)
    linear = QuantizedLinear.from_rows(fmt, blocks, bias=bias.clone())
    reference = torch.from_numpy(dequantize(blocks, GGMLQuantizationType[fmt]))
    assert_fused_equals_reference(linear, reference, rows, bias)


def test_the_cpp_kernels_are_built_here_and_match_their_torch_reference():
    """CI's machine has a compiler and AVX2: the fused kernel is what serves, not the slow reference."""
    assert block_kernels.available()
    weight = np.random.default_rng(2).standard_normal((72, 128)).astype(np.float32)
    for fmt in FORMATS:
        blocks = block_kernels.regroup(torch.from_numpy(gguf_rows(fmt, weight)).view(72, 4, -1), fmt)
        x = torch.randn(5, 128)
        assert torch.equal(block_kernels.block_dequantize(blocks), block_kernels.block_dequantize_ref(blocks))
        expected = block_kernels.block_linear_ref(x, blocks)
        torch.testing.assert_close(block_kernels.block_linear(x, blocks), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


AVX2_CHECK = """
import numpy as np, torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from transerve.engine import block_kernels
assert block_kernels.available()
weight = np.random.default_rng(4).standard_normal((136, 96)).astype(np.float32)
for fmt in ("Q4_0", "Q4_1", "Q8_0"):
    blocks = block_kernels.regroup(torch.from_numpy(quantize(weight, GGMLQuantizationType[fmt])).view(136, 3, -1), fmt)
    for rows in (1, 3, 6, 11):
        x = torch.randn(rows, 96)
        expected = block_kernels.block_linear_ref(x, blocks)
        torch.testing.assert_close(block_kernels.block_linear(x, blocks), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        alone = torch.cat([block_kernels.block_linear(x[i:i + 1], blocks) for i in range(rows)])
        assert torch.equal(block_kernels.block_linear(x, blocks), alone), "a row's result depends on its batch"
print("avx2 build ok")
"""


def test_the_avx2_build_matches_the_reference_on_an_avx512_machine_too():
    """Both builds of the loop are checked wherever the tests run: the AVX-512 one by the tests above (where
    the CPU has it), the AVX2 one here, forced in a fresh process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRANSERVE_CPU_ISA": "avx2"}
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "avx2 build ok" in result.stdout, result.stderr[-2000:]


def test_int8_quantization_of_a_float_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 10), torch.nn.Linear(10, 64))
    reference = [layer.weight.detach().clone() for layer in model]
    assert quantized.use_int8_linears(model) == 2  # 10 inputs is no whole block: that one stays float
    assert [type(m).__name__ for m in model] == ["QuantizedLinear", "QuantizedLinear", "Linear"]
    assert precision(model) == "Q8_0"
    for layer, weight in zip(model[:2], reference):
        step = weight.abs().view(weight.shape[0], -1, 32).amax(-1) / 127  # one int8 step per block
        error = (layer.dequantized_weight() - weight).abs().view_as(step[..., None].expand(-1, -1, 32))
        assert (error <= step[..., None] * 0.57 + 1e-7).all()  # half a step, and the step stored as float16
    x = torch.randn(3, 64)
    with torch.inference_mode():
        out = model[1](model[0](x))
        float_out = F.linear(F.linear(x, reference[0], model[0].bias), reference[1], model[1].bias)
    assert (out - float_out).abs().max() < 0.02 * float_out.abs().max()


@pytest.fixture(scope="module")
def smollm2_gguf():
    return GGUFReader(str(bundled_gguf_path()))


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
@pytest.mark.parametrize("rows", [1, 12])
def test_smollm2_real_tensors(smollm2_gguf, name, rows):
    tensor = next(t for t in smollm2_gguf.tensors if t.name == name)
    raw = np.asarray(tensor.data)[:4096]  # the embedding's first 4096 rows are plenty
    fmt = tensor.tensor_type.name
    linear = QuantizedLinear.from_rows(fmt, raw)
    expected = torch.from_numpy(dequantize(raw, tensor.tensor_type))
    assert torch.equal(linear.dequantized_weight(), expected)
    assert_fused_equals_reference(linear, expected, rows)


@pytest.mark.slow
def test_smollm2_from_its_gguf_blocks_answers_like_the_dequantized_model(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    dequantized = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert use_gguf_linears(model, str(bundled_gguf_path())) == ({"Q4_1": 210, "Q8_0": 1}, {})
    assert precision(model) == "Q4_1+Q8_0"
    # The same weights, Q/K rows in transformers' order included, so the same model.
    for name, module in model.named_modules():
        if isinstance(module, quantized.QuantizedLinear):
            assert torch.equal(module.dequantized_weight(), dequantized.get_submodule(name).weight), name
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        logits, expected_logits = model(**prompt).logits, dequantized(**prompt).logits
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-3 * expected_logits.abs().max().item())
        kwargs = dict(max_new_tokens=20, do_sample=False)
        tokens = model.generate(**prompt, **kwargs)
        expected = dequantized.generate(**prompt, **kwargs)
    assert tokens.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(tokens[0, prompt["input_ids"].shape[1]:])


def test_transposed_inputs_as_skinny_linears_return_them():
    """SkinnyLinear hands on `(W @ x^T)^T` views; a quantized linear after it must read them right."""
    weight = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    blocks = gguf_rows("Q4_1", weight)
    linear = QuantizedLinear.from_rows("Q4_1", blocks)
    x = torch.randn(64, 3).t().unsqueeze(0)  # [1, 3, 64], not contiguous
    with torch.inference_mode():
        out = linear(x)
    expected = F.linear(x, torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1)))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
