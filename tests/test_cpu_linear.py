"""SkinnyLinear: the CPU decode-batch linear must give nn.Linear's answer for every shape it meets."""

from __future__ import annotations

import pytest
import torch

from transerve.engine.cpu_linear import SkinnyLinear, transposed_copy_bytes, use_skinny_linears


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 128, 129, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("budget", [0, 2**20], ids=["no-copy", "transposed-copy"])
def test_skinny_linear_equals_nn_linear(rows, bias, budget):
    torch.manual_seed(rows)
    reference = torch.nn.Linear(96, 40, bias=bias)
    skinny = torch.nn.Linear(96, 40, bias=bias)
    skinny.load_state_dict(reference.state_dict())
    assert use_skinny_linears(skinny, budget) == 1 and isinstance(skinny, SkinnyLinear)
    assert transposed_copy_bytes(skinny) == (96 * 40 * 4 if budget else 0)
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


def test_transposed_copies_only_within_budget_and_tied_weights_once():
    """The one-row copy doubles the linears' memory: all or nothing within the budget, one per weight."""
    def build():
        first, second = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
        second.weight = first.weight  # tied, as an LM head with its embedding
        return torch.nn.Sequential(first, second, torch.nn.Linear(32, 8))

    needed = (16 * 32 + 32 * 8) * 4
    over = build()
    assert use_skinny_linears(over, needed - 1) == 3 and transposed_copy_bytes(over) == 0
    model = build()
    assert use_skinny_linears(model, needed) == 3
    assert transposed_copy_bytes(model) == needed and model[0].weight_t is model[1].weight_t
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(model[0](x), x @ model[0].weight.t())
