"""The prefix-aware router's policy, without Ray: prompt keys, prefix matches, and the choice."""

from __future__ import annotations

from transerve.actors.client import GenerateRequest
from transerve.cluster.prefix_index import CHUNK_CHARS, PrefixIndex, choose_replica, prompt_text
from transerve.engine.request import SamplingParams


def conversation(*turns: str) -> GenerateRequest:
    messages = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns))
    return GenerateRequest(SamplingParams(), messages=messages)


def test_a_conversations_next_turn_starts_with_its_previous_prompt():
    first = prompt_text(conversation("Tell me about the sea. " * 10))
    second = prompt_text(conversation("Tell me about the sea. " * 10, "It is wide.", "And deep?"))
    assert second.startswith(first[:-1])  # all but the closing bracket


def test_raw_prompts_and_token_ids_have_their_own_keys():
    assert prompt_text(GenerateRequest(SamplingParams(), prompt="abc")) == "abc"
    assert prompt_text(GenerateRequest(SamplingParams(), prompt_token_ids=(1, 22, 333))) == "1,22,333"


def test_a_match_counts_whole_chunks_of_the_longest_shared_prefix():
    index = PrefixIndex()
    shared = "x" * (3 * CHUNK_CHARS)
    index.insert("a", shared + "a" * CHUNK_CHARS)
    index.insert("b", "y" * (4 * CHUNK_CHARS))
    assert index.matched_chars(shared + "z" * CHUNK_CHARS, ["a", "b", "c"]) == {"a": 3 * CHUNK_CHARS, "b": 0, "c": 0}


def test_the_index_forgets_least_recently_used_chunks_and_gone_replicas():
    index = PrefixIndex(max_chunks_per_replica=2)
    index.insert("a", "p" * CHUNK_CHARS * 3)
    assert index.size("a") == 2
    assert index.matched_chars("p" * CHUNK_CHARS * 3, ["a"]) == {"a": 0}  # its first chunk is gone
    index.keep_only(["b"])
    assert index.size("a") == 0


def choose(matched, loads, footprints=None, keyable=1024):
    footprints = footprints or {r: 0 for r in loads}
    return choose_replica(matched, loads, footprints, keyable, min_match_chars=256, max_imbalance=4)


def test_a_long_enough_match_wins_when_the_load_is_balanced():
    assert choose({"a": 512, "b": 0}, {"a": 3, "b": 0}) == "a"


def test_a_short_match_or_a_busy_replica_goes_to_the_least_loaded():
    assert choose({"a": 128, "b": 0}, {"a": 1, "b": 0}) == "b"
    assert choose({"a": 512, "b": 0}, {"a": 5, "b": 0}) == "b"


def test_a_short_prompt_matched_whole_counts_as_long_enough():
    assert choose({"a": 128, "b": 0}, {"a": 1, "b": 0}, keyable=128) == "a"


def test_ties_in_load_go_to_the_smallest_footprint():
    assert choose({"a": 0, "b": 0}, {"a": 0, "b": 0}, {"a": (10, 1), "b": (2, 5)}) == "b"
    assert choose({"a": 0, "b": 0}, {"a": 0, "b": 0}, {"a": (0, 1), "b": (0, 0)}) == "b"
