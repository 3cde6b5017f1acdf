"""The Quart app factory: one blueprint per endpoint family, OpenAI-style errors everywhere."""

from __future__ import annotations

from quart import Quart, jsonify

from transerve.actors.registry import Models
from transerve.engine.models import ModelNotFoundError, ModelTaskError
from transerve.config import ServerConfig
from transerve.http import chat, completions, embeddings, messages, models_api, openapi, playground, responses, transcriptions
from transerve.http.errors import error_body, install_error_handlers
from transerve.http.metrics import install_metrics
from transerve.http.middleware import install_guards


def create_app(models: Models, config: ServerConfig = ServerConfig()) -> Quart:
    app = Quart("transerve")
    app.config["MODELS"] = models
    # Quart cuts a response after 60 s by default: a long streamed answer on a slow box takes longer.
    app.config["RESPONSE_TIMEOUT"] = None
    install_guards(app, config.api_key, config.allowed_origins, config.max_request_bytes)
    install_metrics(app, models)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(completions.bp)
    app.register_blueprint(responses.bp)
    app.register_blueprint(messages.bp)
    app.register_blueprint(models_api.bp)
    app.register_blueprint(transcriptions.bp)
    app.register_blueprint(embeddings.bp)
    if config.playground:
        app.register_blueprint(playground.bp)
    install_error_handlers(app)

    @app.errorhandler(ModelNotFoundError)
    async def _model_not_found(exc: ModelNotFoundError):
        return jsonify(error_body(str(exc), 404, "model", "model_not_found")), 404

    @app.errorhandler(ModelTaskError)
    async def _model_task(exc: ModelTaskError):
        return jsonify(error_body(str(exc), 400, "model", "model_not_supported")), 400

    return app
