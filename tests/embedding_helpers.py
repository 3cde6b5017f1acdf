"""Tiny sentence-transformers models, built locally (a random BERT, mean pooling, Normalize) and saved
by sentence-transformers itself in the private Hugging Face cache, as a user's download would be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import save_in_hf_cache

ST_REPO = "tiny/st-mean"  # declares no Matryoshka sizes
MATRYOSHKA_REPO = "tiny/st-matryoshka"  # the same weights, `matryoshka_dimensions` [8, 16] in its config
MAX_SEQ_LENGTH = 64  # sentence-transformers' limit; the model has 128 positions
WORDS = ("the quick brown fox jumps over lazy dog a an and or of to in on at is was be it this that with for as by "
         "from hello world cat sat mat red green blue sky sea river tree house car road city night day sun moon star "
         "one two three four five six seven eight nine ten").split()


def build_tiny_sentence_transformer(work: Path) -> dict[str, Path]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = work / "bert"
    hf.mkdir(parents=True, exist_ok=True)
    (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing"]) + "\n")
    BertTokenizerFast(str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf)
    model = SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH), Pooling(32, "mean"),
                                         Normalize()])
    plain = work / "st"
    model.save(str(plain))
    matryoshka = work / "st-matryoshka"
    shutil.copytree(plain, matryoshka)
    config_path = matryoshka / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "matryoshka_dimensions": [8, 16]}))
    return {ST_REPO: save_in_hf_cache(ST_REPO, plain), MATRYOSHKA_REPO: save_in_hf_cache(MATRYOSHKA_REPO, matryoshka)}
