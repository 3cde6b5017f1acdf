"""Quantized weights as served (engine/quantize.py): `--quantization int8` on a float model, a GGUF kept
quantized, the compiled decode step over quantized linears, and CUDA refusing a CPU-only feature."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from test_compiled_step import LENGTHS, run
from test_compiled_step import engine as compiled_step_engine
from test_engine import random_prompts
from transerve.actors.assembly import load
from transerve.engine.quantize import quantize_model
from transerve.engine.quantized import QuantizedLinear


def engine(quantization: str, compiled: bool = False, spec: str = "tiny/llama", num_kv_blocks: int = 64):
    return compiled_step_engine(compiled, num_kv_blocks, quantization, spec)


def linears(model) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, QuantizedLinear)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return kinds


def test_int8_of_a_float_model_gives_close_logits_and_mostly_the_same_greedy_tokens(tiny_repos):
    plain, int8 = engine("none"), engine("int8")
    assert plain.precision == "float32" and int8.precision == "Q8_0"
    assert linears(int8.runner.model) == {"QuantizedLinear": 2 * 7 + 1}  # every linear, the LM head too
    torch.manual_seed(5)
    hidden = torch.randn(1, 40, plain.runner.model.config.hidden_size)
    with torch.inference_mode():
        for part in ("model.layers.0.mlp", "model.layers.1.mlp", "lm_head"):
            expected = plain.runner.model.get_submodule(part)(hidden)
            got = int8.runner.model.get_submodule(part)(hidden)
            torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    prompts = random_prompts(plain.runner.model.config.vocab_size, LENGTHS, seed=6)
    a, b = run(plain, prompts, 16), run(int8, prompts, 16)
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    assert same >= 0.75 * sum(len(p) for p in a), (a, b)


def test_compiled_decode_over_quantized_weights_gives_the_eager_quantized_tokens(tiny_repos):
    eager, compiled = engine("int8"), engine("int8", compiled=True)
    compiled.runner.graphs.compile_buckets()
    prompts = random_prompts(eager.runner.model.config.vocab_size, LENGTHS[:4], seed=7)
    assert run(compiled, prompts[:1]) == run(eager, prompts[:1])
    assert run(compiled, prompts, 24) == run(eager, prompts, 24)
    assert set(compiled.runner.graphs.steps) == {8} and compiled.runner.graphs.steps_run > 0 and not compiled.runner.graphs.failed


def test_a_tokens_result_depends_on_the_rest_of_the_batch_only_by_rounding():
    """A row alone or in a batch (passes of 16, 8, 4, 2 and 1 rows: the same bits in each), or in a long prompt
    chunk, gives the float32 product with the file's weights."""
    torch.manual_seed(0)
    linear = QuantizedLinear.from_rows("Q4_1", quantize(torch.randn(96, 64).numpy(), GGMLQuantizationType.Q4_1), torch.randn(96))
    x = torch.randn(15, 64)  # passes of 8, 4, 2 and 1 (with 16 more rows: 16, 8, 4, 2, 1)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i:i + 1]) for i in range(15)])
        for rows in (2, 4, 7, 15):
            assert torch.equal(linear(x[:rows]), alone[:rows]), rows
        assert torch.equal(linear(torch.cat([x, x[:1].expand(16, -1)])), torch.cat([alone, alone[:1].expand(16, -1)]))
        expected = torch.nn.functional.linear(x, linear.dequantized_weight(), linear.bias)
        tolerance = dict(rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        torch.testing.assert_close(alone, expected, **tolerance)
        torch.testing.assert_close(linear(x), expected, **tolerance)


def test_int8_is_refused_on_cuda_with_a_clear_error(tiny_repos):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="CPU feature"):
        quantize_model(model, "int8", "/nonexistent", torch.device("cuda"), torch.float32)
    assert type(model[0]) is torch.nn.Linear


def test_quantization_none_keeps_float_weights_of_a_float_model(tiny_repos):
    assert engine("gguf").precision == "float32"


@pytest.mark.slow
def test_a_served_gguf_keeps_its_weights_quantized(smollm2_dir):
    """SmolLM2's GGUF (Q4_1, Q8_0 embedding) as the server loads it: every linear, the tied LM head too,
    holds the file's own blocks, as many bytes as the file (5 or 8.5 bits a weight); the float32 left is the embedding table and the norms."""
    loaded = engine("gguf", spec="SmolLM2-135M-Instruct", num_kv_blocks=16)
    model = loaded.runner.model
    assert linears(model) == {"QuantizedLinear": 30 * 7 + 1}
    assert loaded.precision == "Q4_1+Q8_0"
    packed = sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 96e6 < packed < 97e6  # 106M Q4_1 weights at 20 bytes a block of 32, the 28M-weight Q8_0 LM head at 34: the file's 96.4 MB
    assert float_bytes < 115e6  # the 49152x576 embedding (113 MB) and the norms; float32 linears were 538 MB
