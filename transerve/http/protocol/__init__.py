"""The request bodies of every endpoint as pydantic models (JSON, or the multipart form of a
transcription): validation, /openapi.json and the README's field tables all come from them, and each
converts itself into what the engine takes (SamplingParams, or a transcription's DecodeOptions)."""

from transerve.http.protocol.chat import ChatCompletionRequest
from transerve.http.protocol.completions import CompletionRequest
from transerve.http.protocol.messages import CountTokensRequest, MessagesRequest
from transerve.http.protocol.embeddings import EmbeddingRequest
from transerve.http.protocol.responses import ResponsesRequest
from transerve.http.protocol.transcriptions import TranscriptionRequest, TranslationRequest

REQUESTS = {cls.endpoint: cls for cls in (ChatCompletionRequest, CompletionRequest, ResponsesRequest, TranscriptionRequest,
                                              TranslationRequest, MessagesRequest, CountTokensRequest,
                                              EmbeddingRequest)}
