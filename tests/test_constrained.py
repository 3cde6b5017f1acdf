"""Constrained decoding in the engine: a tiny random-weight model (its free output is noise) sampled at
temperature 1 must still write answers that parse and validate, every time, under JSON schemas, regexes,
choices and EBNF grammars; free requests in the same batch get exactly their own tokens; preemption and
recompute keep every answer valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from test_engine import EOS, make_engine, random_prompts
from transerve.engine.core import generate
from transerve.engine.grammar import Constraint, GrammarCompiler, GrammarError
from transerve.engine.request import GrammarKind, GrammarSpec, Request, SamplingParams

# Strings are bounded by patterns: xgrammar 0.2.9 writes maxLength strings as any characters but quote,
# backslash and newline, so other control characters (invalid in JSON strings) get through.
PET = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 1, "maxItems": 3},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z ]{0,9}$"}, "verified": {"type": "boolean"}},
                  "required": ["name", "verified"], "additionalProperties": False},
    },
    "required": ["kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["red", "green", "blue with \"quotes\"", "café"]
EBNF = 'root ::= num (op num)? (op num)?\nnum ::= [1-9] [0-9]?\nop ::= " + " | " * "'
EBNF_AS_REGEX = r"[1-9][0-9]?(?: [+*] [1-9][0-9]?){0,2}"
N = 50


@pytest.fixture(scope="module")
def engine(tiny_repos):
    return make_engine("tiny/llama", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def compiler(engine):
    return GrammarCompiler(engine.tokenizer, engine.vocab_size)


def sample(engine, compiler, spec: GrammarSpec | None, n: int = N, max_tokens: int = 120, prompts=None, seed: int = 0):
    """n answers at temperature 1, as (text, token ids) by request id."""
    prompts = prompts or random_prompts(engine.vocab_size, [8 + i % 13 for i in range(n)], seed=seed)
    constraint = Constraint(compiler.compile(spec)) if spec is not None else None
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i), seed=seed + i,
                        eos_token_ids=EOS, constraint=constraint) for i, p in enumerate(prompts)]
    outputs = generate(engine.core, engine.runner, requests)
    return {rid: (engine.tokenizer.decode([t for t in ids if t not in EOS]), ids) for rid, ids in outputs.items()}


def test_free_output_is_noise(engine):
    # The premise of the tests below: unconstrained, this model never writes the JSON we ask for.
    texts = [text for text, _ in sample(engine, None, None, n=8, max_tokens=40).values()]
    assert not any(_validates(text, PET) for text in texts)


def _validates(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_json_schema_answers_all_validate(engine, compiler):
    answers = sample(engine, compiler, GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(PET)))
    for text, ids in answers.values():
        assert ids[-1] in EOS, f"did not finish: {text!r}"
        jsonschema.validate(json.loads(text), PET)
    assert len({text for text, _ in answers.values()}) > N // 2  # sampled, not one forced answer


@pytest.mark.parametrize("kind,spec,pattern", [
    (GrammarKind.REGEX, REGEX, REGEX),
    (GrammarKind.CHOICE, json.dumps(CHOICES), "|".join(re.escape(c) for c in CHOICES)),
    (GrammarKind.EBNF, EBNF, EBNF_AS_REGEX),
])
def test_regex_choice_and_ebnf_answers_all_match(engine, compiler, kind, spec, pattern):
    answers = sample(engine, compiler, GrammarSpec(kind, spec))
    for text, ids in answers.values():
        assert ids[-1] in EOS and re.fullmatch(pattern, text), text
    if kind is GrammarKind.CHOICE:
        assert len({text for text, _ in answers.values()}) > 1


def test_max_tokens_mid_object_stops_with_the_partial_text(engine, compiler):
    answers = sample(engine, compiler, GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(PET)), n=4, max_tokens=5)
    for text, ids in answers.values():
        assert len(ids) == 5 and ids[-1] not in EOS
        assert text.startswith('{"k') and '{"kind": "'.startswith(text[:10]) and not _validates(text, PET)


def test_free_requests_get_their_own_tokens_beside_constrained_ones(engine, compiler):
    prompts = random_prompts(engine.vocab_size, [12, 30, 7, 21], seed=5)
    alone = sample(engine, compiler, None, prompts=prompts, max_tokens=20, seed=100)
    constraint = Constraint(compiler.compile(GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(PET))))
    free = [Request(f"r{i}", p, SamplingParams(max_tokens=20, temperature=1.0, seed=100 + i), seed=100 + i,
                    eos_token_ids=EOS) for i, p in enumerate(prompts)]
    bound = [Request(f"c{i}", p, SamplingParams(max_tokens=120, temperature=1.0), seed=i, eos_token_ids=EOS,
                     constraint=constraint) for i, p in enumerate(prompts)]
    mixed = generate(engine.core, engine.runner, [x for pair in zip(free, bound) for x in pair])
    assert {f"r{i}": mixed[f"r{i}"] for i in range(len(prompts))} == {rid: ids for rid, (_, ids) in alone.items()}
    for i in range(len(prompts)):
        jsonschema.validate(json.loads(engine.tokenizer.decode(mixed[f"c{i}"][:-1])), PET)


def test_preemption_and_recompute_keep_answers_valid(tiny_repos):
    # 32 blocks of 16 tokens cannot hold twelve requests at once: some are preempted and recomputed.
    small = make_engine("tiny/llama", num_kv_blocks=32)
    compiler = GrammarCompiler(small.tokenizer, small.vocab_size)
    prompts = random_prompts(small.vocab_size, [40, 55, 60, 30, 50, 45, 35, 58, 42, 48, 52, 38], seed=7)
    answers = sample(small, compiler, GrammarSpec(GrammarKind.JSON_SCHEMA, json.dumps(PET)), prompts=prompts, max_tokens=80)
    assert small.core.scheduler.num_preemptions > 0
    for text, ids in answers.values():
        assert ids[-1] in EOS, text
        jsonschema.validate(json.loads(text), PET)
    assert not small.core.matchers  # finished requests leave no matcher behind


@pytest.mark.parametrize("kind,spec", [
    (GrammarKind.JSON_SCHEMA, '{"type": "nonsense"}'),
    (GrammarKind.JSON_SCHEMA, "{not json"),
    (GrammarKind.REGEX, "a(b"),
    (GrammarKind.EBNF, "root ::= undefined_rule"),
])
def test_bad_specs_name_their_field(compiler, kind, spec):
    with pytest.raises(GrammarError) as caught:
        compiler.compile(GrammarSpec(kind, spec, "response_format"))
    assert caught.value.param == "response_format" and str(caught.value).startswith("response_format: ")
