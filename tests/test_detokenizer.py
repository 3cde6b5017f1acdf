"""Incremental detokenization and stop strings, against a real tokenizer."""

from __future__ import annotations

from transerve.actors.detokenizer import IncrementalDecoder


def stream(tokenizer, ids, stop=()):
    decoder = IncrementalDecoder(tokenizer, stop)
    pieces = []
    for i in ids:
        decoder.add(i)
        pieces.append(decoder.take(final=False))
        if decoder.stopped:
            break
    pieces.append(decoder.take(final=True))
    return pieces, decoder


def test_deltas_concatenate_to_the_full_decode(tokenizer):
    text = "Hello there! Ünïcödé, emoji 🎉🎉 and  double  spaces.\nNew line: 42."
    ids = tokenizer(text)["input_ids"]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_token_boundaries_is_cut_and_hidden(tokenizer):
    ids = tokenizer("The answer is forty-two, said the computer.")["input_ids"]
    pieces, decoder = stream(tokenizer, ids, stop=("y-tw",))
    assert "".join(pieces) == "The answer is fort"
    assert decoder.stopped


def test_text_that_might_start_a_stop_string_is_held_back_then_released(tokenizer):
    ids = tokenizer("abc STO then more")["input_ids"]
    pieces, decoder = stream(tokenizer, ids, stop=("STOP",))
    assert not decoder.stopped
    assert "".join(pieces) == "abc STO then more"
    assert not any(p.endswith("STO") for p in pieces[:-1] if "then" not in p)


def byte_fallback_tokenizer():
    """A Llama-style tokenizer built locally: Metaspace, byte fallback (<0xNN> tokens), special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "▁the", "▁a", "h", "e", "l", "o", "▁hello", "é", "▁wor", "ld", "ld!", "▁ST", "OP"):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    return tok


def window_decoded(tokenizer, ids, stop=(), hidden=None):
    """The same stream through the pure-Python window decode (the fallback)."""
    decoder = IncrementalDecoder(tokenizer, stop, hidden)
    decoder.fast = None
    pieces = []
    for i in ids:
        decoder.add(i)
        pieces.append(decoder.take(final=False))
    pieces.append(decoder.take(final=True))
    return pieces, decoder.stopped


def test_decode_stream_gives_the_window_decodes_deltas_on_random_tokens(tokenizer):
    """Byte-level BPE (SmolLM2) and byte-fallback SentencePiece: split UTF-8 characters, special tokens
    shown or skipped, hidden marker ids, a stop string; the fast path's deltas equal the fallback's."""
    import random

    rng = random.Random(0)
    for tok in (tokenizer, byte_fallback_tokenizer()):
        assert IncrementalDecoder(tok).fast is not None
        vocab = len(tok)
        special = sorted(tok.all_special_ids)
        hidden = frozenset(special[:-1])
        text_ids = tok("héllo wörld, 🎉 ünïcode: 日本語 ok")["input_ids"]
        for trial in range(60):
            ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            if trial % 3 == 0:
                ids = text_ids[: rng.randrange(len(text_ids))] + ids
            for stop, hide in (((), None), (("e",), None), ((), hidden)):
                decoder = IncrementalDecoder(tok, stop, hide)
                pieces = []
                for i in ids:
                    decoder.add(i)
                    pieces.append(decoder.take(final=False))
                pieces.append(decoder.take(final=True))
                assert (pieces, decoder.stopped) == window_decoded(tok, ids, stop, hide), (ids, stop, hide)
