"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status."""

from __future__ import annotations

from quart import Quart, jsonify
from werkzeug.exceptions import HTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code


def error_body(message: str, status_code: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status_code, "server_error"), "param": param, "code": code}}


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(OpenAIError)
    async def _openai_error(exc: OpenAIError):
        return jsonify(error_body(exc.message, exc.status_code, exc.param, exc.code)), exc.status_code

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.code)
        return jsonify(error_body(exc.description or exc.name, exc.code or 500, None, code)), exc.code

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return jsonify(error_body(f"internal error: {type(exc).__name__}", 500, None, "internal_error")), 500
