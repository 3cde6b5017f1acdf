"""Which replica has seen which prompt prefixes: pure bookkeeping for the prefix-aware router.

A prompt is keyed by its text, not its token ids: the ingress has no tokenizer and renders no chat
template (both happen on the replica), and a request's messages, raw prompt or token ids all have a
stable text form whose prefixes grow with the conversation (turn n+1's messages start with turn n's).
A shared text prefix almost always means a shared token prefix, which is what the replica's block
manager reuses. Like the block manager, the text is cut into fixed chunks whose hashes chain, so equal
hashes mean equal prefixes and a match is counted in whole chunks.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

CHUNK_CHARS = 64  # about one KV block of 16 tokens of English text


def prompt_text(request: Any) -> str:
    """The text a GenerateRequest's prompt is keyed by: its tools and messages as JSON (whose prefix is
    the previous turn's, minus the closing bracket), its raw prompt, or its token ids."""
    if request.messages is not None:
        head = json.dumps(request.tools, default=str) if request.tools else ""
        return head + json.dumps(list(request.messages), default=str, ensure_ascii=False)
    if request.prompt is not None:
        return request.prompt
    return ",".join(map(str, request.prompt_token_ids or ()))


def chunk_hashes(text: str, chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Chained hashes of the text's whole chunks (a trailing partial chunk is not cached anyway)."""
    hashes, prev = [], 0
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        prev = hash((prev, text[start:start + chunk_chars]))
        hashes.append(prev)
    return hashes


class PrefixIndex:
    """Per replica, the chunk hashes of the prompts sent to it, least recently used evicted first (a
    replica's KV cache forgets old prefixes too)."""

    def __init__(self, max_chunks_per_replica: int = 100_000, chunk_chars: int = CHUNK_CHARS) -> None:
        self.max_chunks = max_chunks_per_replica
        self.chunk_chars = chunk_chars
        self.chunks: dict[Hashable, OrderedDict[int, None]] = {}

    def matched_chars(self, text: str, replicas: Sequence[Hashable]) -> dict[Hashable, int]:
        """How many leading characters of `text` each replica has seen, in whole chunks."""
        hashes = chunk_hashes(text, self.chunk_chars)
        out = {}
        for replica in replicas:
            seen = self.chunks.get(replica, {})
            n = 0
            while n < len(hashes) and hashes[n] in seen:
                n += 1
            out[replica] = n * self.chunk_chars
        return out

    def insert(self, replica: Hashable, text: str) -> None:
        seen = self.chunks.setdefault(replica, OrderedDict())
        for h in chunk_hashes(text, self.chunk_chars):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_chunks:
            seen.popitem(last=False)

    def size(self, replica: Hashable) -> int:
        return len(self.chunks.get(replica, ()))

    def keep_only(self, replicas: Sequence[Hashable]) -> None:
        """Forget replicas that are gone: a restarted replica has a new id and an empty cache."""
        for replica in set(self.chunks) - set(replicas):
            del self.chunks[replica]


def choose_replica(matched: dict[Hashable, int], loads: dict[Hashable, int], footprints: dict[Hashable, Any],
                   keyable_chars: int, min_match_chars: int, max_imbalance: int) -> Hashable:
    """The replica for one request: the longest prefix match when it is long enough (`min_match_chars`,
    or all of the prompt's whole chunks, `keyable_chars`, when they are fewer) and that replica is at
    most `max_imbalance` requests busier than the least-loaded one; otherwise the least-loaded, ties
    going to the smallest footprint (prefixes held, then requests taken), so unrelated conversations
    spread out."""
    least_load = min(loads.values())
    best = max(matched, key=lambda r: (matched[r], -loads[r]))
    long_enough = matched[best] >= min(min_match_chars, keyable_chars)
    if matched[best] > 0 and long_enough and loads[best] - least_load <= max_imbalance:
        return best
    return min(loads, key=lambda r: (loads[r], footprints[r]))
