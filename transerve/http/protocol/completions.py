"""POST /v1/completions (the legacy API): prompts as text or token ids, one or many."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from transerve.http.errors import OpenAIError
from transerve.http.protocol.base import HONOURED, PARTLY, invalid, rejected, spec
from transerve.engine.request import GrammarSpec
from transerve.http.protocol.sampling import MAX_CHOICES, MAX_LOGPROBS, MaxTokens, SamplingRequest
from transerve.http.protocol.structured import STRUCTURED_NOTE, StructuredOutputs

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = (str | Annotated[list[str], Field(min_length=1)] | TokenIds
          | Annotated[list[TokenIds], Field(min_length=1)])


class CompletionRequest(SamplingRequest):
    endpoint: ClassVar[str] = "/v1/completions"

    prompt: Prompt = spec(HONOURED, "a string, a list of strings, token ids, or a list of token id lists", ...)
    max_tokens: MaxTokens = spec(HONOURED, "default 16, as OpenAI's", 16)
    echo: bool = spec(HONOURED, "the prompt comes first in each choice's text (not with logprobs: no prompt logprobs)",
                      False)
    logprobs: int | None = spec(HONOURED, "0 to 20: the sampled token's logprob and that many of the most likely",
                                ge=0, le=MAX_LOGPROBS)
    best_of: int | None = spec(PARTLY, "only equal to n (each choice is returned); more needs scoring of hidden choices: "
                               "400", ge=1, le=MAX_CHOICES)
    suffix: Any = rejected("fill-in-the-middle needs a model trained for it")
    structured_outputs: StructuredOutputs | None = spec(HONOURED, STRUCTURED_NOTE)

    @model_validator(mode="after")
    def _combinations(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise invalid("echo", "not with logprobs: that would need the prompt's logprobs, which this server does not compute")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise invalid("best_of", "must equal n: choosing among hidden choices is not supported")
        return self

    def max_tokens_asked(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else None

    def default_max_tokens(self) -> int | None:
        return type(self).model_fields["max_tokens"].default

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def grammar_spec(self) -> GrammarSpec | None:
        return self.structured_outputs.grammar_spec() if self.structured_outputs is not None else None

    def prompts(self, vocab_size: int) -> list[str | tuple[int, ...]]:
        """Each prompt: text, or token ids of this model."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        prompts = [tuple(prompt)] if isinstance(prompt[0], int) else [p if isinstance(p, str) else tuple(p) for p in prompt]
        for p in prompts:
            if isinstance(p, tuple) and not all(t < vocab_size for t in p):
                raise OpenAIError(f"prompt: token ids must be between 0 and {vocab_size - 1}", 400, "prompt")
        return prompts
