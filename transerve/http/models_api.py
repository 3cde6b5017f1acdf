"""GET /v1/models, /v1/models/{id} and /health."""

from __future__ import annotations

from quart import Blueprint, current_app, jsonify

from transerve.engine import models
from transerve.http.errors import OpenAIError

bp = Blueprint("models", __name__)


def _model_list() -> list[dict]:
    registry = current_app.config["MODELS"]
    cached = {e["id"]: {**e, "object": "model", "loaded": False} for e in models.scan_cache()}
    # Loaded models (the pinned MODEL among them) come first: clients often take the first id.
    loaded = {name: {**cached.get(name, {"id": name, "owned_by": "transerve"}), "object": "model",
                     "created": cached.get(name, {}).get("created", engine.created), "loaded": True,
                     **_generation_defaults(engine), **_precision(engine)}
              for name, engine in registry.engines.items()}
    return list(loaded.values()) + [e for name, e in cached.items() if name not in loaded]


def _generation_defaults(engine) -> dict:
    """Extension: the sampling a request to this text model gets for what it leaves unset."""
    defaults = getattr(engine, "generation_defaults", None)  # a Whisper engine has none
    return {} if defaults is None else {"generation_defaults": defaults}


def _precision(engine) -> dict:
    """Extension: what a loaded text model's linears compute in ('Q4_1+Q8_0', 'int8', 'float32', ...)."""
    value = getattr(engine, "precision", None)  # a Whisper engine has none
    return {"precision": value} if value else {}


@bp.get("/v1/models")
async def list_models():
    return jsonify({"object": "list", "data": _model_list()})


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str):
    for entry in _model_list():
        if entry["id"] == model_id:
            return jsonify(entry)
    raise OpenAIError(f"the model '{model_id}' does not exist", 404, "model", "model_not_found")


@bp.get("/health")
async def health():
    return jsonify({"status": "ok"})
