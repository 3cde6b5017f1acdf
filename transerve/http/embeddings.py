"""POST /v1/embeddings, shaped like OpenAI's: a list of `embedding` objects, floats or base64 float32."""

from __future__ import annotations

import base64

import numpy as np
from quart import Blueprint, current_app, jsonify, request

from transerve.actors.embedding_client import EmbeddingUnavailable
from transerve.engine.embedding import EmbeddingInputError
from transerve.http.errors import OpenAIError
from transerve.http.protocol.embeddings import EmbeddingRequest

bp = Blueprint("embeddings", __name__)


@bp.post(EmbeddingRequest.endpoint)
async def embeddings():
    body = EmbeddingRequest.parse(await request.get_data())
    engine = await current_app.config["MODELS"].get(body.model, task="embedding")
    try:
        result = await engine.embed(body.inputs(), body.truncate_prompt_tokens, body.dimensions)
    except EmbeddingInputError as exc:
        raise OpenAIError(str(exc), 400, exc.param) from None
    except EmbeddingUnavailable as exc:
        raise OpenAIError(str(exc), exc.status_code) from None
    return jsonify({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
                 for i, vector in enumerate(result.vectors)],
        "model": engine.model_id,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai SDK decodes with numpy.frombuffer(..., "float32")
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
