"""The embedding engine without a server: which models are embedding models and how they pool, length
sorted forward passes, and a decoder's last-token vectors against transformers' own forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transerve.config import EngineConfig
from transerve.engine.embedding import (EmbeddingInputError, Pooling, PoolingSpec, batches, embed, load_embedder,
                                        pool, pooling_spec, shorten, tokenize)
from transerve.engine.models import ModelTaskError


def write(root, files: dict[str, dict | list]) -> str:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    return str(root)


MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
           {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def test_sentence_transformers_layouts_old_and_new_say_how_to_pool(tmp_path):
    old = write(tmp_path / "old", {"config.json": {"architectures": ["BertModel"]}, "modules.json": MODULES,
                                   "1_Pooling/config.json": {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
                                   "sentence_bert_config.json": {"max_seq_length": 256}})
    assert pooling_spec(old) == PoolingSpec(Pooling.CLS, True, 256, None)
    new = write(tmp_path / "new", {"config.json": {"architectures": ["Qwen3ForCausalLM"], "is_matryoshka": True},
                                   "modules.json": MODULES[:2], "1_Pooling/config.json": {"pooling_mode": "lasttoken"}})
    assert pooling_spec(new) == PoolingSpec(Pooling.LAST_TOKEN, False, None, ())
    nested = write(tmp_path / "nested", {"config.json": {}, "modules.json": [{**MODULES[0], "path": "0_Transformer"},
                                                                             *MODULES[1:]],
                                         "0_Transformer/sentence_bert_config.json": {"max_seq_length": 128},
                                         "1_Pooling/config.json": {"pooling_mode_mean_tokens": True}})
    assert pooling_spec(nested) == PoolingSpec(Pooling.MEAN, True, 128, None, "0_Transformer")
    two = write(tmp_path / "two", {"config.json": {}, "modules.json": MODULES,
                                   "1_Pooling/config.json": {"pooling_mode": ["mean", "max"]}})
    with pytest.raises(ModelTaskError, match="mean\\+max is not supported"):
        pooling_spec(two)
    dense = write(tmp_path / "dense", {"config.json": {}, "modules.json": [
        *MODULES, {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}],
        "1_Pooling/config.json": {"pooling_mode": "mean"}})
    with pytest.raises(ModelTaskError, match="Dense"):
        pooling_spec(dense)


@pytest.mark.parametrize("config, expected", [
    ({"architectures": ["Qwen2Model"], "model_type": "qwen2"}, PoolingSpec(Pooling.LAST_TOKEN, True)),
    ({"architectures": ["BertModel"], "model_type": "bert", "matryoshka_dimensions": [64, 128]},
     PoolingSpec(Pooling.CLS, True, None, (64, 128))),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, None),
    ({"architectures": ["WhisperForConditionalGeneration"]}, None),
    ({"architectures": ["GPT2LMHeadModel"]}, None),
])
def test_models_without_sentence_transformers_files_by_their_architecture(tmp_path, config, expected):
    assert pooling_spec(write(tmp_path, {"config.json": config})) == expected


def test_pooling_over_right_padded_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert pool(hidden, mask, Pooling.CLS).tolist() == [[0, 1], [6, 7]]
    assert pool(hidden, mask, Pooling.LAST_TOKEN).tolist() == [[4, 5], [8, 9]]
    assert pool(hidden, mask, Pooling.MEAN).tolist() == [[2, 3], [7, 8]]


def test_forward_passes_sort_by_length_and_fit_the_token_budget():
    assert batches([3, 10, 2, 9, 1], max_tokens=20) == [[1, 3], [0, 2, 4]]
    assert batches([30], max_tokens=20) == [[0]]  # one input longer than the budget still gets its pass


@pytest.fixture(scope="module")
def decoder(tiny_repos):
    path = tiny_repos["tiny/qwen2"]
    return load_embedder("tiny/qwen2", str(path), PoolingSpec(Pooling.LAST_TOKEN, True, 16, (8,)), EngineConfig(),
                         torch.device("cpu"), torch.float32)


def test_decoder_last_token_vectors_match_transformers_one_input_at_a_time(decoder, tiny_repos):
    from transformers import AutoModel

    rows = [(5, 6, 7, 8, 9), (10, 11), (12, 13, 14)]
    vectors, passes = embed(decoder, rows)
    assert passes == 1
    reference = AutoModel.from_pretrained(tiny_repos["tiny/qwen2"], attn_implementation="eager").eval()
    with torch.inference_mode():
        for row, vector in zip(rows, vectors):
            last = reference(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
            np.testing.assert_allclose(vector, torch.nn.functional.normalize(last, dim=0).numpy(), atol=1e-5, rtol=0)
    cut = shorten(vectors, 8, decoder)
    np.testing.assert_allclose(cut, vectors[:, :8] / np.linalg.norm(vectors[:, :8], axis=1, keepdims=True), atol=1e-6)


def test_inputs_over_the_limit_or_outside_the_vocabulary_are_refused(decoder):
    with pytest.raises(EmbeddingInputError, match="longer than this model's 16"):
        tokenize(decoder, [tuple(range(5, 25))], None)
    assert tokenize(decoder, [tuple(range(5, 25))], 4) == [(5, 6, 7, 8)]  # the tokenizer's truncation side: right
    with pytest.raises(EmbeddingInputError, match="token ids must be between 0 and"):
        tokenize(decoder, [(decoder.vocab_size,)], None)
    with pytest.raises(EmbeddingInputError, match="gives 8"):
        shorten(np.zeros((1, decoder.dimensions), np.float32), 4, decoder)
