"""The real SmolLM2-135M-Instruct, served as `transerve serve` does by default, answers correctly."""

from __future__ import annotations

import openai
import pytest

from conftest import LiveServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_dir):  # smollm2_dir: the GGUF is converted once, before the server starts
    srv = LiveServer()
    yield srv
    assert srv.stop() == 0, srv.output()


def test_default_model_is_listed_and_answers_paris(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    assert "SmolLM2-135M-Instruct" in [m.id for m in client.models.list().data]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=30, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, max_tokens=30,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_default_model_reports_its_model_cards_sampling_in_models_and_the_log(server):
    entry = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused").models.retrieve("SmolLM2-135M-Instruct")
    assert (entry.generation_defaults["temperature"], entry.generation_defaults["top_p"]) == (0.2, 0.9)
    assert "sampling defaults {'temperature': 0.2, 'top_p': 0.9" in server.output()


def test_default_model_runs_its_gguf_quantized_weights_and_says_so(server):
    """By default a GGUF on CPU computes with its own quantized blocks (`--quantization none` expands it to
    float32), as /v1/models and the log say."""
    entry = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused").models.retrieve("SmolLM2-135M-Instruct")
    assert entry.precision == "Q4_1+Q8_0"
    assert "loaded SmolLM2-135M-Instruct on cpu in Q4_1+Q8_0" in server.output()
