"""The Quart app factory: one blueprint per endpoint family, OpenAI-style errors everywhere."""

from __future__ import annotations

from quart import Quart, jsonify

from transerve.actors.runtime import Models
from transerve.engine.models import ModelNotFoundError
from transerve.http import chat, models_api
from transerve.http.errors import error_body, install_error_handlers


def create_app(models: Models) -> Quart:
    app = Quart("transerve")
    app.config["MODELS"] = models
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024 * 1024
    app.register_blueprint(chat.bp)
    app.register_blueprint(models_api.bp)
    install_error_handlers(app)

    @app.errorhandler(ModelNotFoundError)
    async def _model_not_found(exc: ModelNotFoundError):
        return jsonify(error_body(str(exc), 404, "model", "model_not_found")), 404

    return app
