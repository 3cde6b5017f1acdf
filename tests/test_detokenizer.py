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
