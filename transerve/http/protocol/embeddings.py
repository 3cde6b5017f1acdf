"""POST /v1/embeddings: inputs as text or token ids, one or many; float or base64 vectors."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from transerve.http.protocol.base import HONOURED, IGNORED, PARTLY, RequestBody, invalid, spec
from transerve.http.protocol.sampling import STORED_NOTE

MAX_INPUTS = 2048  # OpenAI's own limit of inputs per request

TokenIds = list[Annotated[int, Field(ge=0)]]
Input = str | list[str] | TokenIds | list[TokenIds]


class EmbeddingRequest(RequestBody):
    endpoint: ClassVar[str] = "/v1/embeddings"

    input: Input = spec(HONOURED, f"a string, a list of strings, token ids, or a list of token id lists (at most "
                        f"{MAX_INPUTS}); none may be empty, or longer than the model takes (unless "
                        "truncate_prompt_tokens)", ...)
    model: str | None = spec(HONOURED, "an embedding model (a sentence-transformers repo, or one without an LM head); "
                             "the pinned model when the server has one")
    encoding_format: Literal["float", "base64"] = spec(HONOURED, "`float` (a JSON list), or `base64` (little-endian "
                                                       "float32 bytes, as the openai SDK asks by default)", "float")
    dimensions: int | None = spec(PARTLY, "Matryoshka: the first N dimensions, normalised again; only for models whose "
                                  "config declares it (`is_matryoshka` or `matryoshka_dimensions`, vLLM's keys), else "
                                  "400 (the model's own size is always accepted)", ge=1)
    user: str | None = spec(IGNORED, STORED_NOTE)
    truncate_prompt_tokens: int | None = spec(HONOURED, "extension (vLLM's): cut each input to this many tokens (-1: "
                                              "the model's limit) on the tokenizer's truncation side (the end, for "
                                              "BERT-like models, as sentence-transformers does)", ge=-1)

    @model_validator(mode="after")
    def _inputs(self) -> EmbeddingRequest:
        if self.input == "" or self.input == []:
            raise invalid("input", "must not be empty")
        if isinstance(self.input, list) and len(self.input) > MAX_INPUTS and not isinstance(self.input[0], int):
            raise invalid("input", f"at most {MAX_INPUTS} inputs per request")
        if isinstance(self.input, list) and any(item == "" or item == [] for item in self.input):
            raise invalid("input", "no input may be empty")
        if self.truncate_prompt_tokens == 0:
            raise invalid("truncate_prompt_tokens", "must be -1 (the model's limit) or at least 1")
        return self

    def inputs(self) -> list[str | tuple[int, ...]]:
        """Each input: text, or token ids of this model."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [tuple(self.input)]
        return [item if isinstance(item, str) else tuple(item) for item in self.input]
