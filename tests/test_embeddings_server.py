"""POST /v1/embeddings on a live server with a tiny sentence-transformers model, through the openai SDK
(every body read is validated against the openai package's own types: CreateEmbeddingResponse, errors).

Vectors are checked against `SentenceTransformer.encode` of the same files; batching through /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import re

import httpx
import numpy as np
import openai
import pytest

from conftest import LiveServer
from embedding_helpers import MATRYOSHKA_REPO, MAX_SEQ_LENGTH, ST_REPO, WORDS, build_tiny_sentence_transformer
from openai_server import async_sdk_client, checked, sdk_client

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a cat sat on the mat",
         "red sky at night and the sun and the moon"]
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(3 * MAX_SEQ_LENGTH))


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("st"))


@pytest.fixture(scope="module")
def server(repos, tiny_repos):
    srv = LiveServer("--no-preload")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def reference(repos):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(repos[ST_REPO]), device="cpu")


@pytest.fixture()
def client(server):
    return sdk_client(server.base_url)


def post(server, body: dict) -> httpx.Response:
    return checked(httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=120))


def test_vectors_equal_sentence_transformers_encode(client, reference):
    answer = client.embeddings.create(model=ST_REPO, input=TEXTS, encoding_format="float")
    assert [d.index for d in answer.data] == [0, 1, 2, 3] and answer.model == ST_REPO
    got = np.array([d.embedding for d in answer.data])
    np.testing.assert_allclose(got, reference.encode(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    tokens = sum(len(ids) for ids in reference.tokenizer(TEXTS)["input_ids"])
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens


def test_base64_decodes_to_the_same_floats(server, client, reference):
    floats = post(server, {"model": ST_REPO, "input": TEXTS[0]}).json()["data"][0]["embedding"]
    encoded = post(server, {"model": ST_REPO, "input": TEXTS[0], "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist() == floats
    sdk = client.embeddings.create(model=ST_REPO, input=TEXTS[0])  # the SDK asks for base64 and decodes it
    assert sdk.data[0].embedding == floats
    np.testing.assert_allclose(floats, reference.encode(TEXTS[0]), atol=1e-5, rtol=0)


def test_token_ids_embed_as_their_text_does(client, reference):
    ids = reference.tokenizer(TEXTS[:2])["input_ids"]
    one = client.embeddings.create(model=ST_REPO, input=ids[0], encoding_format="float")
    many = client.embeddings.create(model=ST_REPO, input=ids, encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference.encode(TEXTS[0]), atol=1e-5, rtol=0)
    np.testing.assert_allclose([d.embedding for d in many.data], reference.encode(TEXTS[:2]), atol=1e-5, rtol=0)


def test_dimensions_cut_and_renormalise_on_a_matryoshka_model(client, reference):
    full = reference.encode(TEXTS)
    answer = client.embeddings.create(model=MATRYOSHKA_REPO, input=TEXTS, dimensions=16, encoding_format="float")
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose([d.embedding for d in answer.data], expected, atol=1e-5, rtol=0)
    same = client.embeddings.create(model=ST_REPO, input=TEXTS, dimensions=32, encoding_format="float")  # its own size
    np.testing.assert_allclose([d.embedding for d in same.data], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model, dimensions, words", [
    (ST_REPO, 16, "does not declare Matryoshka"), (MATRYOSHKA_REPO, 12, "gives 8, 16"), (MATRYOSHKA_REPO, 64, "gives 8, 16")])
def test_dimensions_the_model_cannot_give_are_400s(client, model, dimensions, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input="hello", dimensions=dimensions)
    assert info.value.body["param"] == "dimensions" and words in info.value.body["message"]


def test_an_input_too_long_is_a_400_unless_truncation_is_asked(server, client, reference):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=ST_REPO, input=["hello", LONG])
    assert info.value.body["param"] == "input" and f"longer than this model's {MAX_SEQ_LENGTH}" in info.value.body["message"]
    cut = post(server, {"model": ST_REPO, "input": [LONG], "truncate_prompt_tokens": -1}).json()
    np.testing.assert_allclose(cut["data"][0]["embedding"], reference.encode(LONG), atol=1e-5, rtol=0)  # ST cuts too
    assert cut["usage"]["prompt_tokens"] == MAX_SEQ_LENGTH
    short = post(server, {"model": ST_REPO, "input": LONG, "truncate_prompt_tokens": 10}).json()
    assert short["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "must not be empty"),
    ({"input": []}, "input", "must not be empty"),
    ({"input": ["hello", ""]}, "input", "no input may be empty"),
    ({"input": [[5, 6], []]}, "input", "no input may be empty"),
    ({"input": [5, -1]}, "input", ""),
    ({"input": [5, 10**6]}, "input", "token ids must be between 0 and"),
    ({"input": [["hello"], "x"]}, "input", ""),
    ({"input": 5}, "input", ""),
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ({}, "input", "is required"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", "float"),
    ({"input": "x", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "at least 1"),
    ({"input": "x", "truncate_prompt_tokens": 4096}, "truncate_prompt_tokens", f"at most {MAX_SEQ_LENGTH}"),
    ({"input": "x", "pooling": "max"}, "pooling", "unknown field"),
])
def test_bad_inputs_are_400s_that_name_the_field(server, body, param, words):
    response = post(server, {"model": ST_REPO, **body})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_chat_model_cannot_embed_and_an_embedding_model_cannot_chat(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny/llama", input="hello")
    assert info.value.body["param"] == "model" and "not an embedding model" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ST_REPO, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["param"] == "model" and "/v1/embeddings" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=ST_REPO, prompt="hi")
    assert info.value.body["param"] == "model"


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}\{{model="{re.escape(ST_REPO)}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_concurrent_requests_share_forward_passes(server):
    before = httpx.get(server.base_url + "/metrics").text
    inputs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)) for i in range(16)]

    async def run() -> list:
        async with async_sdk_client(server.base_url) as client:
            return await asyncio.gather(*(client.embeddings.create(model=ST_REPO, input=inputs) for _ in range(12)))

    answers = asyncio.run(run())
    assert all(len(a.data) == len(inputs) for a in answers)
    after = httpx.get(server.base_url + "/metrics").text
    requests = _metric(after, "transerve_embedding_requests_total") - _metric(before, "transerve_embedding_requests_total")
    passes = (_metric(after, "transerve_embedding_forward_passes_total")
              - _metric(before, "transerve_embedding_forward_passes_total"))
    assert requests == 12 and 1 <= passes < requests, (requests, passes)
