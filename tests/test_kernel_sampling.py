"""The Triton sampler against `sample_ref`: the same token ids, exactly, for greedy and seeded draws."""

from __future__ import annotations

import inspect

import pytest
import torch

from kernel_utils import DEVICE, GPU, import_kernels
from transerve.kernels.reference import SampleOutput, sample_ref, uniform_noise_ref

K = import_kernels()
VOCAB = 151_936 if GPU else 1000
ROWS = 64 if GPU else 8


@pytest.fixture(autouse=True)
def _seed_and_interpreter(monkeypatch):
    torch.manual_seed(0)
    if not GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _params(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    def full(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(device=DEVICE, dtype=dtype)
        return torch.full((n,), value, dtype=dtype, device=DEVICE)

    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(min_p, torch.float32), torch.randint(-2**62, 2**62, (n,), device=DEVICE),
            torch.randint(0, 5000, (n,), device=DEVICE))


def _logits(n, vocab=VOCAB, scale=3.0):
    return torch.randn(n, vocab, device=DEVICE) * scale


def _both(logits, params, **kwargs):
    return K.sampling.sample(logits, *params, **kwargs), sample_ref(logits, *params, **kwargs)


def test_same_signature_as_reference():
    assert inspect.signature(K.sampling.sample).parameters.keys() == inspect.signature(sample_ref).parameters.keys()


def test_greedy_exact_with_ties():
    logits = _logits(ROWS).bfloat16().float()  # bf16 logits: ties at the maximum are common
    logits[0, 5] = logits[0, 900] = logits[0].max() + 1  # first index wins, as in torch.argmax
    logits[1, -1] = 100.0  # the very last token
    got, want = _both(logits, _params(ROWS, temperature=0.0))
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
    assert got[0] == 5 and got[1] == VOCAB - 1


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 50, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.8, 0, 1.0, 0.1),
    (1.0, 20, 0.8, 0.02), (1.0, 1, 1.0, 0.0), (2.0, 0, 0.05, 0.0),
])
def test_seeded_sampling_exact(temperature, top_k, top_p, min_p):
    logits = _logits(ROWS)
    for trial in range(2 if GPU else 1):
        params = _params(ROWS, temperature, top_k, top_p, min_p)
        got, want = _both(logits, params)
        assert got.tolist() == want.tolist(), (trial, got.tolist(), want.tolist())


def test_each_row_has_its_own_parameters_and_greedy_rows_mix_in():
    n = ROWS
    temperature = torch.rand(n) * 1.5
    temperature[::3] = 0.0
    top_k = torch.randint(0, 40, (n,))
    top_p = torch.rand(n) * 0.5 + 0.5
    min_p = torch.rand(n) * 0.1
    params = _params(n, temperature, top_k, top_p, min_p)
    logits = _logits(n)
    got, want = _both(logits, params)
    assert got.tolist() == want.tolist()
    greedy = logits.argmax(-1)
    assert got[::3].tolist() == greedy[::3].tolist()


def test_draws_depend_on_seed_and_step_not_on_the_batch():
    logits = _logits(4)
    params = _params(4)
    full = K.sampling.sample(logits, *params)
    single = K.sampling.sample(logits[2:3], *(p[2:3] for p in params))
    assert full[2] == single[0]
    many = torch.stack([K.sampling.sample(logits[:1], *(p[:1] for p in params[:4]), params[4][:1] + s, params[5][:1])
                        for s in range(12)])
    assert len(set(many.flatten().tolist())) > 1  # different seeds give different draws


def test_filters_keep_exactly_what_they_should():
    # A known distribution: probabilities 0.4, 0.3, 0.2, 0.1 over tokens 0..3, the rest impossible.
    logits = torch.full((1, VOCAB), float("-inf"), device=DEVICE)
    logits[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1], device=DEVICE).log()
    seen = {}
    for name, kwargs in {"top_k=2": dict(top_k=2), "top_p=0.65": dict(top_p=0.65), "min_p=0.6": dict(min_p=0.6)}.items():
        draws = set()
        for s in range(24):
            params = _params(1, **kwargs)
            got, want = _both(logits, params)
            assert got.tolist() == want.tolist()
            draws.add(int(got))
        seen[name] = draws
    assert seen == {"top_k=2": {0, 1}, "top_p=0.65": {0, 1}, "min_p=0.6": {0, 1}}


def test_penalties_exact():
    n = ROWS
    logits = _logits(n)
    prompt = torch.randint(0, VOCAB, (n, 30), device=DEVICE)
    prompt[:, 20:] = -1
    output = torch.randint(0, 50, (n, 40), device=DEVICE)  # many repeats
    output[::2, 25:] = -1
    penalties = dict(
        repetition_penalty=torch.rand(n, device=DEVICE) + 0.7, presence_penalty=torch.rand(n, device=DEVICE) * 2 - 1,
        frequency_penalty=torch.rand(n, device=DEVICE), prompt_token_ids=prompt, output_token_ids=output,
    )
    for temperature in (0.0, 0.9):
        got, want = _both(logits, _params(n, temperature), **penalties)
        assert got.tolist() == want.tolist()
    # Only some penalties given, the others at their neutral defaults.
    got, want = _both(logits, _params(n, 0.0), frequency_penalty=torch.ones(n, device=DEVICE) * 5,
                      output_token_ids=output)
    assert got.tolist() == want.tolist()


def test_logprobs_of_the_raw_distribution():
    n = ROWS
    logits = _logits(n)
    params = _params(n, torch.rand(n) + 0.3, 10, 0.9)
    got, want = _both(logits, params, num_logprobs=5, repetition_penalty=torch.full((n,), 1.5, device=DEVICE),
                      output_token_ids=torch.randint(0, VOCAB, (n, 3), device=DEVICE))
    assert isinstance(got, SampleOutput)
    assert got.token_ids.tolist() == want.token_ids.tolist()
    assert torch.equal(got.top_token_ids, want.top_token_ids)
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got.logprobs, raw.gather(1, got.token_ids[:, None])[:, 0], atol=2e-5, rtol=0)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=2e-5, rtol=0)
    none = K.sampling.sample(logits, *params, num_logprobs=0)
    assert none.top_token_ids.shape == (n, 0) and none.token_ids.tolist() == K.sampling.sample(logits, *params).tolist()


def test_noise_matches_reference_bit_for_bit():
    # top_k=1 over flat logits makes the race the argmax of the noise itself (divided by a constant).
    n = 8
    logits = torch.zeros(n, 300, device=DEVICE)
    params = _params(n)
    got = K.sampling.sample(logits, *params)
    noise = uniform_noise_ref(params[4], params[5], 300)
    assert got.tolist() == (1.0 / -torch.log(noise)).argmax(-1).tolist()


def test_empty_batch():
    params = _params(0)
    assert K.sampling.sample(torch.zeros(0, 10, device=DEVICE), *params).shape == (0,)
