"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status."""

from __future__ import annotations

from quart import Quart, current_app, jsonify
from werkzeug.exceptions import HTTPException

from transerve.actors.admission import EngineOverloadedError

# OpenAI itself answers a bad API key with type invalid_request_error; clients key on the status.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    def __init__(self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(message: str, status_code: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status_code, "server_error"), "param": param, "code": code}}


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(OpenAIError)
    async def _openai_error(exc: OpenAIError):
        headers = dict(exc.headers)
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return jsonify(error_body(exc.message, exc.status_code, exc.param, exc.code)), exc.status_code, headers

    @app.errorhandler(EngineOverloadedError)
    async def _overloaded(exc: EngineOverloadedError):
        body = error_body(str(exc), 429, None, "server_overloaded")
        return jsonify(body), 429, {"Retry-After": str(exc.retry_after_s)}

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
        message = exc.description or exc.name
        if status == 413:
            message = f"the request body is larger than this server's limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes"
        # Keep what the exception says about itself (Allow on a 405), but the body is our JSON.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return jsonify(error_body(message, status, None, code)), status, headers

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return jsonify(error_body(f"internal error: {type(exc).__name__}", 500, None, "internal_error")), 500
