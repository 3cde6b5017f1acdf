"""The fields the three text endpoints share, and their conversion into the engine's SamplingParams.

Sampling settings come from three places, later ones winning: the model's generation_config.json
(when it asks for sampling), the request's `generation_config`, the request's own OpenAI fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from transerve.engine.request import GrammarSpec, SamplingParams
from transerve.http.errors import OpenAIError
from transerve.http.genconfig import parse_generation_config
from transerve.http.protocol.base import HONOURED, IGNORED, PARTLY, Part, RequestBody, spec

MAX_LOGPROBS = 20
MAX_CHOICES = 128
SEED_MASK = 2**62 - 1

Stop = Annotated[str, StringConstraints(min_length=1)] | Annotated[list[Annotated[str, StringConstraints(min_length=1)]],
                                                                     Field(max_length=4)]
LogitBias = dict[Annotated[str, StringConstraints(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]]
MaxTokens = Annotated[int, Field(ge=1, le=2**31)]

# Notes shared by fields that several endpoints (or one endpoint, as an extension) take.
STOP_NOTE = "up to 4 strings, matched across token boundaries, never shown"
SEED_NOTE = "the same seed gives the same answer whatever else is in the batch"
PENALTY_NOTE = "-2 to 2, over the generated tokens"
LOGIT_BIAS_NOTE = "token id -> bias in [-100, 100], added to the logits"
STORED_NOTE = "an end-user id for OpenAI's abuse monitoring; nothing here uses it"
CACHED_NOTE = "cached prefixes live until their KV blocks are needed"


class StreamOptions(Part):
    include_usage: bool = False
    include_obfuscation: bool | None = None


@dataclass(frozen=True)
class Sampling:
    """How to sample each choice: the params, the stop strings (the detokenizer's), how many choices."""

    params: SamplingParams
    stop: tuple[str, ...]
    n: int

    def choice(self, index: int) -> SamplingParams:
        """The params of choice `index` of n: a given seed still gives each choice its own draws."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + index) & SEED_MASK)


class SamplingRequest(RequestBody):
    """The fields chat, completions and responses share."""

    model: str | None = spec(HONOURED, "repo or repo@revision, loaded on first use; the pinned model when the server has one")
    temperature: float | None = spec(HONOURED, "0 to 2; 0 is greedy", ge=0, le=2)
    top_p: float | None = spec(HONOURED, ge=0, le=1)
    seed: int | None = spec(HONOURED, SEED_NOTE, ge=-(2**63), le=2**63 - 1)
    stop: Stop | None = spec(HONOURED, STOP_NOTE)
    presence_penalty: float = spec(HONOURED, PENALTY_NOTE, 0.0, ge=-2, le=2)
    frequency_penalty: float = spec(HONOURED, PENALTY_NOTE, 0.0, ge=-2, le=2)
    logit_bias: LogitBias | None = spec(HONOURED, LOGIT_BIAS_NOTE)
    n: int | None = spec(HONOURED, "1 to 128 choices, each sampled as its own request in the batch", ge=1, le=MAX_CHOICES)
    stream: bool = spec(HONOURED, default=False)
    stream_options: StreamOptions | None = spec(
        PARTLY, "`include_usage` honoured; `include_obfuscation` ignored (no obfuscation padding is sent)")
    user: str | None = spec(IGNORED, STORED_NOTE)
    # Extensions, as vLLM and transformers serve name them.
    generation_config: dict[str, Any] | str | None = spec(
        HONOURED, "extension: a transformers GenerationConfig (object or JSON string): max_new_tokens, min_new_tokens, "
        "temperature, top_p, top_k, min_p, do_sample, repetition_penalty, no_repeat_ngram_size, num_return_sequences, "
        "stop_strings, eos_token_id, suppress_tokens, bad_words_ids; any other field set to a non-default value is a 400 "
        "naming it")
    top_k: int | None = spec(HONOURED, "extension", ge=0, le=2**31)
    min_p: float | None = spec(HONOURED, "extension", ge=0, le=1)
    repetition_penalty: float | None = spec(HONOURED, "extension: over prompt and generated tokens, 1 is off", gt=0, le=100)
    ignore_eos: bool = spec(HONOURED, "extension: keep going past the end-of-sequence token", False)
    # What each endpoint says differently.
    def max_tokens_asked(self) -> int | None:
        """The request's own limit on generated tokens, if it set one."""
        raise NotImplementedError

    def num_logprobs(self) -> int | None:
        """None: no logprobs; N: the sampled token's and the top N."""
        return None

    def grammar_spec(self) -> GrammarSpec | None:
        """What the output must follow (constrained decoding), if anything."""
        return None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, defaults: Mapping[str, Any], vocab_size: int) -> Sampling:
        """Everything about how to sample, against the model's generation defaults and vocabulary."""
        gen = parse_generation_config(self.generation_config) if self.generation_config is not None else {}
        max_tokens = self.max_tokens_asked()
        if max_tokens is None:
            max_tokens = gen.get("max_tokens", self.default_max_tokens())
        temperature = _first_given(gen.get("temperature"), defaults.get("temperature"), 1.0)
        if gen.get("do_sample") is False:
            temperature = 0.0  # greedy, as transformers' generate() with do_sample=False
        elif gen.get("do_sample") is True and not temperature:
            temperature = 1.0
        bias = {t: float("-inf") for t in gen.get("suppress_tokens", [])}
        for key, value in (self.logit_bias or {}).items():
            if int(key) >= vocab_size:
                raise OpenAIError(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})", 400,
                                  "logit_bias")
            bias[int(key)] = value
        bad_words = []
        for word in gen.get("bad_words_ids", []):
            if len(word) == 1:
                bias[word[0]] = float("-inf")
            else:
                bad_words.append(tuple(word))
        if any(t >= vocab_size for t in bias):
            raise OpenAIError("generation_config names a token id beyond this model's vocabulary", 400, "generation_config")
        stop = self.stop or gen.get("stop", ())
        pick = _first_given
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=pick(self.temperature, temperature),
                top_p=pick(self.top_p, gen.get("top_p"), defaults.get("top_p"), 1.0) or 1e-9,
                top_k=pick(self.top_k, gen.get("top_k"), defaults.get("top_k"), 0),
                min_p=float(pick(self.min_p, gen.get("min_p"), defaults.get("min_p"), 0.0)),
                seed=None if self.seed is None else self.seed & SEED_MASK,
                stop_token_ids=tuple(gen.get("stop_token_ids", ())),
                ignore_eos=self.ignore_eos,
                repetition_penalty=pick(self.repetition_penalty, gen.get("repetition_penalty"), 1.0),
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                logit_bias=tuple(sorted(bias.items())),
                num_logprobs=self.num_logprobs(),
                min_tokens=gen.get("min_tokens", 0),
                no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0),
                bad_words_ids=tuple(bad_words),
                grammar=self.grammar_spec(),
            )
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, "generation_config") from exc
        return Sampling(params, (stop,) if isinstance(stop, str) else tuple(stop), pick(self.n, gen.get("n"), 1))

    def default_max_tokens(self) -> int | None:
        """None: as many as the context and the KV cache leave room for (the engine decides)."""
        return None


class OpenAIServiceFields(RequestBody):
    """Caching, tiers and storage: OpenAI's own services, which chat and responses name (and ignore here)."""

    prompt_cache_key: str | None = spec(IGNORED, "prefix caching is automatic: any shared prompt prefix is reused")
    prompt_cache_retention: str | None = spec(IGNORED, CACHED_NOTE)
    prompt_cache_options: dict[str, Any] | None = spec(IGNORED, CACHED_NOTE)
    service_tier: str | None = spec(IGNORED, "one tier here; responses say `default`")
    safety_identifier: str | None = spec(IGNORED, STORED_NOTE)
    metadata: dict[str, Annotated[str, StringConstraints(max_length=512)]] | None = spec(
        IGNORED, "only meaningful for stored objects; nothing is stored (Responses echoes it back)")
    store: bool | None = spec(IGNORED, "nothing is ever stored")



def _first_given(*values: Any) -> Any:
    return next(v for v in values if v is not None)
