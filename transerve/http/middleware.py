"""Guards in front of every endpoint: the API key, CORS for browsers, and the request body size.

- With an API key, every path but the open ones needs `Authorization: Bearer <key>` (or Anthropic's
  `x-api-key: <key>`); a missing or wrong key gets OpenAI's 401 body (Anthropic's on /v1/messages). CORS preflights (OPTIONS) pass, since browsers never send
  credentials on them; the request that follows is checked as usual.
- CORS uses quart-cors (by Quart's author) with the operator's origins; without `--allowed-origins`
  no CORS header is ever sent, so browsers on other origins cannot read any answer.
- Bodies over the limit get a 413: Quart refuses them from the Content-Length, or as soon as a
  chunked body passes the limit, without buffering the rest.
"""

from __future__ import annotations

import hmac

from quart import Quart, request
from quart_cors import cors

from transerve.http.errors import OpenAIError
from transerve.http.playground import STATIC_PREFIX

# Liveness, scraping and the API description stay reachable without the key, as in vLLM and TGI; so
# do the playground page and its files, which ask the user for the key their API calls then send.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/"})
OPEN_PREFIXES = (STATIC_PREFIX + "/",)


def install_guards(app: Quart, api_key: str | None, allowed_origins: tuple[str, ...], max_request_bytes: int) -> None:
    app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
    app.config["API_KEY_REQUIRED"] = api_key is not None  # for the OpenAPI document's security section
    if api_key is not None:
        app.before_request(_api_key_check(api_key))
    if allowed_origins:
        cors(
            app,
            allow_origin=list(allowed_origins),
            allow_headers=["*"],  # the openai JS SDK sends its own x-stainless-* headers
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            expose_headers=["Retry-After"],
            max_age=600,
        )


def _api_key_check(api_key: str):
    expected = api_key.encode()

    async def check() -> None:
        if request.method == "OPTIONS" or request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = (token if scheme.lower() == "bearer" else "").strip() or request.headers.get("x-api-key", "").strip()
        if not token:
            raise OpenAIError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or in an x-api-key header.", 401,
                code="missing_api_key",
            )
        # Constant time, so response timing does not reveal how much of a guess was right.
        if not hmac.compare_digest(token.encode(), expected):
            raise OpenAIError("Incorrect API key provided.", 401, code="invalid_api_key")

    return check
