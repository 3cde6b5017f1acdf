"""The request bodies of the text endpoints as pydantic models: validation, /openapi.json and the README's
field tables all come from them, and each converts itself into the engine's SamplingParams."""

from transerve.http.protocol.chat import ChatCompletionRequest
from transerve.http.protocol.completions import CompletionRequest
from transerve.http.protocol.responses import ResponsesRequest

REQUESTS = {cls.endpoint: cls for cls in (ChatCompletionRequest, CompletionRequest, ResponsesRequest)}
