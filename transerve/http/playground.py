"""GET /: the web playground, a single page and its own scripts and stylesheet, shipped in the package (no build step).

Everything the page loads comes from this server; the page calls the same OpenAI-style API as any
client (so it obeys --api-key: the page itself is open, its API calls carry the key the user gives).
"""

from __future__ import annotations

from quart import Blueprint

# The page's own files live under this prefix; the middleware leaves it open like "/".
STATIC_PREFIX = "/playground"

CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
       "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'")

bp = Blueprint("playground", __name__, static_folder="static", static_url_path=STATIC_PREFIX)


@bp.get("/")
async def index():
    response = await bp.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    # The browser itself refuses any other origin and any inline script: model output can never run.
    response.headers["Content-Security-Policy"] = CSP
    return response
