"""Constrained decoding on xgrammar: grammars compiled once per model, a matcher per request.

`GrammarCompiler.compile` turns a request's GrammarSpec into a `Constraint`; the tokenizer actor calls it in
a worker thread, so a bad schema is a 400 before the request reaches the engine, and the batch never
waits for a compile (xgrammar caches compiled grammars by their spec). The engine core keeps one `Matcher`
per constrained request: it advances with every token the request keeps, and each step it fills that
request's row of the token bitmask (bit t % 32 of word t // 32 set: token t may come next), which the
sampler applies before sampling. A preempted request keeps its output tokens and is recomputed from
them, so its matcher (which has accepted exactly those tokens) stays valid as it is.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import xgrammar as xgr

from transerve.engine.request import GrammarKind, GrammarSpec
from transerve.engine.step import TokenBitmask

log = logging.getLogger(__name__)

# Compact JSON: the separators OpenAI's models write. Any whitespace would let a small model pad forever.
JSON_STYLE = dict(any_whitespace=False, separators=(", ", ": "))
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A spec that does not compile; `param` is the request field to fix."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar for one request. `start_after`: a token (the end of a thought) the output must
    sample before the grammar applies; None: it applies from the first token."""

    grammar: Any  # xgrammar.CompiledGrammar
    start_after: int | None = None


class GrammarCompiler:
    """One model's compiler: its tokenizer's vocabulary, laid out over the LM head's rows (`vocab_size`)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=1)

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar (thread-safe; cached by xgrammar); GrammarError naming `spec.param` if invalid."""
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = _CPP_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise GrammarError(f"{spec.param}: does not compile to a grammar: {reason}", spec.param) from None

    def _compile(self, spec: GrammarSpec) -> Any:
        kind, text = spec.kind, spec.spec
        if kind is GrammarKind.JSON_SCHEMA:
            return self.compiler.compile_json_schema(text, **JSON_STYLE)
        if kind is GrammarKind.JSON_OBJECT:
            return self.compiler.compile_json_schema('{"type": "object"}', **JSON_STYLE)
        if kind is GrammarKind.REGEX:
            return self.compiler.compile_regex(text)
        if kind is GrammarKind.CHOICE:
            alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in json.loads(text))
            return self.compiler.compile_grammar(f"root ::= {alternatives}")
        if kind is GrammarKind.EBNF:
            return self.compiler.compile_grammar(text)
        if kind is GrammarKind.STRUCTURAL_TAG:
            return self.compiler.compile_structural_tag(text)
        raise ValueError(f"{kind.value} grammars are resolved before they are compiled")


class Matcher:
    """Where one request's output stands in its grammar."""

    __slots__ = ("matcher", "vocab_size", "waiting_for", "broken")

    def __init__(self, constraint: Constraint, stop_token_ids: frozenset[int] | tuple[int, ...]) -> None:
        # The request's own end tokens end the grammar: they are what finishes the request.
        self.matcher = xgr.GrammarMatcher(constraint.grammar, override_stop_tokens=sorted(stop_token_ids) or None)
        self.vocab_size = constraint.grammar.tokenizer_info.vocab_size
        self.waiting_for = constraint.start_after
        self.broken = False

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self.waiting_for is None and not self.broken and not self.matcher.is_terminated()

    def accept(self, token_id: int) -> None:
        if self.waiting_for is not None:
            if token_id == self.waiting_for:
                self.waiting_for = None
            return
        if self.active and not self.matcher.accept_token(token_id):
            # Only a token the mask forbade gets here (a bug, or a fully masked row): stop constraining.
            log.warning("constrained decoding: token %d is outside the grammar; the rest of this answer is free", token_id)
            self.broken = True


def fill_bitmask(rows: list[int], matchers: list[Matcher]) -> TokenBitmask | None:
    """The step's bitmask: one row per matcher, for the step's requests at `rows`; None if there are none."""
    if not matchers:
        return None
    vocab_size = matchers[0].vocab_size
    words = np.empty(xgr.get_bitmask_shape(len(matchers), vocab_size), dtype=np.int32)
    for i, m in enumerate(matchers):
        m.matcher.fill_next_token_bitmask(words, i)
    return TokenBitmask(tuple(rows), words)
