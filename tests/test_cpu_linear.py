"""SkinnyLinear: the CPU decode-batch linear must give nn.Linear's answer for every shape it meets."""

from __future__ import annotations

import pytest
import torch

from transerve.engine.cpu_linear import SkinnyLinear, use_skinny_linears


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 128, 129, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_nn_linear(rows, bias):
    torch.manual_seed(rows)
    reference = torch.nn.Linear(96, 40, bias=bias)
    skinny = torch.nn.Linear(96, 40, bias=bias)
    skinny.load_state_dict(reference.state_dict())
    assert use_skinny_linears(skinny) == 1 and isinstance(skinny, SkinnyLinear)
    x = torch.randn(1, rows, 96)  # the model runner's packed [1, tokens, hidden]
    out = skinny(x)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    # Callers split heads with .view, as transformers' attention does with q/k/v projections.
    assert out.view(1, rows, 4, 10).shape == (1, rows, 4, 10)


def test_only_plain_float32_linears_are_switched():
    class Special(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Special(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    assert use_skinny_linears(model) == 1
    assert [type(m).__name__ for m in model] == ["SkinnyLinear", "Special", "Linear"]
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"}
